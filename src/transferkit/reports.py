"""Reports a person reads: curves, confusion matrix, image grids, an HTML page per run, run comparisons.

>>> from transferkit.reports import write_report, load_run, format_comparison
>>> write_report("runs/my-run")  # doctest: +SKIP
PosixPath('runs/my-run/report.html')
>>> print(format_comparison([load_run("runs/a"), load_run("runs/b")]))  # doctest: +SKIP

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas attached explicitly, never
through pyplot: no display is needed, no GUI backend is ever chosen, and a notebook's own pyplot
backend is left alone (``matplotlib.use("Agg")`` would switch it for the whole process).
"""

from __future__ import annotations

import csv
import html
import itertools
import json
import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .backbones import Preprocessing
from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .files import atomic_write
from .data import ImageFolderSplits, Sample, build_transform, discover, load_image
from .errors import TransferkitError
from .model import TransferModel
from .inference import Evaluation, evaluate_samples
from .strategies import DEFAULT_LR_DECAY

REPORT_NAME = "report.html"
REPORT_DIR = "report"
# Every PNG a report may hold; a regenerated report first removes them, so none is ever stale.
FIGURES = {
    "curves": "curves.png",
    "confusion": "confusion_matrix.png",
    "augmented": "training_samples.png",
    "predictions": "val_predictions.png",
    "top_losses": "top_losses.png",
}
DPI = 100
CURVES_INCHES = (15.0, 4.0)
COMPARE_INCHES = (15.0, 5.0)
# Grid tiles: a square image plus a two-line title above it; at DPI 100 one tile is 180 x 220 pixels.
TILE_INCHES = (1.8, 2.2)
TILE_MARGIN = 0.06
GRID_COLUMNS = 8
TRAINING_SAMPLES = 16
PREDICTION_SAMPLES = 24
TOP_LOSSES = 8
# Beyond these class counts, cell numbers and then tick labels would overprint each other.
ANNOTATE_MAX_CLASSES = 20
TICK_LABELS_MAX_CLASSES = 60
RIGHT, WRONG = "#1a7f37", "#cf222e"

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

T = TypeVar("T")


# --------------------------------------------------------------------------- a run directory


@dataclass
class Run:
    """What a finished run directory holds, read back: the config, the metrics and the per-epoch history."""

    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory written by ``transferkit train``; a one-line error says what is missing."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise TransferkitError(f"run directory {path} does not exist; give a folder written by transferkit train")
    missing = [n for n in ("config.json", "metrics.json") if not (path / n).is_file()]
    if missing:
        raise TransferkitError(
            f"{path} is not a finished transferkit run (no {' or '.join(missing)}); "
            "give a folder written by transferkit train"
        )
    history = path / "history.csv"
    return Run(path, _read_json(path / "config.json"), _read_json(path / "metrics.json"),
               _read_history(history) if history.is_file() else [])  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TransferkitError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None
    if not isinstance(value, dict):
        raise TransferkitError(f"{path} does not hold a JSON object; the run directory is damaged")
    return value


def _read_history(path: Path) -> list[dict[str, Any]]:
    def value(key: str, text: str) -> Any:
        if key == "trainable_groups":
            return text
        if text == "":
            return None
        return int(float(text)) if key in ("epoch", "trainable_params") else float(text)

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: value(k, v or "") for k, v in row.items()} for row in csv.DictReader(f)]


def _series(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


# --------------------------------------------------------------------------- figures


def _figure(inches: tuple[float, float], layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=inches, dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    # No bbox_inches="tight": the PNG keeps exactly figsize x DPI pixels, which the page lays out by.
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def plot_curves(run: Run, path: Path) -> Path:
    """Loss, accuracy (train vs val) and learning rate per epoch; unfreeze events and the best epoch marked."""
    fig = _figure(CURVES_INCHES)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    epochs = _series(run.history, "epoch")
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.plot(epochs, _series(run.history, f"train_{metric}"), "-o", markersize=3, label="train")
        ax.plot(epochs, _series(run.history, f"val_{metric}"), "-s", markersize=3, label="val")
        ax.set(title=metric, xlabel="epoch", ylabel=metric)
    # steps-post: the rate holds until the next epoch's value replaces it, so each change shows as a step.
    ax_lr.plot(epochs, _series(run.history, "lr"), "-o", markersize=3, drawstyle="steps-post", color="tab:green")
    ax_lr.set(title="learning rate (head group)", xlabel="epoch", ylabel="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    best = run.metrics.get("best_epoch")
    val_accuracy = dict(zip(epochs, _series(run.history, "val_accuracy")))
    if best is not None and best in val_accuracy:
        ax_acc.plot([best], [val_accuracy[best]], "*", markersize=14, color="gold", markeredgecolor="black",
                    label=f"best (epoch {best})")  # fmt: skip
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for event in run.metrics.get("unfreeze_events") or []:
            # The group trains from event["epoch"] on: the line sits on the boundary before it.
            x = event["epoch"] - 0.5
            ax.axvline(x, linestyle="--", color="tab:purple", alpha=0.7)
            ax.text(x, 0.98, " +" + ", ".join(event["unfrozen"]), transform=ax.get_xaxis_transform(),
                    rotation=90, va="top", ha="right", fontsize=8, color="tab:purple")  # fmt: skip
    ax_loss.legend()
    ax_acc.legend()
    return _save(fig, path)


def plot_confusion_matrix(class_names: Sequence[str], matrix: Sequence[Sequence[int]], path: Path) -> Path:
    """Counts and row-normalised (each true class sums to 1; recall on the diagonal), side by side."""
    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    n = len(class_names)
    panel = min(20.0, max(4.5, 1.5 + 0.45 * n))
    fig = _figure((2 * panel, panel))
    for ax, values, title, fmt, top in zip(
        fig.subplots(1, 2),
        (counts, normalised),
        ("counts", "row-normalised (recall on the diagonal)"),
        ("{:.0f}", "{:.2f}"),
        (max(1.0, counts.max()), 1.0),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top)
        colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
        if values is counts:
            colorbar.locator = MaxNLocator(integer=True)
        ax.set(title=title, xlabel="predicted", ylabel="true")
        if n <= TICK_LABELS_MAX_CLASSES:
            labels = [_short(c, 16) for c in class_names]
            ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
            ax.set_yticks(range(n), labels)
        if n <= ANNOTATE_MAX_CLASSES:
            for (i, j), v in np.ndenumerate(values):
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9,
                        color="white" if v > top / 2 else "black")  # fmt: skip
    return _save(fig, path)


@dataclass
class Tile:
    """One image of a grid: pixels (H, W, 3 uint8), a title, and whether it marks a right or wrong prediction."""

    image: np.ndarray
    title: str
    correct: bool | None = None


def plot_tiles(tiles: Sequence[Tile], path: Path) -> Path:
    """A grid of images with titles; wrong predictions framed and titled in red, right ones in green."""
    if not tiles:
        raise ValueError("plot_tiles needs at least one tile")
    columns = min(len(tiles), GRID_COLUMNS)
    rows = math.ceil(len(tiles) / columns)
    width, height = columns * TILE_INCHES[0], rows * TILE_INCHES[1]
    fig = _figure((width, height), layout=None)
    # Fixed tile geometry instead of a layout engine: every tile is the same size, and constrained
    # layout would spend most of the drawing time measuring dozens of identical titles.
    side = TILE_INCHES[0] - 2 * TILE_MARGIN
    for i, tile in enumerate(tiles):
        row, column = divmod(i, columns)
        left = column * TILE_INCHES[0] + TILE_MARGIN
        bottom = height - (row + 1) * TILE_INCHES[1] + TILE_MARGIN
        ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.imshow(tile.image)
        colour = "black" if tile.correct is None else RIGHT if tile.correct else WRONG
        ax.set_title(tile.title, fontsize=8, color=colour)
        for spine in ax.spines.values():
            spine.set_visible(tile.correct is not None)
            spine.set_color(colour)
            spine.set_linewidth(3 if tile.correct is False else 1.5)
    return _save(fig, path)


# --------------------------------------------------------------------------- images as the model sees them


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised (…, 3, H, W) tensors back to displayable (…, H, W, 3) uint8 arrays.

    ``mean``/``std`` must be the backbone's own (its ``Preprocessing``): ImageNet's constants would
    show an EfficientNet-Lite or a mean = std = 0.5 MobileNet's inputs in the wrong colours.
    """
    m = torch.tensor(mean, dtype=images.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(3, 1, 1)
    pixels = ((images * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.movedim(-3, -1).numpy()


def _view(path: str, transform: Callable[[torch.Tensor], torch.Tensor], prep: Preprocessing) -> np.ndarray | None:
    try:
        image = load_image(path)
    except Exception as exc:  # an unreadable file leaves a gap in a grid, never ends the report
        warnings.warn(f"report: skipping {path}: cannot decode ({type(exc).__name__}: {exc})", stacklevel=2)
        return None
    return denormalise(transform(image), prep.mean, prep.std)


def _spread(items: Sequence[T], label: Callable[[T], int], count: int, seed: int) -> list[T]:
    """Up to ``count`` items in a seeded order with the classes taking turns, so that every class shows."""
    rng = random.Random(seed)
    by_class: dict[int, list[T]] = {}
    for item in items:
        by_class.setdefault(label(item), []).append(item)
    queues = [by_class[k] for k in sorted(by_class)]
    for queue in queues:
        rng.shuffle(queue)
    turns = itertools.chain.from_iterable(itertools.zip_longest(*queues))
    return [item for item in turns if item is not None][:count]


def training_tiles(
    samples: Sequence[Sample], class_names: Sequence[str], prep: Preprocessing, augment: str,
    count: int = TRAINING_SAMPLES, seed: int = 0,
) -> list[Tile]:  # fmt: skip
    """Training images after ``augment`` and normalisation, de-normalised with the backbone's mean/std."""
    transform = build_transform(prep, augment)
    tiles = []
    # A private RNG stream: the same run shows the same crops, and the caller's torch RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for path, label in _spread(samples, lambda s: s[1], count, seed):
            image = _view(path, transform, prep)
            if image is not None:
                tiles.append(Tile(image, _short(class_names[label], 22)))
    return tiles


@dataclass
class Prediction:
    """The model's verdict on one labelled image."""

    path: str
    label: int
    predicted: int
    probability: float  # of the predicted class
    true_probability: float  # of the true class

    @property
    def correct(self) -> bool:
        return self.predicted == self.label

    @property
    def loss(self) -> float:
        """Cross-entropy of this image: large when the model was confident and wrong."""
        return -math.log(max(self.true_probability, 1e-12))


def predict_samples(model: TransferModel, samples: Sequence[Sample], batch_size: int = 32) -> list[Prediction]:
    """Predictions on labelled samples, by ``transferkit evaluate`` itself (same view, same precision)."""
    try:
        return predictions_of(evaluate_samples(model, list(samples), batch_size))
    except TransferkitError:  # not one image decodes: an empty grid, not a failed report
        return []


def predictions_of(evaluation: Evaluation) -> list[Prediction]:
    """:class:`Prediction` records from an evaluation (no second pass over the images)."""
    index = {name: i for i, name in enumerate(evaluation.class_names)}
    return [Prediction(p["path"], index[p["label"]], index[p["predicted"]], p["probability"], p["true_probability"])
            for p in evaluation.predictions]  # fmt: skip


def top_losses(predictions: Sequence[Prediction], count: int = TOP_LOSSES) -> list[Prediction]:
    """The ``count`` images with the highest loss, highest first: the most confidently wrong lead (fastai's)."""
    return sorted(predictions, key=lambda p: p.loss, reverse=True)[:count]


def prediction_tiles(
    predictions: Sequence[Prediction], class_names: Sequence[str], prep: Preprocessing, with_loss: bool = False
) -> list[Tile]:
    """Evaluation views titled "predicted probability / true label" (and the loss for top-losses grids)."""
    transform = build_transform(prep, "none")
    tiles = []
    for p in predictions:
        image = _view(p.path, transform, prep)
        if image is None:
            continue
        title = f"{_short(class_names[p.predicted], 14)} {p.probability:.0%}\ntrue: {_short(class_names[p.label], 14)}"
        if with_loss:
            title = f"{_short(class_names[p.predicted], 10)} / {_short(class_names[p.label], 10)}\n" \
                    f"loss {p.loss:.2f} · p(true) {p.true_probability:.2f}"  # fmt: skip
        tiles.append(Tile(image, title, p.correct))
    return tiles


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# --------------------------------------------------------------------------- the HTML report


@dataclass
class _Images:
    """What the image sections found: captions of the grids written, predictions, or why they are missing."""

    captions: dict[str, str]
    predictions: list[Prediction]
    note: str | None = None


def write_report(
    run_dir: str | Path, splits: ImageFolderSplits | None = None, val_predictions: list[Prediction] | None = None
) -> Path:
    """Write ``RUN_DIR/report.html`` and its figures in ``RUN_DIR/report/``; returns the HTML's path.

    ``splits`` (the run's data, as ``transferkit.data.discover`` found it) and ``val_predictions``
    (the checkpoint's, as :func:`predictions_of` makes them from an evaluation) save scanning the
    data folder and predicting it again when the caller has them. Without the data folder or
    ``model.pt`` the report still shows everything else, and says what it could not show.
    """
    run = load_run(run_dir)
    figures = run.path / REPORT_DIR
    figures.mkdir(exist_ok=True)
    for name in FIGURES.values():
        (figures / name).unlink(missing_ok=True)
    if run.history:
        plot_curves(run, figures / FIGURES["curves"])
    if run.metrics.get("val_confusion_matrix"):
        plot_confusion_matrix(run.metrics["class_names"], run.metrics["val_confusion_matrix"],
                              figures / FIGURES["confusion"])  # fmt: skip
    images = _image_figures(run, figures, splits, val_predictions)
    page = _render_report(run, images)
    path = run.path / REPORT_NAME
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def _image_figures(
    run: Run, figures: Path, splits: ImageFolderSplits | None, val_predictions: list[Prediction] | None = None
) -> _Images:
    cfg = run.config
    try:
        model = load_checkpoint(run.path / CHECKPOINT_NAME)
        splits = splits or discover(cfg["data"], cfg.get("val_split", 0.2), cfg.get("seed", 0))
    except TransferkitError as exc:
        return _Images({}, [], f"image grids not drawn: {exc}")
    if splits.class_names != model.class_names:
        return _Images({}, [], f"image grids not drawn: the classes in {splits.root} ({', '.join(splits.class_names)}) "
                               f"are no longer the model's ({', '.join(model.class_names)})")  # fmt: skip
    prep = model.preprocessing
    names = model.class_names
    captions: dict[str, str] = {}
    augment = _training_augmentation(run)
    tiles = training_tiles(splits.train, names, prep, augment, seed=cfg.get("seed", 0))
    if tiles:
        plot_tiles(tiles, figures / FIGURES["augmented"])
        captions["augmented"] = _augmentation_caption(run, augment, prep)
    predictions = val_predictions or predict_samples(model, splits.val, cfg.get("batch_size", 32))
    shown = _spread(predictions, lambda p: p.label, PREDICTION_SAMPLES, cfg.get("seed", 0))
    for key, chosen, with_loss in (("predictions", shown, False), ("top_losses", top_losses(predictions), True)):
        tiles = prediction_tiles(chosen, names, prep, with_loss)
        if tiles:
            plot_tiles(tiles, figures / FIGURES[key])
    wrong = sum(not p.correct for p in predictions)
    captions["predictions"] = (
        f"{len(shown)} of {len(predictions)} validation images, every class in turn: predicted class and its "
        f"probability over the true class; mistakes in red ({wrong} of {len(predictions)} in all)."
    )
    captions["top_losses"] = (
        "The images with the highest loss (−log of the probability given to the true class), highest first: "
        "the most confidently wrong lead; titles read predicted / true."
    )
    return _Images({k: v for k, v in captions.items() if (figures / FIGURES[k]).is_file()}, predictions)


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


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else _e(value)


def _seconds(value: Any) -> str:
    if value is None:
        return "—"
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)} min {seconds:.1f} s" if minutes else f"{seconds:.1f} s"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class={'num' if i >= numeric_from else 'txt'}>{cell}</td>"
                         for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _definitions(items: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _json_html(value: Any) -> str:
    """Any JSON value as nested lists: the advice entry's shape is not fixed, so none is assumed."""
    if isinstance(value, dict):
        return _definitions([(str(k).replace("_", " "), _json_html(v)) for k, v in value.items()])
    if isinstance(value, list):
        return "<ul>" + "".join(f"<li>{_json_html(v)}</li>" for v in value) + "</ul>"
    return _number(value)


def _figure_html(run: Run, key: str, alt: str, caption: str = "") -> str:
    rel = f"{REPORT_DIR}/{FIGURES[key]}"
    if not (run.path / rel).is_file():
        return ""
    return (f'<figure><img src="{_e(rel)}" alt="{_e(alt)}">'
            + (f"<figcaption>{_e(caption)}</figcaption>" if caption else "") + "</figure>")  # fmt: skip


def _render_report(run: Run, images: _Images) -> str:
    m = run.metrics
    sections = [
        ("Summary", _summary_html(run)),
        ("Data", _data_html(m.get("data") or {})),
        ("Backbone and strategy", _strategy_html(run)),
        ("Training curves", _curves_html(run)),
        ("Metrics", _metrics_html(run)),
        ("Images", _images_html(run, images)),
        ("Time taken", _time_html(run)),
    ]
    body = "".join(f'<section id="{title.lower().split()[0]}"><h2>{_e(title)}</h2>{content}</section>'
                   for title, content in sections)  # fmt: skip
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


def _summary_html(run: Run) -> str:
    m = run.metrics
    cards = [
        ("validation accuracy", _number(m.get("val_accuracy"))),
        ("validation loss", _number(m.get("val_loss"))),
        ("test accuracy", _number(m.get("test_accuracy"))) if "test_accuracy" in m else None,
        ("best epoch", f"{_number(m.get('best_epoch'))} of {_number(m.get('epochs_run', len(run.history)))} run"),
        ("total time", _seconds(m.get("total_seconds"))),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="label">{_e(k)}</div><div class="value">{v}</div></div>'
        for k, v in filter(None, cards)
    ) + "</div>"  # fmt: skip


def _data_html(data: dict[str, Any]) -> str:
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


def _strategy_html(run: Run) -> str:
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


def _curves_html(run: Run) -> str:
    if not run.history:
        return "<p>No per-epoch history in this run (no history.csv).</p>"
    figure = _figure_html(run, "curves", "loss, accuracy and learning rate per epoch",
                          "Train vs validation per epoch; dashed lines: layer groups unfrozen; star: best epoch "
                          "(the checkpoint kept).")  # fmt: skip
    keys = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "trainable_params",
            "trainable_groups", "seconds")  # fmt: skip
    rows = [[_number(r.get(k), 6 if k == "lr" else 4) for k in keys] for r in run.history]
    return figure + f"<details><summary>history.csv</summary>{_table(list(keys), rows, numeric_from=0)}</details>"


def _metrics_html(run: Run) -> str:
    m = run.metrics
    parts = []
    for split in ("val", "test"):
        per_class = m.get(f"{split}_per_class")
        if not per_class:
            continue
        rows = [[_e(name), _number(v["precision"], 3), _number(v["recall"], 3), _number(v["f1"], 3),
                 _number(int(v["support"]))] for name, v in per_class.items()]  # fmt: skip
        title = "validation" if split == "val" else "test"
        at = f", network run at {m['evaluation_precision']}" if m.get("evaluation_precision") else ""
        parts.append(f"<h3>Per class, {title} (accuracy {_number(m.get(f'{split}_accuracy'))}{_e(at)})</h3>"
                     + _table(["class", "precision", "recall", "F1", "support"], rows))  # fmt: skip
    parts.append(_figure_html(run, "confusion", "confusion matrix",
                              "Validation confusion matrix: rows are true classes, columns predicted."))  # fmt: skip
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


def _time_html(run: Run) -> str:
    m = run.metrics
    epoch_seconds = [r["seconds"] for r in run.history if r.get("seconds") is not None]
    items = [
        ("computing cached features", _seconds(m.get("feature_seconds"))) if "feature_seconds" in m else None,
        ("training (with data scan and features)", _seconds(m.get("train_seconds"))),
        ("per epoch, mean", _seconds(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else "—"),
        ("total, with the final evaluation", _seconds(m.get("total_seconds"))),
    ]
    return _definitions([i for i in items if i is not None])


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:1560px;
margin:0 auto;padding:0 24px 40px}
header{border-bottom:1px solid #d0d7de;margin-bottom:8px}h1{margin:16px 0 4px;font-size:26px}
h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}h3{margin:20px 0 8px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #d0d7de;padding:3px 10px}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{font-weight:600}dd{margin:0}
dd ul,li ul{margin:0;padding-left:18px}
img{max-width:100%;height:auto;border:1px solid #eaeef2}figure{margin:8px 0}
figcaption{color:#59636e;font-size:13px;max-width:900px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px}
.card .label{color:#59636e;font-size:12px}.card .value{font-size:20px;font-weight:600}
.advice{background:#ddf4ff;border-radius:6px;padding:4px 14px}.note{background:#fff8c5;padding:8px 12px}
code{font-size:13px;background:#f6f8fa;padding:1px 4px;border-radius:4px}
footer{margin-top:40px;color:#59636e;font-size:13px}
"""


# --------------------------------------------------------------------------- comparing runs


def _labels(runs: Sequence[Run]) -> list[str]:
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r.path) for r in runs]


def comparison_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row of headline numbers per run, in the order given."""
    return [
        {
            "run": label,
            "model": r.metrics.get("model", r.config.get("model")),
            "strategy": r.metrics.get("strategy", r.config.get("strategy")),
            "trainable_params": r.metrics.get("trainable_params"),
            "epochs": r.metrics.get("epochs_run", len(r.history)),
            "best_epoch": r.metrics.get("best_epoch"),
            "val_accuracy": r.metrics.get("val_accuracy"),
            "val_loss": r.metrics.get("val_loss"),
            "test_accuracy": r.metrics.get("test_accuracy"),
            "train_seconds": r.metrics.get("train_seconds"),
            "total_seconds": r.metrics.get("total_seconds"),
        }
        for label, r in zip(_labels(runs), runs)
    ]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if key.endswith("seconds") else f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_comparison(runs: Sequence[Run]) -> str:
    """The comparison as an aligned plain-text table, for a terminal."""
    rows = comparison_rows(runs)
    header = list(rows[0]) if rows else []
    cells = [header] + [[_cell(k, row[k]) for k in header] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    text = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
        for line in cells
    ]
    return "\n".join(text)


def plot_comparison(runs: Sequence[Run], path: Path) -> Path:
    """Validation accuracy per epoch, final accuracies and time per run, side by side."""
    labels = [f"{label}\n({r.metrics.get('strategy', r.config.get('strategy'))})"
              for label, r in zip(_labels(runs), runs)]  # fmt: skip
    fig = _figure(COMPARE_INCHES)
    ax_curve, ax_acc, ax_time = fig.subplots(1, 3)
    for label, r in zip(labels, runs):
        ax_curve.plot(_series(r.history, "epoch"), _series(r.history, "val_accuracy"), "-o", markersize=3,
                      label=label.replace("\n", " "))  # fmt: skip
    ax_curve.set(title="validation accuracy per epoch", xlabel="epoch", ylabel="accuracy")
    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.legend(fontsize=8)
    x = np.arange(len(runs))
    has_test = any("test_accuracy" in r.metrics for r in runs)
    width = 0.4 if has_test else 0.6
    val = [r.metrics.get("val_accuracy") or 0.0 for r in runs]
    ax_acc.bar(x - (width / 2 if has_test else 0), val, width, label="validation")
    if has_test:
        ax_acc.bar(x + width / 2, [r.metrics.get("test_accuracy") or 0.0 for r in runs], width, label="test")
    for xi, v in zip(x, val):
        ax_acc.text(xi - (width / 2 if has_test else 0), v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax_acc.set(title="accuracy of the kept checkpoint", ylabel="accuracy", ylim=(0, 1.08))
    ax_acc.legend(fontsize=8)
    features = np.array([r.metrics.get("feature_seconds") or 0.0 for r in runs])
    train = np.array([r.metrics.get("train_seconds") or 0.0 for r in runs])
    total = np.array([r.metrics.get("total_seconds") or 0.0 for r in runs])
    ax_time.bar(x, features, 0.6, label="cached features")
    ax_time.bar(x, np.maximum(train - features, 0), 0.6, bottom=features, label="rest of training")
    ax_time.bar(x, np.maximum(total - train, 0), 0.6, bottom=np.maximum(train, features), label="final evaluation")
    ax_time.set(title="time", ylabel="seconds")
    ax_time.legend(fontsize=8)
    for ax in (ax_acc, ax_time):
        ax.set_xticks(x, labels, fontsize=8)
    return _save(fig, path)


def write_comparison(runs: Sequence[Run], out: str | Path) -> Path:
    """An HTML page comparing ``runs`` at ``out``, its plot beside it as ``<stem>_plot.png``; returns ``out``."""
    out = Path(out).expanduser()
    plot = plot_comparison(runs, out.with_name(f"{out.stem}_plot.png"))
    rows = comparison_rows(runs)
    header = list(rows[0])
    cells = [[_e(_cell(k, row[k])) for k in header] for row in rows]
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>transferkit: {len(runs)} runs compared</title><style>{CSS}</style></head>
<body>
<header><h1>{len(runs)} runs compared</h1></header>
<section>{_table(header, cells, numeric_from=3)}</section>
<section><figure><img src="{_e(plot.name)}" alt="validation accuracy, accuracy and time per run"></figure></section>
<footer>{"".join(f"<div><code>{_e(r.path)}</code></div>" for r in runs)}</footer>
</body>
</html>
"""
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out
