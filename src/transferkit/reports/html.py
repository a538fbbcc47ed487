"""The HTML report of one run: ``RUN_DIR/report.html``, its figures in ``RUN_DIR/report/``.

The page is a list of sections, :data:`SECTIONS`, each a title and a function ``(run, images) -> str``
returning the section's HTML body. To add a section, write one such function below and add one
entry where it should appear; the section's id is the first word of its title, lower-cased.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..backbones import Preprocessing
from ..checkpoint import CHECKPOINT_NAME, load_checkpoint
from ..data import ImageFolderSplits, discover_for
from ..errors import TransferkitError
from ..files import atomic_write
from ..model import TransferModel
from ..performance import in_second_process
from ..runs import HISTORY_FIELDS, HISTORY_NAME, Run, load_run
from ..strategies import DEFAULT_LR_DECAY
from .explanations import EXPLANATION_FIGURES, Explained, draw_explanations, explanations_html
from .markup import CSS
from .markup import definitions as _definitions
from .markup import escape as _e
from .markup import json_html as _json_html
from .markup import number as _number
from .markup import seconds as _seconds
from .markup import table as _table
from .figures import (
    PREDICTION_SAMPLES,
    Prediction,
    _spread,
    plot_confusion_matrix,
    plot_curves,
    plot_reliability,
    plot_selection,
    plot_tiles,
    predict_samples,
    prediction_tiles,
    top_losses,
    training_tiles,
)  # fmt: skip

REPORT_NAME = "report.html"
REPORT_DIR = "report"
# Every PNG a report may hold; a regenerated report first removes them, so none is ever stale.
FIGURES = {
    "curves": "curves.png",
    "confusion": "confusion_matrix.png",
    "augmented": "training_samples.png",
    "predictions": "val_predictions.png",
    "top_losses": "top_losses.png",
    "selection": "selection.png",
    "reliability": "reliability.png",
    **EXPLANATION_FIGURES,
}
# What each strategy trains and when it fits (README's table): the "why" when no advice was recorded.
STRATEGY_NOTES = {
    "feature-extract": "trains the new head only, on the frozen backbone's features computed once and cached; "
    "the fast first try, fits little data similar to ImageNet",
    "linear-probe": "fits a scikit-learn linear classifier on the frozen backbone's features; "
    "fits little data similar to ImageNet",
    "fine-tune": "trains the last layer groups and the head, groups further from the head at smaller learning "
    "rates; fits more data, or data less like ImageNet",
    "full": "trains every layer; fits lots of data",
    "gradual": "trains the head first, then unfreezes one more group at a time, each at its own learning rate; "
    "fits medium data and protects the pretrained features early on",
}


@dataclass
class _Images:
    """What the image sections found: captions of the grids written, predictions, Grad-CAM's grids, or
    why they are missing."""

    captions: dict[str, str]
    predictions: list[Prediction]
    note: str | None = None
    explained: Explained = field(default_factory=Explained)


def write_report(
    run_dir: str | Path, splits: ImageFolderSplits | None = None, val_predictions: list[Prediction] | None = None,
    model: TransferModel | None = None,
) -> Path:
    """Write ``RUN_DIR/report.html`` and its figures in ``RUN_DIR/report/``; returns the HTML's path.

    ``splits`` (the run's data, as ``transferkit.data.discover`` found it), ``val_predictions``
    (the checkpoint's, as :func:`predictions_of` makes them from an evaluation) and ``model`` (the
    run's ``model.pt``, loaded) save scanning the data folder, predicting it and loading the
    checkpoint again when the caller has them. Without the data folder or
    ``model.pt`` the report still shows everything else, and says what it could not show.
    """
    run = load_run(run_dir)
    figures = run.path / REPORT_DIR
    figures.mkdir(exist_ok=True)
    for name in FIGURES.values():
        (figures / name).unlink(missing_ok=True)
    found = _model_and_data(run, splits, model)
    predictions = _val_predictions(found, val_predictions, run.config.get("batch_size", 32))
    # The charts and image grids need no model: a second process on the other core draws them,
    # while this one runs the model for Grad-CAM's grids.
    grids_drawn = in_second_process(_draw_charts_and_grids, run, figures, found, predictions)
    note = found if isinstance(found, str) else None
    try:
        explained = draw_explanations(run, None if note else found[0], predictions, note)
    finally:
        captions = grids_drawn()
    images = _Images(captions, predictions, note, explained)
    page = _render_report(run, images)
    path = run.path / REPORT_NAME
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def _model_and_data(
    run: Run, splits: ImageFolderSplits | None, model: TransferModel | None
) -> tuple[TransferModel, ImageFolderSplits] | str:
    """The run's model and data, or why the image grids cannot be drawn."""
    try:
        model = model or load_checkpoint(run.path / CHECKPOINT_NAME)
        splits = splits or discover_for(run.config)
    except TransferkitError as exc:
        return f"image grids not drawn: {exc}"
    if splits.class_names != model.class_names:
        return (f"image grids not drawn: the classes in {splits.root} ({', '.join(splits.class_names)}) are no "
                f"longer the model's ({', '.join(model.class_names)})")  # fmt: skip
    return model, splits


def _val_predictions(
    found: tuple[TransferModel, ImageFolderSplits] | str, given: list[Prediction] | None, batch_size: int
) -> list[Prediction]:
    if isinstance(found, str):
        return []
    model, splits = found
    if given is not None or model.multi_label:  # multi-label: the grids (one verdict an image) do not apply
        return given or []
    return predict_samples(model, splits.val, batch_size)


def _draw_charts_and_grids(
    run: Run, figures: Path, found: tuple[TransferModel, ImageFolderSplits] | str, predictions: list[Prediction]
) -> dict[str, str]:
    """The charts, and the image grids where the data is found (the model is not run); the grids' captions."""
    _draw_charts(run, figures)
    if isinstance(found, str):
        return {}
    model, splits = found
    prep, names, seed = model.preprocessing, model.class_names, run.config.get("seed", 0)
    augment = _training_augmentation(run)
    shown = _spread(predictions, lambda p: p.label, PREDICTION_SAMPLES, seed)
    wrong = sum(not p.correct for p in predictions)
    captions = {
        "augmented": _augmentation_caption(run, augment, prep),
        "predictions": f"{len(shown)} of {len(predictions)} validation images, every class in turn: predicted class "
        f"and its probability over the true class; mistakes in red ({wrong} of {len(predictions)} in all).",
        "top_losses": "The images with the highest loss (−log of the probability given to the true class), highest "
        "first: the most confidently wrong lead; titles read predicted / true.",
    }
    grids = {
        "augmented": training_tiles(splits.train, names, prep, augment, seed=seed),
        "predictions": prediction_tiles(shown, names, prep),
        "top_losses": prediction_tiles(top_losses(predictions), names, prep, with_loss=True),
    }
    for key, tiles in grids.items():
        if tiles:
            plot_tiles(tiles, figures / FIGURES[key])
    return {key: caption for key, caption in captions.items() if grids[key]}


def _draw_charts(run: Run, figures: Path) -> None:
    if len(run.history) > 1:  # one row (one epoch, a linear probe's one fit) makes no curve
        plot_curves(run, figures / FIGURES["curves"])
    if run.metrics.get("val_confusion_matrix"):
        plot_confusion_matrix(run.metrics["class_names"], run.metrics["val_confusion_matrix"],
                              figures / FIGURES["confusion"])  # fmt: skip
    if (run.metrics.get("selection") or {}).get("leaderboard"):
        plot_selection(run.metrics["selection"]["leaderboard"], figures / FIGURES["selection"])
    if run.metrics.get("calibration"):
        plot_reliability(run.metrics["calibration"], figures / FIGURES["reliability"])


def _training_augmentation(run: Run) -> str:
    # A frozen backbone with cached features trains on the views that were cached, which are plain
    # evaluation views unless several augmented views were asked for: show what the head really saw.
    cache = run.metrics.get("feature_cache")
    return cache.get("augment", "none") if isinstance(cache, dict) else run.config.get("augment", "none")


def _augmentation_caption(run: Run, augment: str, prep: Preprocessing) -> str:
    source = f"--augment {augment}"
    if isinstance(run.metrics.get("feature_cache"), dict) and augment != run.config.get("augment"):
        source = (f"the cached evaluation views (features were cached with --views "
                  f"{run.metrics['feature_cache'].get('views', 1)}, so --augment {run.config.get('augment')} "
                  f"did not apply)")  # fmt: skip
    mean = ", ".join(f"{v:.3f}" for v in prep.mean)
    std = ", ".join(f"{v:.3f}" for v in prep.std)
    return (f"Training images as the model sees them: {prep.image_size} px after {source}, normalised with "
            f"the backbone's mean ({mean}) and std ({std}) and de-normalised with the same values for display.")


def _figure_html(run: Run, key: str, alt: str, caption: str = "") -> str:
    rel = f"{REPORT_DIR}/{FIGURES[key]}"
    if not (run.path / rel).is_file():
        return ""
    return (f'<figure><img src="{_e(rel)}" alt="{_e(alt)}">'
            + (f"<figcaption>{_e(caption)}</figcaption>" if caption else "") + "</figure>")  # fmt: skip


def _summary_html(run: Run, images: _Images) -> str:
    m = run.metrics
    cards = [
        ("validation accuracy", _number(m.get("val_accuracy"))),
        ("validation loss", _number(m.get("val_loss"))),
        ("balanced accuracy · macro-F1", f"{_number(m.get('val_balanced_accuracy'))} · {_number(m.get('val_macro_f1'))}")
        if "val_macro_f1" in m else None,
        ("test accuracy", _number(m.get("test_accuracy"))) if "test_accuracy" in m else None,
        ("best epoch", f"{_number(m.get('best_epoch'))} of {_number(m.get('epochs_run', len(run.history)))} run"
                       + (" (by macro-F1: imbalanced classes)" if _chosen_by_f1(m) else "")),
        ("total time", _seconds(m.get("total_seconds"))),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{_e(k)}</div><div class="value">{v}</div></div>'
        for k, v in filter(None, cards)
    ) + "</div>"  # fmt: skip


def _chosen_by_f1(metrics: dict[str, Any]) -> bool:
    return (metrics.get("balance") or {}).get("selection_metric") == "val_macro_f1"


def _data_html(run: Run, images: _Images) -> str:
    data: dict[str, Any] = run.metrics.get("data") or {}
    classes = data.get("classes") or []
    splits = [s for s in ("train", "val", "test") if data.get(f"{s}_counts")]
    rows = [[_e(c)] + [_number(data[f"{s}_counts"].get(c, 0)) for s in splits] for c in classes]
    rows.append(["<strong>total</strong>"] + [f"<strong>{_number(sum(data[f'{s}_counts'].values()))}</strong>"
                                              for s in splits])  # fmt: skip
    parts = [
        _definitions([("folder", f"<code>{_e(data.get('root', '?'))}</code>"), ("layout", _e(data.get("layout", "?"))),
                      ("classes", _number(len(classes)))]),  # fmt: skip
        _table(["class", *splits], rows),
    ]
    skipped = data.get("skipped") or []
    count = data.get("skipped_files", len(skipped))
    if count:
        items = "".join(f"<li><code>{_e(s.get('path'))}</code>: {_e(s.get('reason'))}</li>" for s in skipped)
        parts.append(f"<details><summary>{_number(count)} skipped files</summary><ul>{items}</ul></details>")
    else:
        parts.append("<p>No file was skipped.</p>")
    return "".join(parts)


def _strategy_html(run: Run, images: _Images) -> str:
    m, cfg = run.metrics, run.config
    strategy = m.get("strategy", cfg.get("strategy", "?"))
    trainable, total = m.get("trainable_params"), m.get("total_params")
    share = f" ({trainable / total:.2%})" if isinstance(trainable, int) and total else ""
    decay = cfg.get("lr_decay") or DEFAULT_LR_DECAY.get(strategy)
    training = (f"{cfg.get('optimizer')}, lr {cfg.get('lr')} (×{decay} per group away from the head), "
                f"scheduler {cfg.get('scheduler')}, batch size {cfg.get('batch_size')}, {cfg.get('epochs')} epochs, "
                f"augmentation {cfg.get('augment')}, precision {m.get('precision', cfg.get('precision'))}")  # fmt: skip
    items = [
        ("backbone", f"<code>{_e(m.get('model', cfg.get('model')))}</code>, "
                     f"weights <code>{_e(m.get('weights', cfg.get('weights')))}</code>"),
        ("head", _e(cfg.get("head", "?"))),
        ("strategy", f"<strong>{_e(strategy)}</strong>: {_e(STRATEGY_NOTES.get(strategy, ''))}"),
        ("trainable parameters", f"{_number(trainable)} of {_number(total)}{share} at the start"),
        ("training", _e(training)),
    ]  # fmt: skip
    if cfg.get("unfreeze") is not None:
        items.insert(3, ("unfreeze", _e(cfg["unfreeze"])))
    events = m.get("unfreeze_events") or []
    if events:
        unfrozen = "".join(f"<li>epoch {_number(e['epoch'])}: {_e(', '.join(e['unfrozen']))}</li>" for e in events)
        items.append(("unfrozen during training", f"<ul>{unfrozen}</ul>"))
    if "linear_probe" in m:
        items.append(("linear probe", _json_html(m["linear_probe"])))
    parts = [_definitions(items)]
    if "advice" in m:
        parts.append(_advice_html(m["advice"]))
    return "".join(parts)


def _advice_html(advice: Any) -> str:
    """The recommendation and its reasons up front; every measurement behind it folded away."""
    if not (isinstance(advice, dict) and isinstance(advice.get("reasons"), list)):
        return f'<div class="advice"><h3>Why this strategy: advice</h3>{_json_html(advice)}</div>'
    scenario = f" ({advice['size']} dataset, {advice['domain']} to the pretraining data)" \
        if advice.get("size") and advice.get("domain") else ""  # fmt: skip
    reasons = "".join(f"<li>{_e(r)}</li>" for r in advice["reasons"])
    return (f'<div class="advice"><h3>Why this strategy: advice</h3>'
            f"<p>recommended <strong>{_e(advice.get('strategy', '?'))}</strong>{_e(scenario)}</p><ul>{reasons}</ul>"
            f"<details><summary>measurements</summary>{_json_html(advice)}</details></div>")  # fmt: skip


def _curves_html(run: Run, images: _Images) -> str:
    if not run.history:
        return f"<p>No per-epoch history in this run (no {HISTORY_NAME}).</p>"
    rows = [[_number(r.get(k), 6 if k == "lr" else 4) for k in HISTORY_FIELDS] for r in run.history]
    table = _table(list(HISTORY_FIELDS), rows, numeric_from=0)
    if len(run.history) == 1:
        return (f"<p>One row, so no curve to draw (a single epoch, or a linear probe's one fit); its numbers "
                f"({HISTORY_NAME}):</p>{table}")  # fmt: skip
    figure = _figure_html(run, "curves", "loss, accuracy and learning rate per epoch",
                          "Train vs validation per epoch; dashed lines: layer groups unfrozen; star: best epoch "
                          "(the checkpoint kept).")  # fmt: skip
    return figure + f"<details><summary>{HISTORY_NAME}</summary>{table}</details>"


def _metrics_html(run: Run, images: _Images) -> str:
    m = run.metrics
    parts = []
    for split in ("val", "test"):
        per_class = m.get(f"{split}_per_class")
        if not per_class:
            continue
        # Multi-label: each class's own threshold and average precision stand in for a confusion matrix.
        extra = ("threshold", "average_precision") if m.get("multi_label") else ()
        rows = [[_e(name), _number(v["precision"], 3), _number(v["recall"], 3), _number(v["f1"], 3),
                 _number(int(v["support"]))] + [_number(v.get(k), 3) for k in extra]
                for name, v in per_class.items()]  # fmt: skip
        title = "validation" if split == "val" else "test"
        at = f", network run at {m['evaluation_precision']}" if m.get("evaluation_precision") else ""
        headline = (f"exact-match accuracy {_number(m.get(f'{split}_accuracy'))}, mAP "
                    f"{_number(m.get(f'{split}_mean_average_precision'))}" if m.get("multi_label")
                    else f"accuracy {_number(m.get(f'{split}_accuracy'))}")  # fmt: skip
        parts.append(f"<h3>Per class, {title} ({headline}{_e(at)})</h3>"
                     + _table(["class", "precision", "recall", "F1", "support", *extra], rows))  # fmt: skip
    parts.append(_figure_html(run, "confusion", "confusion matrix",
                              "Validation confusion matrix: rows are true classes, columns predicted."))  # fmt: skip
    c = m.get("calibration")
    if c:
        parts.append(f"<h3>Calibration (temperature {_number(c['temperature'], 3)}, fitted on {_e(c['fitted_on'])} "
                     f"predictions)</h3>" + _table(["", "expected calibration error", "negative log-likelihood"], [
                         ["the network's softmax", _number(c["ece_before"]), _number(c["nll_before"])],
                         ["calibrated", _number(c["ece_after"]), _number(c["nll_after"])]])
                     + _figure_html(run, "reliability", "reliability diagram", "Of the answers given at each "
                                    "confidence, the share that is right: on the diagonal, a probability means what "
                                    "it says."))  # fmt: skip
    return "".join(parts)


def _images_html(run: Run, images: _Images) -> str:
    if images.note:
        return f'<p class="note">{_e(images.note)}</p>'
    parts = []
    for key, title in (("augmented", "Training images after augmentation"), ("predictions", "Validation predictions"),
                       ("top_losses", "Top losses: the most confidently wrong")):  # fmt: skip
        if key in images.captions:
            parts.append(f"<h3>{_e(title)}</h3>" + _figure_html(run, key, title, images.captions[key]))
    mistakes = [p for p in images.predictions if not p.correct]
    if mistakes:
        names = run.metrics.get("class_names") or []
        rows = [[f"<code>{_e(p.path)}</code>", _e(names[p.label] if p.label < len(names) else p.label),
                 _e(names[p.predicted] if p.predicted < len(names) else p.predicted), _number(p.probability, 3),
                 _number(p.loss, 3)] for p in sorted(mistakes, key=lambda p: p.loss, reverse=True)]  # fmt: skip
        parts.append(f"<details><summary>All {len(mistakes)} mistakes</summary>"
                     + _table(["file", "true", "predicted", "probability", "loss"], rows, numeric_from=3)
                     + "</details>")  # fmt: skip
    elif images.predictions:
        parts.append("<p>No validation image was misclassified.</p>")
    return "".join(parts)


def _time_html(run: Run, images: _Images) -> str:
    m = run.metrics
    epoch_seconds = [r["seconds"] for r in run.history if r.get("seconds") is not None]
    items = [
        ("computing cached features", _seconds(m.get("feature_seconds"))) if "feature_seconds" in m else None,
        ("training (with data scan and features)", _seconds(m.get("train_seconds"))),
        ("per epoch, mean", _seconds(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else "—"),
        ("total, with the final evaluation", _seconds(m.get("total_seconds"))),
    ]
    return _definitions([i for i in items if i is not None])


def _selection_html(run: Run, images: _Images) -> str:
    """``--strategy auto``'s leaderboard: every candidate measured on held-out training images."""
    selection = run.metrics.get("selection")
    if not isinstance(selection, dict):
        return "<p>The strategy was given, not measured (<code>--strategy auto</code> measures candidates).</p>"
    rows = [[_number(i + 1), _e(t["backbone"]), _e(t["strategy"]), _e(t.get("layer") or t.get("unfreeze") or ""),
             _number(t.get("score")), _number(t.get("seconds"), 1), _number(t.get("images_per_s"), 1),
             _e(t["status"] + (f": {t['note']}" if t.get("note") else ""))]
            for i, t in enumerate(selection.get("leaderboard", []))]  # fmt: skip
    summary = (f"<p>{_number(len(rows))} candidates scored on {_number(selection.get('holdout_images'))} held-out "
               f"training images (the validation images were not used to choose), in "
               f"{_number(selection.get('used_seconds'), 1)} s of a {_number(selection.get('budget_seconds'), 1)} s "
               f"budget. Reproduce the winner: <code>{_e(selection.get('command', ''))}</code></p>")  # fmt: skip
    table = _table(["rank", "backbone", "strategy", "layer / unfreeze", "holdout accuracy", "seconds", "images/s",
                    "status"], rows, numeric_from=4)  # fmt: skip
    return summary + table + _figure_html(run, "selection", "holdout accuracy against time per candidate")


# The report's sections in page order: a title (its first word, lower-cased, is the section's id)
# and the function that writes the section's body. A new section is one function above and one entry here.
SECTIONS: list[tuple[str, Callable[[Run, _Images], str]]] = [
    ("Summary", _summary_html),
    ("Data", _data_html),
    ("Backbone and strategy", _strategy_html),
    ("Selection", _selection_html),
    ("Training curves", _curves_html),
    ("Metrics", _metrics_html),
    ("Images", _images_html),
    ("Where the model looked (Grad-CAM)", explanations_html),
    ("Time taken", _time_html),
]


def _render_report(run: Run, images: _Images) -> str:
    m = run.metrics
    body = "".join(f'<section id="{title.lower().split()[0]}"><h2>{_e(title)}</h2>{section(run, images)}</section>'
                   for title, section in SECTIONS)  # fmt: skip
    generated = datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>transferkit report: {_e(run.name)}</title>
<style>{CSS}</style>
</head>
<body>
<header><h1>{_e(run.name)}</h1>
<p>{_e(m.get("model", run.config.get("model", "?")))} · weights {_e(m.get("weights", run.config.get("weights", "?")))}
 · {_e(m.get("strategy", run.config.get("strategy", "?")))} · validation accuracy
 <strong>{_number(m.get("val_accuracy"))}</strong></p></header>
{body}
<footer>Generated {generated} by transferkit. Regenerate with <code>transferkit report {_e(run.path)}</code>.</footer>
</body>
</html>
"""
