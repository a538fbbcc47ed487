"""Every figure of one run's report, drawn into a folder: the charts (from the run's files) and the
image grids (from its model and data), the charts and grids in a second process while this one runs
Grad-CAM. :mod:`.html` renders the page around them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..backbones import Preprocessing
from ..checkpoint import CHECKPOINT_NAME, load_checkpoint
from ..data import ImageFolderSplits, discover_for
from ..errors import TransferkitError
from ..model import TransferModel
from ..performance import in_second_process
from ..runs import Run
from .explanations import EXPLANATION_FIGURES, Explained, draw_explanations
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

# Every PNG a report may hold; a regenerated report removes those it did not draw again, so none is ever stale.
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


@dataclass
class DrawnFigures:
    """What the figures' drawing found: the folder they were drawn in, captions of the grids written,
    predictions, Grad-CAM's grids, or why they are missing."""

    figures: Path
    captions: dict[str, str]
    predictions: list[Prediction]
    note: str | None = None
    explained: Explained = field(default_factory=Explained)


def draw_figures(
    run: Run, figures: Path, splits: ImageFolderSplits | None, val_predictions: list[Prediction] | None,
    model: TransferModel | None,
) -> DrawnFigures:  # fmt: skip
    """Every figure of the report, drawn into ``figures``; what the sections need to show them."""
    found = _model_and_data(run, splits, model)
    predictions = _val_predictions(found, val_predictions, run.config.get("batch_size", 32))
    # The charts and image grids need no model: a second process on the other core draws them,
    # while this one runs the model for Grad-CAM's grids.
    grids_drawn = in_second_process(_draw_charts_and_grids, run, figures, found, predictions)
    note = found if isinstance(found, str) else None
    try:
        explained = draw_explanations(run, figures, None if note else found[0], predictions, note)
    finally:
        captions = grids_drawn()
    return DrawnFigures(figures, captions, predictions, note, explained)


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
        plot_selection(run.metrics["selection"], figures / FIGURES["selection"])
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
