"""The report's "Where the model looked" section: Grad-CAM over the validation predictions and top losses.

The same images as the Images section's two grids, in the same order and with the same titles,
each under the heatmap of the class the model predicted (:func:`transferkit.gradcam.explain`,
one batch for both grids, whose evaluation views are the pictures). Where Grad-CAM cannot be drawn,
the section says why instead. The grids are drawn (:func:`draw_explanations`) while a second
process draws the Images section's, before any HTML is written.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import TransferkitError
from ..gradcam import explain, overlay
from ..model import TransferModel
from ..runs import Run
from .figures import PREDICTION_SAMPLES, Prediction, Tile, _spread, plot_tiles, prediction_title, top_losses

REPORT_DIR = "report"  # html.REPORT_DIR, which imports this module
# The figures this section draws, by key; drawing.FIGURES lists them so that a new report removes stale ones.
EXPLANATION_FIGURES = {
    "explained_predictions": "gradcam_predictions.png",
    "explained_top_losses": "gradcam_top_losses.png",
}


@dataclass
class Explained:
    """What :func:`draw_explanations` drew: the grids' keys and Grad-CAM's layer, or why nothing was drawn."""

    drawn: list[str] = field(default_factory=list)
    layer: str = ""
    note: str | None = None


class _ImageSections(Protocol):
    """What the report's drawing found (drawing.DrawnFigures): Grad-CAM's grids among them."""

    explained: Explained


def draw_explanations(
    run: Run, figures: Path, model: TransferModel | None, predictions: list[Prediction], images_note: str | None
) -> Explained:
    """Draw the two Grad-CAM grids into ``figures`` for the Images section's predictions (or say why not)."""
    if images_note or model is None:
        reason = (images_note or "no model").removeprefix("image grids not drawn: ")
        return Explained(note=f"Grad-CAM not drawn: {reason}")
    if not predictions:
        return Explained(note="Grad-CAM not drawn: no validation image has a single predicted class to explain "
                              "(a multi-label run's images can be explained with transferkit.explain).")  # fmt: skip
    shown = _spread(predictions, lambda p: p.label, PREDICTION_SAMPLES, run.config.get("seed", 0))
    grids = {"explained_predictions": (shown, False), "explained_top_losses": (top_losses(predictions), True)}
    try:
        drawn, layer = _draw(figures, model, grids)
    except TransferkitError as exc:
        return Explained(note=f"Grad-CAM not drawn: {exc}")
    return Explained(drawn, layer)


def explanations_html(run: Run, images: _ImageSections) -> str:
    """The section's HTML: the grids :func:`draw_explanations` drew, or its note."""
    explained = images.explained
    if explained.note:
        return _note(explained.note)
    captions = {
        "explained_predictions": "The validation predictions above, each under the Grad-CAM heatmap of its predicted "
        "class: red where the evidence for that class is strongest, blue where there is none.",
        "explained_top_losses": "The top losses above, each under the heatmap of the class it was given: for a wrong "
        "answer, where the model found its evidence (a background, a watermark or a neighbouring object there is a "
        "shortcut worth fixing in the data).",
    }
    titles = {"explained_predictions": "Validation predictions", "explained_top_losses": "Top losses"}
    parts = [f"<p>Grad-CAM (<code>grad-cam</code> package) at layer <code>{html.escape(explained.layer)}</code>, "
             f"normalised per image: the heatmaps show where the model looked, not how sure it was.</p>"]  # fmt: skip
    for key in explained.drawn:
        src = html.escape(f"{REPORT_DIR}/{EXPLANATION_FIGURES[key]}")
        parts.append(f"<h3>{titles[key]}</h3><figure><img src=\"{src}\" alt=\"Grad-CAM: {titles[key].lower()}\">"
                     f"<figcaption>{html.escape(captions[key])}</figcaption></figure>")  # fmt: skip
    return "".join(parts)


def _draw(figures: Path, model: TransferModel, grids: dict[str, tuple[Sequence[Prediction], bool]]) -> tuple[list[str], str]:
    """Explain every image of the grids once (one batch), then draw each grid; (keys drawn, layer)."""
    paths = list(dict.fromkeys(p.path for chosen, _ in grids.values() for p in chosen))
    predicted = {p.path: p.predicted for chosen, _ in grids.values() for p in chosen}
    # The class the grids' titles name: evaluate's answer, whatever precision it ran at.
    found = {e.path: e for e in explain(model, paths, target=[predicted[p] for p in paths], batch_size=32)}
    drawn = []
    for key, (chosen, with_loss) in grids.items():
        tiles = [Tile(overlay(found[p.path].image, found[p.path].heatmap),
                      prediction_title(p, model.class_names, with_loss), p.correct) for p in chosen]  # fmt: skip
        if tiles:
            plot_tiles(tiles, figures / EXPLANATION_FIGURES[key])
            drawn.append(key)
    return drawn, next(iter(found.values())).layer


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'
