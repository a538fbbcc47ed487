"""Figures of a report: training curves, confusion matrix, image grids, and the images they show.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas attached explicitly, never
through pyplot: no display is needed, no GUI backend is ever chosen, and a notebook's own pyplot
backend is left alone (``matplotlib.use("Agg")`` would switch it for the whole process).
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from matplotlib.ticker import MaxNLocator

from ..backbones import Preprocessing
from ..data import Sample, build_transform, first_label, label_indices, load_image, shuffled_by_class
from ..errors import TransferkitError
from ..files import atomic_write
from ..inference import Evaluation, evaluate_samples
from ..model import TransferModel
from ..runs import Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
CURVES_INCHES = (15.0, 4.0)
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

T = TypeVar("T")


def _series(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


def _figure(inches: tuple[float, float], layout: str | None = "constrained") -> Figure:
    # Imported here: a report draws its charts in a second process, so the command's own never needs
    # matplotlib's figures and axes (0.3 s of start-up).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=inches, dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _margins(
    fig: Figure, left: float, right: float, bottom: float, top: float, columns: int = 1, gap: float = 0.0
) -> dict[str, float]:
    """Subplot margins (and the gap between ``columns``) in inches, as gridspec's figure fractions.

    For charts whose labels have a known size (numbers, fixed words): a constrained layout measures
    every tick label twice over, a third of a chart's drawing time.
    """
    width, height = fig.get_size_inches()
    panel = (width - left - right - gap * (columns - 1)) / columns
    return {"left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height,
            "wspace": gap / panel}


def _save(fig: Figure, path: Path) -> Path:
    # A class name in a script DejaVu Sans lacks is drawn as boxes (the page has its text): matplotlib's
    # warning per missing glyph would reach the user's terminal from the report's process.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        # savefig lays out a figure that has a layout engine with a draw of its own before the real one;
        # laid out here once and then fixed, it is drawn once (the same pixels, a third less time).
        engine = fig.get_layout_engine()
        if engine is not None:
            engine.execute(fig)
            fig.set_layout_engine(None)
        # No bbox_inches="tight": the PNG keeps exactly figsize x DPI pixels, which the page lays out by.
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return path


def plot_curves(run: Run, path: Path) -> Path:
    """Loss, accuracy (train vs val) and learning rate per epoch; unfreeze events and the best epoch marked."""
    fig = _figure(CURVES_INCHES, layout=None)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3, gridspec_kw=_margins(fig, 0.75, 0.2, 0.55, 0.35, columns=3, gap=0.95))
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


def selection_score_name(selection: dict[str, Any]) -> str:
    """What scored ``--strategy auto``'s candidates (its metrics' ``selection``): macro-F1 for imbalanced classes."""
    return "holdout accuracy" if selection.get("metric", "accuracy") == "accuracy" else "holdout macro-F1"


def plot_selection(selection: dict[str, Any], path: Path) -> Path:
    """Each measured candidate of ``--strategy auto``: its holdout score against the seconds it took."""
    fig = _figure((7.0, 4.5))
    ax = fig.subplots()
    score = selection_score_name(selection)
    done = [t for t in selection["leaderboard"] if t.get("score") is not None]
    for strategy in dict.fromkeys(t["strategy"] for t in done):
        rows = [t for t in done if t["strategy"] == strategy]
        ax.scatter([t["seconds"] for t in rows], [t["score"] for t in rows], label=strategy, s=40)
    if done:
        best = done[0]  # the leaderboard is ranked
        ax.annotate(f"chosen: {best['backbone']} {best['strategy']}", (best["seconds"], best["score"]),
                    textcoords="offset points", xytext=(6, -12), fontsize=8)  # fmt: skip
    ax.set(title=f"candidates: {score} against time", xlabel="seconds (measured)", ylabel=score)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reliability(calibration: dict[str, Any], path: Path) -> Path:
    """Reliability diagram: accuracy of the top answer against its confidence, before and after calibration."""
    fig = _figure((5.5, 4.5), layout=None)
    ax = fig.subplots(gridspec_kw=_margins(fig, 0.75, 0.2, 0.55, 0.35))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    for key, label in (("before", "network's softmax"), ("after", f"T = {calibration['temperature']:.3g}")):
        curve = calibration["reliability"][key]
        ece = calibration[f"ece_{key}"]
        ax.plot(curve["confidence"], curve["accuracy"], marker="o", label=f"{label} (ECE {ece:.3f})")
    ax.set(xlim=(0, 1.02), ylim=(0, 1.02), xlabel="confidence of the top answer", ylabel="share right",
           title=f"calibration on {calibration['fitted_on']} predictions")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
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
        ("counts", "row-normalised\n(recall on the diagonal)"),
        ("{:.0f}", "{:.2f}"),
        (max(1.0, counts.max()), 1.0),
    ):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top)
        colorbar = fig.colorbar(image, ax=ax, shrink=0.8)
        if values is counts:
            colorbar.locator = MaxNLocator(integer=True)
        ax.set(title=title, xlabel="predicted", ylabel="true")
        if n <= TICK_LABELS_MAX_CLASSES:
            labels = [literal_text(_short(c, 16)) for c in class_names]
            slanted = n > 4 or any(len(c) > 6 for c in class_names)  # long names side by side would overlap
            ax.set_xticks(range(n), labels, rotation=45 if slanted else 0, ha="right" if slanted else "center")
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
    """A grid of images with titles; wrong predictions framed and titled in red, right ones in green.

    Pasted and lettered with PIL rather than drawn as matplotlib axes: the same picture, but one
    axes per tile made the image grids most of a short run's report time (1.8 s of 2.3 s measured).
    """
    if not tiles:
        raise ValueError("plot_tiles needs at least one tile")
    columns = min(len(tiles), GRID_COLUMNS)
    rows = math.ceil(len(tiles) / columns)
    tile_w, tile_h = round(TILE_INCHES[0] * DPI), round(TILE_INCHES[1] * DPI)
    margin, side = round(TILE_MARGIN * DPI), round((TILE_INCHES[0] - 2 * TILE_MARGIN) * DPI)
    canvas = Image.new("RGB", (columns * tile_w, rows * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    font = _title_font()
    for i, tile in enumerate(tiles):
        row, column = divmod(i, columns)
        left, bottom = column * tile_w + margin, (row + 1) * tile_h - margin
        box = (left, bottom - side, left + side, bottom)
        picture = Image.fromarray(tile.image).resize((side, side), Image.Resampling.BILINEAR)
        canvas.paste(picture, box[:2])
        colour = "black" if tile.correct is None else RIGHT if tile.correct else WRONG
        if tile.correct is not None:
            draw.rectangle(box, outline=colour, width=3 if tile.correct is False else 2)
        draw.multiline_text((left + side / 2, box[1] - 3), tile.title, fill=colour, font=font, anchor="md",
                            align="center", spacing=2)  # fmt: skip
    # zlib's fastest level: photos barely compress further (13 % smaller at the default level 6,
    # measured on a report's grid), and the default took 3.5x as long to write.
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG", compress_level=1))
    return path


@functools.cache
def _title_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """matplotlib's own DejaVu Sans (it ships with it: titles read as in the other figures), 8 pt at DPI."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), round(8 * DPI / 72))


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
    queues = shuffled_by_class(items, label, seed)
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
        torch.random.default_generator.manual_seed(seed)  # the CPU's alone, which fork_rng gives back
        for path, label in _spread(samples, first_label, count, seed):
            image = _view(path, transform, prep)
            if image is not None:
                tiles.append(Tile(image, _short(", ".join(class_names[i] for i in label_indices(label)), 22)))
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
    if evaluation.multi_label:  # several labels an image: the grids (one verdict an image) do not apply
        return []
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
        if image is not None:
            tiles.append(Tile(image, prediction_title(p, class_names, with_loss), p.correct))
    return tiles


def prediction_title(p: Prediction, class_names: Sequence[str], with_loss: bool = False) -> str:
    if with_loss:
        return (f"{_short(class_names[p.predicted], 10)} / {_short(class_names[p.label], 10)}\n"
                f"loss {p.loss:.2f} · p(true) {p.true_probability:.2f}")  # fmt: skip
    return f"{_short(class_names[p.predicted], 14)} {p.probability:.0%}\ntrue: {_short(class_names[p.label], 14)}"


def literal_text(text: str) -> str:
    """``text`` as matplotlib shows it as written: a class named ``$5_to_$10`` is no TeX formula to parse."""
    return text.replace("$", r"\$")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
