"""Runs side by side: a plain-text table for a terminal, an HTML page with a plot.

>>> from transferkit.reports import format_comparison, load_run, write_comparison
>>> print(format_comparison([load_run("runs/a"), load_run("runs/b")]))  # doctest: +SKIP
>>> write_comparison([load_run("runs/a"), load_run("runs/b")], "compare.html")  # doctest: +SKIP
PosixPath('compare.html')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import MaxNLocator

from ..files import atomic_write
from ..runs import METRICS_NAME, Run, read_json
from .figures import _figure, _save, _series, literal_text
from .markup import CSS
from .markup import escape as _e
from .markup import table as _table

COMPARE_INCHES = (15.0, 5.0)


def _labels(runs: Sequence[Run]) -> list[str]:
    names = [r.name for r in runs]
    labels = names if len(set(names)) == len(names) else [str(r.path) for r in runs]
    return [f"{label} ({len(r.metrics['fold_runs'])}-fold mean)" if _is_k_fold(r) else label
            for label, r in zip(labels, runs)]  # fmt: skip


def _is_k_fold(run: Run) -> bool:
    return bool(run.metrics.get("fold_runs"))


def _fold_metrics(run: Run) -> list[dict[str, Any]]:
    """A k-fold run's folds' own metrics (its history and parameter count are theirs); [] where unreadable."""
    folds = [run.path / name / METRICS_NAME for name in run.metrics.get("fold_runs", [])]
    return [read_json(path) for path in folds if path.is_file()]


def _epochs(run: Run, folds: list[dict[str, Any]]) -> int | None:
    if _is_k_fold(run):  # the folds' longest (early stopping may end one sooner)
        return max((f["epochs_run"] for f in folds if "epochs_run" in f), default=None)
    return run.metrics.get("epochs_run", len(run.history))


def _trainable(run: Run, folds: list[dict[str, Any]]) -> int | None:
    """The most parameters the run trained at once: a gradual run's count after its last unfreeze,
    not the head's alone at the start (its metrics.json's ``trainable_params``)."""
    counts = [row["trainable_params"] for row in run.history if isinstance(row.get("trainable_params"), int)]
    return max(counts, default=run.metrics.get("trainable_params", next(iter(folds), {}).get("trainable_params")))


def comparison_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row of headline numbers per run, in the order given (a k-fold run's: its folds' mean)."""
    folds = [_fold_metrics(r) for r in runs]
    return [
        {
            "run": label,
            "model": r.metrics.get("model", r.config.get("model")),
            "strategy": r.metrics.get("strategy", r.config.get("strategy")),
            "trainable_params": _trainable(r, f),
            "epochs": _epochs(r, f),
            "best_epoch": r.metrics.get("best_epoch"),
            "val_accuracy": r.metrics.get("val_accuracy"),
            "val_loss": r.metrics.get("val_loss"),
            "test_accuracy": r.metrics.get("test_accuracy"),
            "train_seconds": r.metrics.get("train_seconds"),
            "total_seconds": r.metrics.get("total_seconds"),
        }
        for label, r, f in zip(_labels(runs), runs, folds)
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
    labels = [literal_text(f"{label}\n({r.metrics.get('strategy', r.config.get('strategy'))})")
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
