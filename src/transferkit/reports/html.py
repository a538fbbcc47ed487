"""The HTML report of one run: ``RUN_DIR/report.html``, its figures in ``RUN_DIR/report/``.

The page is a list of sections, :data:`SECTIONS`, each a title and a function ``(run, images) -> str``
returning the section's HTML body. To add a section, write one such function below and add one
entry where it should appear; the section's id is the first word of its title, lower-cased.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..data import ImageFolderSplits
from ..errors import TransferkitError
from ..files import atomic_write, remove_leftovers
from ..model import TransferModel
from ..runs import HISTORY_FIELDS, HISTORY_NAME, Run, load_run
from ..strategies import DEFAULT_LR_DECAY
from .drawing import FIGURES, DrawnFigures, draw_figures
from .explanations import explanations_html
from .figures import Prediction, selection_score_name
from .markup import CSS
from .markup import definitions as _definitions
from .markup import escape as _e
from .markup import json_html as _json_html
from .markup import number as _number
from .markup import seconds as _seconds
from .markup import table as _table

REPORT_NAME = "report.html"
REPORT_DIR = "report"
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
    if run.metrics.get("fold_runs"):  # no model and no history of its own: its folds' means
        first = run.path / run.metrics["fold_runs"][0]
        raise TransferkitError(f"{run.path} is a k-fold run: its folds are compared in {run.path / 'compare.html'}; "
                               f"report one fold's run, e.g. {first}")  # fmt: skip
    remove_leftovers(run.path, older_than_s=STALE_LEFTOVER_S)
    # Drawn beside the report first: until the new page replaces it, the old one keeps every figure it shows.
    staging = Path(tempfile.mkdtemp(prefix=f".{REPORT_DIR}-", suffix=".tmp", dir=run.path))
    try:
        page = _render_report(run, draw_figures(run, staging, splits, val_predictions, model))
        _replace_report(run.path, staging, page)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return run.path / REPORT_NAME


# A staging folder or temporary file this old in a run was left by a killed process (reports take seconds).
STALE_LEFTOVER_S = 3600


def _replace_report(run_dir: Path, staging: Path, page: str) -> None:
    """The new figures into ``report/``, then the new page, then the old figures the page no longer shows."""
    figures = run_dir / REPORT_DIR
    figures.mkdir(exist_ok=True)
    drawn = {png.name for png in staging.iterdir()}
    for name in drawn:
        os.replace(staging / name, figures / name)
    atomic_write(run_dir / REPORT_NAME, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    for name in set(FIGURES.values()) - drawn:
        (figures / name).unlink(missing_ok=True)


def _figure_html(images: DrawnFigures, key: str, alt: str, caption: str = "") -> str:
    if not (images.figures / FIGURES[key]).is_file():
        return ""
    return (f'<figure><img src="{_e(f"{REPORT_DIR}/{FIGURES[key]}")}" alt="{_e(alt)}">'
            + (f"<figcaption>{_e(caption)}</figcaption>" if caption else "") + "</figure>")  # fmt: skip


def _summary_html(run: Run, images: DrawnFigures) -> str:
    m = run.metrics
    trained_at, evaluated_at = str(m.get("precision", "")), str(m.get("evaluation_precision", ""))
    # The curves' epochs were validated at the training precision, the kept model at predict's: they may differ.
    differ = evaluated_at and trained_at and evaluated_at != trained_at
    at = f" (at {evaluated_at}, as predict runs it)" if differ else ""
    cards = [
        (f"validation accuracy{at}", _number(m.get("val_accuracy"))),
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


def _data_html(run: Run, images: DrawnFigures) -> str:
    data: dict[str, Any] = run.metrics.get("data") or {}
    classes = data.get("classes") or []
    splits = [s for s in ("train", "val", "test") if data.get(f"{s}_counts")]
    rows = [[_e(c)] + [_number(data[f"{s}_counts"].get(c, 0)) for s in splits] for c in classes]
    images = data.get("images") or {}
    if data.get("multi_label") and not images:  # a run from before the image counts were kept
        totals, total_name = [sum(data[f"{s}_counts"].values()) for s in splits], "labels"
    else:  # an image with several labels is one image
        totals, total_name = [images.get(s, sum(data[f"{s}_counts"].values())) for s in splits], "images"
    rows.append([f"<strong>{total_name}</strong>"] + [f"<strong>{_number(t)}</strong>" for t in totals])
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


def _strategy_html(run: Run, images: DrawnFigures) -> str:
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


def _learning_rate(value: Any) -> str:
    # Three significant digits: a cosine schedule's last LRs (2e-07) are not 0.000000.
    return f"{value:.3g}" if isinstance(value, float) else _number(value)


def _curves_html(run: Run, images: DrawnFigures) -> str:
    if not run.history:
        return f"<p>No per-epoch history in this run (no {HISTORY_NAME}).</p>"
    rows = [[_learning_rate(r.get(k)) if k == "lr" else _number(r.get(k)) for k in HISTORY_FIELDS]
            for r in run.history]  # fmt: skip
    table = _table(list(HISTORY_FIELDS), rows, numeric_from=0)
    if len(run.history) == 1:
        return (f"<p>One row, so no curve to draw (a single epoch, or a linear probe's one fit); its numbers "
                f"({HISTORY_NAME}):</p>{table}")  # fmt: skip
    figure = _figure_html(images, "curves", "loss, accuracy and learning rate per epoch",
                          "Train vs validation per epoch; dashed lines: layer groups unfrozen; star: best epoch "
                          "(the checkpoint kept).")  # fmt: skip
    return figure + f"<details><summary>{HISTORY_NAME}</summary>{table}</details>"


def _metrics_html(run: Run, images: DrawnFigures) -> str:
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
    parts.append(_figure_html(images, "confusion", "confusion matrix",
                              "Validation confusion matrix: rows are true classes, columns predicted."))  # fmt: skip
    c = m.get("calibration")
    if c:
        parts.append(f"<h3>Calibration (temperature {_number(c['temperature'], 3)}, fitted on {_e(c['fitted_on'])} "
                     f"predictions)</h3>" + _table(["", "expected calibration error", "negative log-likelihood"], [
                         ["the network's softmax", _number(c["ece_before"]), _number(c["nll_before"])],
                         ["calibrated", _number(c["ece_after"]), _number(c["nll_after"])]])
                     + _figure_html(images, "reliability", "reliability diagram", "Of the answers given at each "
                                    "confidence, the share that is right: on the diagonal, a probability means what "
                                    "it says."))  # fmt: skip
    return "".join(parts)


def _images_html(run: Run, images: DrawnFigures) -> str:
    if images.note:
        return f'<p class="note">{_e(images.note)}</p>'
    parts = []
    for key, title in (("augmented", "Training images after augmentation"), ("predictions", "Validation predictions"),
                       ("top_losses", "Top losses: the most confidently wrong")):  # fmt: skip
        if key in images.captions:
            parts.append(f"<h3>{_e(title)}</h3>" + _figure_html(images, key, title, images.captions[key]))
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


def _time_html(run: Run, images: DrawnFigures) -> str:
    m = run.metrics
    epoch_seconds = [r["seconds"] for r in run.history if r.get("seconds") is not None]
    items = [
        ("computing cached features", _seconds(m.get("feature_seconds"))) if "feature_seconds" in m else None,
        ("training (with data scan and features)", _seconds(m.get("train_seconds"))),
        ("per epoch, mean", _seconds(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else "—"),
        ("total, with the final evaluation", _seconds(m.get("total_seconds"))),
    ]
    return _definitions([i for i in items if i is not None])


def _selection_html(run: Run, images: DrawnFigures) -> str:
    """``--strategy auto``'s leaderboard: every candidate measured on held-out training images."""
    selection = run.metrics.get("selection")
    if not isinstance(selection, dict):
        return "<p>The strategy was given, not measured (<code>--strategy auto</code> measures candidates).</p>"
    rows = [[_number(i + 1), _e(t["backbone"]), _e(t["strategy"]), _e(t.get("layer") or t.get("unfreeze") or ""),
             _number(t.get("epochs")), _number(t.get("score")), _number(t.get("seconds"), 1),
             _number(t.get("images_per_s"), 1),
             _e(t["status"] + (f": {t['note']}" if t.get("note") else ""))]
            for i, t in enumerate(selection.get("leaderboard", []))]  # fmt: skip
    summary = (f"<p>{_number(len(rows))} candidates scored on {_number(selection.get('holdout_images'))} held-out "
               f"training images (the validation images were not used to choose), in "
               f"{_number(selection.get('used_seconds'), 1)} s of a {_number(selection.get('budget_seconds'), 1)} s "
               f"budget. Reproduce the winner: <code>{_e(selection.get('command', ''))}</code></p>")  # fmt: skip
    score = selection_score_name(selection)
    table = _table(["rank", "backbone", "strategy", "layer / unfreeze", "epochs", score, "seconds", "images/s",
                    "status"], rows, numeric_from=4)  # fmt: skip
    return summary + table + _figure_html(images, "selection", f"{score} against time per candidate")


# The report's sections in page order: a title (its first word, lower-cased, is the section's id)
# and the function that writes the section's body. A new section is one function above and one entry here.
SECTIONS: list[tuple[str, Callable[[Run, DrawnFigures], str]]] = [
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


def _render_report(run: Run, images: DrawnFigures) -> str:
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
