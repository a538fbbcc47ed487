"""Evaluate and predict with a trained model (a run directory or its checkpoint)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .balance import balanced_accuracy
from .checkpoint import load_checkpoint
from .data import (
    VAL_DIR_NAMES,
    ImageFolderSplits,
    Sample,
    discover_for,
    relabelled,
    scan_class_folder,
)
from .errors import TransferkitError
from .label_tables import LABEL_FILE_SUFFIXES
from .model import TransferModel
from .performance import PRECISION_NAMES, pick_device
from .prediction import (
    TTA_VIEWS,
    AugmentedRunner,
    EagerRunner,
    Predictions,
    inference_precision,
    predict_samples,
    top_k_results,
)
from .prediction_inputs import collect_images, images_as_files, why_not_predicted
from .runs import CONFIG_NAME, METRICS_NAME, run_json, same_data, with_run_columns
from .runtimes import ensemble, fold_models, runner_for
from .shards import is_url


@dataclass
class Evaluation:
    accuracy: float
    num_images: int
    class_names: list[str]
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    loss: float
    precision: str = "32"  # what the network ran at: bf16 and fp32 answers differ slightly
    skipped_files: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list, repr=False)
    predictions: list[dict[str, Any]] = field(default_factory=list, repr=False)
    macro_f1: float = 0.0  # the mean of per-class F1: what chooses among runs on imbalanced classes
    balanced_accuracy: float = 0.0  # the mean of per-class recalls (multi-label: of per-class accuracies)
    multi_label: bool = False  # then accuracy is exact match, and per_class holds thresholds and AP
    mean_average_precision: float | None = None  # multi-label
    micro_f1: float | None = None  # multi-label
    probabilities: torch.Tensor | None = field(default=None, repr=False)  # (N, classes), the decoded images'
    tta: dict[str, Any] | None = None  # with test-time augmentation: its views, the plain numbers, the gain and cost
    evaluated_on: str | None = None  # which of the images given, where not all of them (a run's own validation split)

    def to_dict(self, with_predictions: bool = False) -> dict[str, Any]:
        d = {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_f1": self.macro_f1,
            **({"multi_label": True, "mean_average_precision": self.mean_average_precision,
                "micro_f1": self.micro_f1} if self.multi_label else {}),
            **({"tta": self.tta} if self.tta else {}),
            **({"evaluated_on": self.evaluated_on} if self.evaluated_on else {}),
            "loss": self.loss,
            "precision": self.precision,
            "num_images": self.num_images,
            "class_names": self.class_names,
            "per_class": self.per_class,
            "confusion_matrix": self.confusion_matrix,
            "skipped_files": self.skipped_files,
        }
        if with_predictions:
            d["predictions"] = self.predictions
        return d

    def table(self) -> str:
        width = max(12, *(len(c) for c in self.class_names))
        accuracy = "exact-match accuracy" if self.multi_label else "accuracy"
        lines = [
            f"{accuracy} {self.accuracy:.4f} on {self.num_images} images (loss {self.loss:.4f}; "
            f"precision {PRECISION_NAMES.get(self.precision, self.precision)}"
            + (f"; {self.evaluated_on})" if self.evaluated_on else ")"),
            f"balanced accuracy {self.balanced_accuracy:.4f}, macro-F1 {self.macro_f1:.4f}"
            + (f", micro-F1 {self.micro_f1:.4f}, mAP {self.mean_average_precision:.4f}" if self.multi_label else ""),
            "",
            f"{'class':<{width}}  precision  recall  f1      support" + ("  threshold  AP" if self.multi_label else ""),
        ]
        for name, m in self.per_class.items():
            lines.append(
                f"{name:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:6.3f}  {int(m['support']):7d}"
                + (f"  {m['threshold']:9.2f}  {m['average_precision']:.3f}" if self.multi_label else "")
            )
        if self.multi_label:
            return "\n".join(lines)
        lines += ["", "confusion matrix (rows: true, columns: predicted)"]
        short = [c[:8] for c in self.class_names]
        lines.append(" " * (width + 2) + " ".join(f"{s:>8}" for s in short))
        for name, row in zip(self.class_names, self.confusion_matrix):
            lines.append(f"{name:<{width}}  " + " ".join(f"{v:8d}" for v in row))
        return "\n".join(lines)


def evaluate_samples(
    model: TransferModel,
    samples: list[Sample],
    batch_size: int = 32,
    num_workers: int | None = None,
    device: torch.device | None = None,
    precision: str | None = None,
    skipped: int = 0,
    compile: bool = False,
    calibrated: bool = True,
    tta_views: tuple[str, ...] | None = None,
    runner: Any = None,
) -> Evaluation:
    """Metrics of ``model`` on ``samples``; ``skipped`` counts files already left out by the scan.

    Computed by torchmetrics, as training's validation accuracy is, so the two are one definition.
    ``runner`` replaces ``model``'s own (a k-fold ensemble); ``model`` then says what the classes are.
    """
    runner = runner or EagerRunner(model, device, precision, compile, calibrated)
    if tta_views:
        runner = AugmentedRunner(runner, tta_views)
    return _evaluated(model, samples, predict_samples(runner, samples, batch_size, num_workers), skipped,
                      runner.thresholds)  # fmt: skip


def _evaluated(
    model: TransferModel, samples: list[Sample], result: Predictions, skipped: int, thresholds: list[float] | None
) -> Evaluation:
    decoded_samples = [samples[i] for i in result.positions.tolist()]
    bad = [(b.path, b.reason) for b in result.bad]
    return _evaluation(model, result.probabilities, decoded_samples, result.precision, skipped, bad, thresholds)


def evaluate_cached_features(
    model: TransferModel,
    samples: list[Sample],
    batch_size: int = 32,
    num_workers: int | None = None,
    device: torch.device | None = None,
    precision: str | None = None,
    cache_dir: Path | None = None,
    calibrated: bool = True,
) -> Evaluation:
    """:func:`evaluate_samples` of a model whose backbone was not trained, from its cached features.

    The backbone's pooled features of these images are read from the feature cache (computed and
    cached where missing) and only the head runs: the same numbers as running every image through
    the whole model (:func:`~transferkit.prediction.head_probabilities`), without the backbone's cost.
    """
    from .features import extract_features
    from .prediction import head_probabilities

    device = device or pick_device()
    precision = inference_precision(model, device, precision)
    found = extract_features(model, samples, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers,
                             device=device, precision=precision)  # fmt: skip
    probabilities = head_probabilities(model, found.features, device, precision, calibrated=calibrated)
    kept = set(found.paths)
    decoded_samples = [s for s in samples if s[0] in kept]
    bad = [(p, "cannot decode image") for p in found.skipped]
    return _evaluation(model, probabilities, decoded_samples, precision, 0, bad)


def _evaluation(
    model: TransferModel, probs: torch.Tensor, decoded_samples: list[Sample], precision: str, skipped: int,
    bad: list[tuple[str, str]], thresholds: list[float] | None = None,
) -> Evaluation:  # fmt: skip
    """Every metric of one evaluation, from the probabilities of the images that decoded; a multi-label
    model's decided by ``thresholds``, the runner's (a k-fold ensemble averages its members'), else its own."""
    names = model.class_names
    if model.multi_label:
        return _multilabel_evaluation(model, probs, decoded_samples, precision, skipped, bad,
                                      model.thresholds if thresholds is None else thresholds)  # fmt: skip
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    if len(probs) == 0:
        raise TransferkitError("no image could be decoded for evaluation")
    labels = torch.tensor([label for _, label in decoded_samples], dtype=torch.long)
    predicted = probs.argmax(dim=1)
    per_class = {"average": None, "num_classes": len(names), "zero_division": 0}
    scores = {metric: fn(predicted, labels, **per_class).tolist() for metric, fn in
              (("precision", multiclass_precision), ("recall", multiclass_recall), ("f1", multiclass_f1_score))}  # fmt: skip
    support = torch.bincount(labels, minlength=len(names)).tolist()
    confusion = multiclass_confusion_matrix(predicted, labels, num_classes=len(names))
    return Evaluation(
        accuracy=float(multiclass_accuracy(predicted, labels, num_classes=len(names), average="micro")),
        num_images=len(labels),
        class_names=names,
        per_class={name: {**{m: float(v[i]) for m, v in scores.items()}, "support": int(support[i])}
                   for i, name in enumerate(names)},  # fmt: skip
        confusion_matrix=confusion.tolist(),
        loss=float(torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels)),
        macro_f1=float(multiclass_f1_score(predicted, labels, num_classes=len(names), average="macro")),
        balanced_accuracy=balanced_accuracy(confusion),
        precision=precision,
        skipped_files=skipped + len(bad),
        skipped=bad,
        probabilities=probs,
        predictions=[
            {"path": path, "label": names[int(t)], "predicted": names[int(p)],
             "probability": float(probs[i, p]), "true_probability": float(probs[i, t])}
            for i, ((path, _), t, p) in enumerate(zip(decoded_samples, labels, predicted))
        ],
    )  # fmt: skip


def _multilabel_evaluation(
    model: TransferModel, probs: torch.Tensor, decoded_samples: list[Sample], precision: str, skipped: int,
    bad: list[tuple[str, str]], thresholds: list[float],
) -> Evaluation:  # fmt: skip
    from .multilabel import labels_over_threshold, multilabel_metrics, targets_of

    names = model.class_names
    targets = targets_of(decoded_samples)
    m = multilabel_metrics(names, probs, targets, thresholds)
    return Evaluation(
        accuracy=m["accuracy"], num_images=len(targets), class_names=names, per_class=m["per_class"],
        confusion_matrix=[], loss=m["loss"], precision=precision, skipped_files=skipped + len(bad), skipped=bad,
        macro_f1=m["macro_f1"], balanced_accuracy=m["balanced_accuracy"], multi_label=True,
        mean_average_precision=m["mean_average_precision"], micro_f1=m["micro_f1"], probabilities=probs,
        predictions=[{"path": path, "labels": [names[i] for i, v in enumerate(label) if v],
                      "predicted": [p["label"] for p in labels_over_threshold(probs[j], names, thresholds)]}
                     for j, (path, label) in enumerate(decoded_samples)],
    )  # fmt: skip


def _labels_as_the_model_reads_them(model: TransferModel, samples: list[Sample], data: str | Path) -> list[Sample]:
    """A multi-label model reads one label per image (a class folder) as a set of one; a model that
    picks one class cannot be measured on images with several labels."""
    several = any(not isinstance(label, int) for _, label in samples)
    if model.multi_label and not several:
        width = len(model.class_names)
        return [(path, tuple(int(i == label) for i in range(width))) for path, label in samples]
    if several and not model.multi_label:
        raise TransferkitError(f"{data} gives images several labels (multi-label), and this model picks one class "
                               f"per image; evaluate it on data with one label per image, or train a multi-label "
                               f"model on this data")  # fmt: skip
    return samples


def _evaluation_folder(data_dir: Path) -> Path:
    """A class-folder directory; a DATA root with train/val(/test) means its test, else val, split."""
    subdirs = {p.name for p in data_dir.iterdir() if p.is_dir()} if data_dir.is_dir() else set()
    if "train" in subdirs and subdirs & {"test", *VAL_DIR_NAMES}:
        for name in ("test", *VAL_DIR_NAMES):
            if name in subdirs:
                return data_dir / name
    return data_dir


def evaluate(
    run: str | Path | TransferModel,
    data_dir: str | Path,
    batch_size: int = 32,
    num_workers: int | None = None,
    precision: str | None = None,
    compile: bool = False,
    tta: bool = False,
    calibrated: bool = True,
    data_options: dict[str, Any] | None = None,
) -> Evaluation:
    """Accuracy, per-class precision/recall/F1 and confusion matrix of a trained model on a folder
    (or a label file's test rows, else its val rows, else, in a file without splits, every row).

    ``data_options`` read a label file as ``train`` does (``labels`` with ``data_dir`` the image
    folder, its columns, ``exclude``: :data:`transferkit.discovery.DATA_OPTIONS`); columns left
    unnamed are read by the run's own names where the file has them (:func:`~transferkit.runs.with_run_columns`).

    ``tta``: average each image's probabilities over :data:`~transferkit.prediction.TTA_VIEWS`, and
    measure the plain evaluation too: the result's ``tta`` holds both accuracies, the gain and the
    time each took. ``calibrated=False`` leaves out the temperature fitted after training.

    >>> result = evaluate("runs/my-run", "data/val")  # doctest: +SKIP
    >>> result.accuracy
    """
    members = fold_models(run)
    model = members[0] if members else run if isinstance(run, TransferModel) else load_checkpoint(run)
    own = _runs_own_split(run, data_dir, data_options)
    if own is not None:
        samples = relabelled(own.test or own.val, own.class_names, model.class_names, own.root)
        skipped = len(own.skipped)
    elif data_options or Path(data_dir).suffix.lower() in LABEL_FILE_SUFFIXES or is_url(str(data_dir)):  # URL: shards
        samples, skipped = _held_out_rows(model, data_dir, with_run_columns(run, data_dir, data_options))
    else:
        folder = _evaluation_folder(Path(data_dir).expanduser())
        _, samples, bad = scan_class_folder(folder, model.class_names)
        if not samples:
            raise TransferkitError(f"no images found in {folder}; give a folder with one sub-folder per class")
        skipped = len(bad)
    samples = _labels_as_the_model_reads_them(model, samples, data_dir)
    runner = ensemble(members, precision, compile, calibrated) if members else \
        EagerRunner(model, None, precision, compile, calibrated)  # fmt: skip
    evaluated_on = None if own is None else (
        f"the run's {'test' if own.test else 'validation'} images of {data_dir}, drawn as it drew them (it trained on "
        f"{len(own.train)} others)")  # fmt: skip
    if not tta:
        plain = evaluate_samples(model, samples, batch_size, num_workers, skipped=skipped, runner=runner)
        plain.evaluated_on = evaluated_on
        return plain
    # A batch first, untimed: the plain pass would pay alone what both share (first forwards, the loader).
    predict_samples(runner, samples[:batch_size], batch_size, num_workers, warn_undecodable=False)
    passes = []
    for each in (runner, AugmentedRunner(runner, TTA_VIEWS)):
        started = time.perf_counter()
        result = predict_samples(each, samples, batch_size, num_workers, warn_undecodable=each is runner)
        seconds = time.perf_counter() - started
        passes.append((_evaluated(model, samples, result, skipped, each.thresholds), seconds))
    (plain, plain_seconds), (augmented, seconds) = passes
    augmented.tta = {"views": list(TTA_VIEWS), "accuracy_without": plain.accuracy, "loss_without": plain.loss,
                     "accuracy_gain": augmented.accuracy - plain.accuracy, "seconds_without": round(plain_seconds, 2),
                     "seconds_with": round(seconds, 2), "cost": round(seconds / max(plain_seconds, 1e-9), 2)}  # fmt: skip
    augmented.evaluated_on = evaluated_on
    return augmented


def _runs_own_split(run: Any, data: str | Path, options: dict[str, Any] | None) -> ImageFolderSplits | None:
    """The run's splits, where ``data`` (and its label file) is the very data ``run`` trained on and the run
    drew its validation images from it (``--val-split``): every image of it would count those it trained on."""
    config = run_json(run, CONFIG_NAME)
    if config is None:  # a model object, or no (or a damaged) config.json: every image given is evaluated
        return None

    given = {"labels": None, **(options or {})}  # read otherwise than the run read it: not the run's split
    if not same_data(str(data), config.get("data")) or not all(same_data(v, config.get(k)) for k, v in given.items()):
        return None
    k_fold = config.get("folds") or (config.get("resolved_from") or {}).get("fold_images")
    recorded = (run_json(run, METRICS_NAME) or {}).get("data") or {}
    if not k_fold and "split" not in recorded.get("layout", "split"):  # its own val/ folder: read as any folder
        return None
    with warnings.catch_warnings(record=True) as said:  # said again below only if this reading is the one used
        warnings.simplefilter("always")
        splits = discover_for(config)
    if k_fold and not splits.test:
        # The folds pool training and validation images, each split its own way: none is held out from all.
        warnings.warn(f"{data} is the data this k-fold run (or fold of one) trained on: most of its images "
                      f"trained the model, so this accuracy overstates; its metrics.json holds the k-fold "
                      f"estimate", stacklevel=3)  # fmt: skip
        return None
    counts = {k: recorded[k] for k in ("train_counts", "val_counts") if k in recorded}
    if counts and counts != {k: splits.summary()[k] for k in counts}:
        warnings.warn(f"{data} has changed since the run trained on it (its images per class differ): its "
                      f"validation images cannot be drawn again, so every image given is evaluated",
                      stacklevel=3)  # fmt: skip
        return None
    if "split" not in splits.layout:  # its own validation (or test) folder: read as any folder is
        return None
    for warning in said:  # a skipped file, as the data's reading said it
        warnings.warn(warning.message, warning.category, stacklevel=3)
    return splits


def _held_out_rows(
    model: TransferModel, data: str | Path, options: dict[str, Any] | None
) -> tuple[list[Sample], int]:  # fmt: skip
    """A label file's test rows, else its val rows, else (no row split) every row, labelled by the model's classes."""
    from .discovery import every_image

    found = every_image(data, options)
    by_split: dict[str, list[Sample]] = {}
    for sample, split in zip(found.samples, found.splits):
        by_split.setdefault(split, []).append(sample)
    if not ({"test", "val"} & set(by_split) or set(by_split) == {"all"}):
        raise TransferkitError(f"{found.root} has no test or val rows to evaluate on (training rows would "
                               f"overstate the accuracy); mark some rows test or val, or give held-out images")
    chosen = by_split.get("test") or by_split.get("val") or by_split["all"]
    return relabelled(chosen, found.class_names, model.class_names, found.root), len(found.skipped)


def predict(
    run: str | Path | TransferModel,
    paths: list[str | Path | Any] | str | Path | Any,
    top_k: int = 3,
    batch_size: int = 32,
    num_workers: int | None = None,
    precision: str | None = None,
    compile: bool = False,
    runtime: str = "auto",
    tta: bool = False,
    calibrated: bool = True,
) -> list[dict[str, Any]]:
    """Top-k labels with probabilities for each image: ``[{"path", "predictions": [{"label", "probability"}]}]``.

    ``paths``: image files, folders, label files listing images, packed shards, or images in memory
    (PIL images, ``uint8`` arrays H x W or H x W x 3), answered under their file name or ``<image N>``.

    An image that cannot be decoded gets ``"error"`` instead of predictions. ``runtime``: ``torch``
    (eager PyTorch), ``onnx`` (ONNX Runtime on ``run`` if it is an ``.onnx`` file, else on the run's
    ``model.onnx`` if exported from its ``model.pt`` as it is now, else on a verified export made once
    into the cache), or ``auto``: ONNX Runtime where it is installed and the model runs on the CPU
    with neither ``precision`` nor ``compile`` asked for and the run's precision resolves to fp32
    there (eager bf16 is faster where the CPU has it), provided an export exists or there are at
    least 256 images; its forward is 1.3-1.8x eager PyTorch's on a CPU (benchmarks/throughput.py).
    """
    if top_k < 1:
        raise TransferkitError(f"--top-k must be at least 1, got {top_k}")
    with images_as_files(paths) as (given, names):
        files = collect_images(given)
        runner = runner_for(run, runtime, len(files), precision, compile, calibrated, tta)
        result = predict_samples(runner, files, batch_size, num_workers)
        results = top_k_results(files, result.by_position(), runner.class_names, top_k, runner.thresholds)
        reasons = {bad.path: bad.reason for bad in result.bad}
        results = [{**r, "error": why_not_predicted(r["path"], reasons.get(r["path"]))} if r.get("error") else r
                   for r in results]  # fmt: skip
    return [{**r, "path": names.get(r["path"], r["path"])} for r in results]


def format_predictions(results: list[dict[str, Any]]) -> str:
    width = min(60, max(len(r["path"]) for r in results))
    lines = []
    for r in results:
        path = r["path"] if len(r["path"]) <= width else "…" + r["path"][-(width - 1) :]
        if r.get("error"):
            lines.append(f"{path:<{width}}  ERROR: {r['error']}")
            continue
        preds = "  ".join(f"{p['label']} {p['probability']:.1%}" for p in r["predictions"])
        lines.append(f"{path:<{width}}  {preds}")
    return "\n".join(lines)
