"""k-fold estimates for small datasets: K stratified splits, K runs, each metric's mean ± std.

On a few hundred images one validation split can move accuracy by several points; K runs, each
validated on a different fifth (say) of the images and trained on the rest, say how far. The K
runs are ordinary run directories (``RUN/fold-1`` ...) beside the fold run's ``folds.json``,
``metrics.json`` (means and standard deviations) and ``compare.html``; ``predict`` and ``evaluate``
on the fold run average the folds' probabilities (an ensemble). With a frozen backbone the features
are computed once, by the first fold, and read from the cache by the others.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from .errors import TransferkitError
from .samples import Sample, first_label

FOLDS_NAME = "folds.json"
# Numbers summarised across folds (when a fold has them): the headline metrics and the calibration's.
SUMMARISED = ("val_accuracy", "val_loss", "val_balanced_accuracy", "val_macro_f1", "val_mean_average_precision",
              "val_micro_f1", "test_accuracy", "train_seconds", "total_seconds")  # fmt: skip


def stratified_folds(samples: list[Sample], k: int, seed: int = 0) -> list[tuple[list[Sample], list[Sample]]]:
    """(train, val) of each of ``k`` folds: every sample is validated on exactly once (scikit-learn's
    ``StratifiedKFold``, by first label for multi-label samples)."""
    from sklearn.model_selection import StratifiedKFold

    if k < 2:
        raise TransferkitError(f"--folds {k}: give at least 2 (5 is usual)")
    strata = [first_label(s) for s in samples]
    smallest = min(strata.count(c) for c in set(strata))
    if smallest < 2:  # each fold validates on an image of every class: no --folds serves a class of one
        raise TransferkitError(f"--folds {k}: the smallest class has 1 image, and k-fold needs at least 2 of "
                               "each class; add images to it or leave out --folds")  # fmt: skip
    if smallest < k:
        raise TransferkitError(f"--folds {k}: the smallest class has {smallest} image(s), fewer than the folds; "
                               f"lower --folds to {smallest} or add images")  # fmt: skip
    splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
    return [([samples[i] for i in train], [samples[i] for i in val])
            for train, val in splitter.split(samples, strata)]  # fmt: skip


def summarize_folds(fold_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """``KEY`` (the mean across folds) and ``KEY_std`` for each summarised number, plus the ECE after calibration."""
    summary: dict[str, Any] = {}
    rows = [{**m, "ece": (m.get("calibration") or {}).get("ece_after")} for m in fold_metrics]
    for key in (*SUMMARISED, "ece"):
        values = [float(m[key]) for m in rows if isinstance(m.get(key), (int, float))]
        if len(values) == len(rows):
            summary[key] = statistics.fmean(values)
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def fold_dirs(run: Any) -> list[Path] | None:
    """The fold runs of a k-fold run directory, or None when ``run`` is not one."""
    import json

    if not isinstance(run, (str, Path)):
        return None
    record = Path(run).expanduser() / FOLDS_NAME
    if not record.is_file():
        return None
    dirs = [record.parent / name for name in json.loads(record.read_text())["runs"]]
    missing = [d for d in dirs if not (d / "model.pt").is_file()]
    if missing:
        raise TransferkitError(f"fold run {missing[0]} has no model.pt (unfinished?); resume the k-fold run with "
                               f"transferkit train --resume {record.parent}")  # fmt: skip
    return dirs
