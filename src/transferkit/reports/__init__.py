"""Reports a person reads: curves, confusion matrix, image grids, an HTML page per run, run comparisons.

>>> from transferkit.reports import write_report, load_run, format_comparison
>>> write_report("runs/my-run")  # doctest: +SKIP
PosixPath('runs/my-run/report.html')
>>> print(format_comparison([load_run("runs/a"), load_run("runs/b")]))  # doctest: +SKIP

Where things are:

- ``transferkit.runs``: a run directory read back (:class:`Run`, :func:`load_run`), shared with training.
- :mod:`.figures`: every figure (matplotlib's Agg canvas, never pyplot) and the images they show.
- :mod:`.drawing`: which figures a run's report gets, drawn into a folder.
- :mod:`.html`: the HTML page of one run; a new section is one function plus one entry in ``SECTIONS``.
- :mod:`.compare`: runs side by side, as a terminal table and as an HTML page with a plot.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas attached explicitly, never
through pyplot: no display is needed, no GUI backend is ever chosen, and a notebook's own pyplot
backend is left alone (``matplotlib.use("Agg")`` would switch it for the whole process).
"""

from __future__ import annotations

from ..runs import Run, load_run
from .compare import COMPARE_INCHES, comparison_rows, format_comparison, plot_comparison, write_comparison
from .figures import (
    ANNOTATE_MAX_CLASSES,
    CURVES_INCHES,
    DPI,
    GRID_COLUMNS,
    PREDICTION_SAMPLES,
    TICK_LABELS_MAX_CLASSES,
    TILE_INCHES,
    TOP_LOSSES,
    TRAINING_SAMPLES,
    Prediction,
    Tile,
    denormalise,
    plot_confusion_matrix,
    plot_curves,
    plot_tiles,
    predict_samples,
    prediction_tiles,
    predictions_of,
    top_losses,
    training_tiles,
)
from .drawing import FIGURES
from .html import CSS, REPORT_DIR, REPORT_NAME, SECTIONS, STRATEGY_NOTES, write_report

__all__ = [
    "ANNOTATE_MAX_CLASSES", "COMPARE_INCHES", "CSS", "CURVES_INCHES", "DPI", "FIGURES", "GRID_COLUMNS",
    "PREDICTION_SAMPLES", "REPORT_DIR", "REPORT_NAME", "SECTIONS", "STRATEGY_NOTES", "TICK_LABELS_MAX_CLASSES",
    "TILE_INCHES", "TOP_LOSSES", "TRAINING_SAMPLES",
    "Prediction", "Run", "Tile",
    "comparison_rows", "denormalise", "format_comparison", "load_run", "plot_comparison", "plot_confusion_matrix",
    "plot_curves", "plot_tiles", "predict_samples", "prediction_tiles", "predictions_of", "top_losses",
    "training_tiles", "write_comparison", "write_report",
]  # fmt: skip
