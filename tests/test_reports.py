"""Reports: the figures decode at their sizes, the HTML page is self-contained and displays, the CLI works."""

from __future__ import annotations

import csv
import html
import json
import math
import re
import os
import shutil
import subprocess
import sys
import time
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_colour_folder
from PIL import Image
from torchvision.transforms import v2

import transferkit
from transferkit.backbones import Preprocessing
from transferkit.cli import build_parser, main
from transferkit.data import build_transform, discover, load_image
from transferkit.runs import HISTORY_FIELDS, HISTORY_NAME, read_history, write_history
from transferkit.reports import (
    FIGURES,
    REPORT_DIR,
    SECTIONS,
    denormalise,
    format_comparison,
    load_run,
    predict_samples,
    top_losses,
    write_report,
)  # fmt: skip

CHROMIUM = Path("/usr/bin/chromium")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _train(data: Path, out: Path, **options: object) -> Path:
    return transferkit.train(data, model="resnet18", weights="none", image_size=32, quiet=True, out=str(out),
                             **options).run_dir  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A feature-extract run (cached features) and a gradual one (augmented images, unfreeze events)."""
    root = tmp_path_factory.mktemp("report-runs")
    return {
        "feature-extract": _train(tiny_dataset, root / "fe", epochs=2),
        "gradual": _train(tiny_dataset, root / "gradual", strategy="gradual", epochs=3, lr=0.01),
    }


@pytest.fixture(scope="module")
def report(runs: dict[str, Path]) -> Path:
    return write_report(runs["gradual"])


class _References(HTMLParser):
    """Every URL-like attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data") and value is not None:
                self.urls.append(value)
                if tag == "img":
                    self.images.append(value)


def references(page: Path) -> _References:
    parser = _References()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_report_figures_decode_with_their_sizes(report: Path) -> None:
    figures = report.parent / REPORT_DIR
    expected = {
        "curves": (1500, 400),  # 15 x 4 in at 100 dpi
        "confusion": (900, 450),  # two 4.5 in panels for 2 classes
        "augmented": (1440, 440),  # 16 of the 20 training images: 2 rows of 8 tiles of 180 x 220
        "predictions": (1440, 220),  # all 8 validation images
        "top_losses": (1440, 220),  # the 8 highest losses
        "explained_predictions": (1440, 220),  # the same two grids under their Grad-CAM heatmaps
        "explained_top_losses": (1440, 220),
    }
    for key, size in expected.items():
        with Image.open(figures / FIGURES[key]) as im:
            im.verify()  # a complete, uncorrupted PNG
        with Image.open(figures / FIGURES[key]) as im:
            assert (im.format, im.size) == ("PNG", size), key
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.std() > 10, f"{key} is blank"


def test_report_refers_only_to_its_own_files(report: Path) -> None:
    refs = references(report)
    # Every figure but the leaderboard's, which only a --strategy auto run has (tests/test_selection.py).
    assert sorted(refs.images) == sorted(f"{REPORT_DIR}/{name}" for key, name in FIGURES.items() if key != "selection")
    for url in refs.urls:
        assert "://" not in url and not url.startswith(("/", "//", "data:")), url
        assert (report.parent / url).is_file(), url
    page = report.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page


def test_report_tells_the_story_of_the_run(report: Path, runs: dict[str, Path]) -> None:
    page = report.read_text(encoding="utf-8")
    metrics = json.loads((runs["gradual"] / "metrics.json").read_text())
    for text in (
        "<td class=txt>blue</td><td class=num>10</td><td class=num>4</td>",  # data: counts per class and split
        "No file was skipped",
        "resnet18",
        "<strong>gradual</strong>: trains the head first",  # strategy and why
        f"{metrics['trainable_params']:,} of {metrics['total_params']:,}",
        "epoch 1: layer4",  # unfreeze events
        f"{metrics['val_accuracy']:.4f}",
        "<th>precision</th><th>recall</th><th>F1</th><th>support</th>",
        "Time taken",
        f"transferkit report {runs['gradual']}",
    ):
        assert text in page, text


def test_report_sections_follow_the_section_list(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    found = re.findall(r'<section id="([^"]+)"><h2>([^<]*)</h2>', page)
    assert found == [(title.lower().split()[0], html.escape(title)) for title, _ in SECTIONS]
    assert [i for i, _ in found] == ["summary", "data", "backbone", "selection", "training", "metrics", "images", "where",
                                  "time"]


def test_history_written_by_a_run_reads_back_with_its_types(runs: dict[str, Path], tmp_path: Path) -> None:
    rows = read_history(runs["gradual"] / HISTORY_NAME)
    assert [list(r) for r in rows] == [list(HISTORY_FIELDS)] * 3
    assert [r["epoch"] for r in rows] == [0, 1, 2] and isinstance(rows[0]["trainable_params"], int)
    assert isinstance(rows[0]["val_accuracy"], float) and isinstance(rows[0]["trainable_groups"], str)
    write_history(tmp_path / HISTORY_NAME, rows)
    assert read_history(tmp_path / HISTORY_NAME) == rows
    write_history(tmp_path / HISTORY_NAME, [{"epoch": 0, "trainable_groups": "head"}])
    assert read_history(tmp_path / HISTORY_NAME) == [{**dict.fromkeys(HISTORY_FIELDS), "epoch": 0,
                                                      "trainable_groups": "head"}]  # fmt: skip


def test_training_grid_says_which_views_the_head_trained_on(runs: dict[str, Path]) -> None:
    # feature-extract with --views 1 trains on cached evaluation views: "--augment light" never applied.
    page = write_report(runs["feature-extract"]).read_text(encoding="utf-8")
    assert "features were cached with --views 1, so --augment light did not apply" in page
    assert "after --augment light" in (runs["gradual"] / "report.html").read_text(encoding="utf-8")


def test_denormalise_undoes_the_backbones_own_normalisation(tiny_dataset: Path) -> None:
    # The offline MobileNetV2's preprocessing (mean = std = 0.5), not ImageNet's.
    prep = Preprocessing(image_size=32, resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    image = load_image(str(tiny_dataset / "train" / "red" / "0.png"))
    geometry = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])
    expected = geometry(image).permute(1, 2, 0).numpy().astype(int)
    normalised = build_transform(prep, "none")(image)
    shown = denormalise(normalised, prep.mean, prep.std)
    assert shown.shape == (32, 32, 3) and shown.dtype == np.uint8
    assert np.abs(shown.astype(int) - expected).max() <= 1
    assert np.abs(denormalise(normalised, IMAGENET_MEAN, IMAGENET_STD).astype(int) - expected).max() > 20
    assert denormalise(torch.stack([normalised] * 2), prep.mean, prep.std).shape == (2, 32, 32, 3)


@pytest.mark.precision
def test_predictions_reproduce_the_runs_evaluation(runs: dict[str, Path]) -> None:
    run = load_run(runs["gradual"])
    model = transferkit.load_checkpoint(run.path)
    val = discover(run.config["data"], run.config["val_split"], run.config["seed"]).val
    predictions = predict_samples(model, val)
    assert [p.path for p in predictions] == [path for path, _ in val]
    assert sum(p.correct for p in predictions) / len(val) == run.metrics["val_accuracy"]  # same machine, same precision
    confusion = np.zeros((2, 2), dtype=int)
    for p in predictions:
        confusion[p.label, p.predicted] += 1
    assert confusion.tolist() == run.metrics["val_confusion_matrix"]
    top = top_losses(predictions, 3)
    assert [p.loss for p in top] == sorted((p.loss for p in predictions), reverse=True)[:3]
    assert all(p.loss == pytest.approx(-math.log(p.true_probability)) for p in top)


def _moved_run(run: Path, to: Path, data: Path, **extra_metrics: object) -> Path:
    """A copy of ``run`` whose config points at ``data``, with ``extra_metrics`` added."""
    to.mkdir()
    shutil.copy(run / "history.csv", to / "history.csv")
    (to / "model.pt").symlink_to(run / "model.pt")
    config = json.loads((run / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**config, "data": str(data)}))
    metrics = json.loads((run / "metrics.json").read_text())
    (to / "metrics.json").write_text(json.dumps({**metrics, **extra_metrics}))
    return to


def test_report_without_the_data_still_shows_the_run(runs: dict[str, Path], tmp_path: Path) -> None:
    advice = {"strategy": "fine-tune", "size": "large", "domain": "different", "similarity": 0.41,
              "reasons": ["1,800 images per class", "far from ImageNet"]}  # fmt: skip
    moved = _moved_run(runs["gradual"], tmp_path / "moved-run", tmp_path / "gone", advice=advice)
    stale = moved / REPORT_DIR / FIGURES["predictions"]
    stale.parent.mkdir()
    stale.write_bytes(b"from an earlier report")

    report = write_report(moved)

    page = report.read_text(encoding="utf-8")
    assert "image grids not drawn" in page and "gone does not exist" in page
    # The advice: its recommendation, the reasons, and the measurements behind them.
    assert "recommended <strong>fine-tune</strong> (large dataset, different to the pretraining data)" in page
    assert "<li>1,800 images per class</li><li>far from ImageNet</li>" in page and "0.4100" in page
    assert not stale.exists()
    images = references(report).images
    # What metrics.json alone draws: the curves, the confusion matrix, the calibration's reliability diagram.
    assert sorted(images) == [f"{REPORT_DIR}/{FIGURES[k]}" for k in ("confusion", "curves", "reliability")]
    assert all((moved / src).is_file() for src in images)


def test_a_report_regenerated_and_interrupted_leaves_the_old_one_whole(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new figures are drawn beside the report and moved in with the new page: a Ctrl+C while
    Grad-CAM's grids are drawn (after the charts) leaves the old page and every figure it shows."""
    import transferkit.reports.explanations as explanations

    run = Path(shutil.copytree(runs["gradual"], tmp_path / "run"))
    page = write_report(run)
    shown = {src: (run / src).read_bytes() for src in references(page).images}
    assert f"{REPORT_DIR}/{FIGURES['explained_predictions']}" in shown and len(shown) >= 5

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(explanations, "plot_tiles", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(run)
    assert {src: (run / src).read_bytes() for src in references(page).images} == shown
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # nothing half-drawn is left

    # What a SIGKILL while drawing leaves: the staged figures, removed by a later report once they are
    # old; a recent one may be another process's report being drawn, and stays.
    monkeypatch.undo()
    stale, recent = run / ".report-k1ll3d.tmp", run / ".report-drawing.tmp"
    for staged in (stale, recent):
        staged.mkdir()
        (staged / "curves.png").write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    write_report(run)
    assert not stale.exists() and recent.is_dir()


def test_report_refuses_to_label_images_with_classes_the_model_lacks(runs: dict[str, Path], tmp_path: Path) -> None:
    data = make_colour_folder(tmp_path / "data", 2, classes=("red", "green", "blue"))
    page = write_report(_moved_run(runs["gradual"], tmp_path / "moved-run", data)).read_text(encoding="utf-8")
    assert "are no longer the model&#x27;s (blue, red)" in page
    assert f"{REPORT_DIR}/{FIGURES['predictions']}" not in page


def test_report_displays_its_images_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"needs {CHROMIUM} to render the report headless (apt-get install chromium)")
    # A copy of the page whose <base> is the run directory, plus a script that records each image's
    # decoded size in the DOM once everything has loaded; --dump-dom prints that DOM.
    probe_script = (
        '<script>addEventListener("load", () => { const out = document.createElement("pre"); out.id = "probe"; '
        "out.textContent = JSON.stringify([...document.images].map(i => [i.getAttribute('src'), i.naturalWidth, "
        'i.naturalHeight])); document.body.append(out); });</script>'
    )
    page = report.read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("<head>", f'<head><base href="{report.parent.as_uri()}/">', 1)
                     .replace("</body>", probe_script + "</body>", 1), encoding="utf-8")  # fmt: skip
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = proc.stdout.index('<pre id="probe">') + len('<pre id="probe">')
    shown = json.loads(proc.stdout[start : proc.stdout.index("</pre>", start)])
    assert sorted(src for src, _, _ in shown) == sorted(references(report).images)
    for src, width, height in shown:
        with Image.open(report.parent / src) as im:
            assert (width, height) == im.size, src


@pytest.mark.slow
def test_report_command_works_without_a_display(runs: dict[str, Path]) -> None:
    # An interactive backend requested and no display: pyplot would fail here; reports never use it.
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"
    proc = subprocess.run([sys.executable, "-m", "transferkit", "report", str(runs["feature-extract"])],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(runs["feature-extract"] / "report.html")


def test_compare_prints_a_table_and_writes_a_page_with_a_plot(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "comparison.html"
    assert main(["compare", str(runs["feature-extract"]), str(runs["gradual"]), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["run", "model", "strategy"]
    assert lines[1].split()[:3] == ["fe", "resnet18", "feature-extract"]
    assert lines[2].split()[:3] == ["gradual", "resnet18", "gradual"]
    # A gradual run's parameters after its last unfreeze, not the head's alone at the start.
    history = (runs["gradual"] / "history.csv").read_text().splitlines()
    trained = max(int(row["trainable_params"]) for row in csv.DictReader(history))
    assert trained > json.loads((runs["gradual"] / "metrics.json").read_text())["trainable_params"]
    assert lines[2].split()[3] == f"{trained:,}"
    assert lines[-1] == str(out)
    refs = references(out)
    assert refs.images == ["comparison_plot.png"] and refs.urls == refs.images
    with Image.open(tmp_path / "comparison_plot.png") as im:
        assert im.size == (1500, 500)
    page = out.read_text(encoding="utf-8")
    accuracy = json.loads((runs["gradual"] / "metrics.json").read_text())["val_accuracy"]
    assert "feature-extract" in page and f"{accuracy:.4f}" in page
    before = out.read_bytes()
    assert main(["compare", str(runs["feature-extract"]), "--out", str(out)]) == 2
    assert f"--out {out} already exists; choose another --out" in capsys.readouterr().err
    assert out.read_bytes() == before
    (tmp_path / "other_plot.png").write_bytes(b"mine")  # the plot the page would write beside it
    assert main(["compare", str(runs["feature-extract"]), "--out", str(tmp_path / "other.html")]) == 2
    assert "other_plot.png already exists" in capsys.readouterr().err
    assert (tmp_path / "other_plot.png").read_bytes() == b"mine" and not (tmp_path / "other.html").exists()
    under_a_file = tmp_path / "other_plot.png" / "pages" / "c.html"  # a folder on the way is a file
    assert main(["compare", str(runs["feature-extract"]), "--out", str(under_a_file)]) == 2
    assert f"--out {under_a_file}: {tmp_path / 'other_plot.png'} is a file, not a folder" in capsys.readouterr().err


def test_compare_names_runs_apart_when_their_folders_share_a_name(runs: dict[str, Path], tmp_path: Path) -> None:
    twin = tmp_path / "fe"
    twin.mkdir()
    for name in ("config.json", "metrics.json", "history.csv"):
        shutil.copy(runs["feature-extract"] / name, twin / name)
    table = format_comparison([load_run(runs["feature-extract"]), load_run(twin)])
    assert str(runs["feature-extract"]) in table and str(twin) in table


@pytest.mark.parametrize("command", ["report", "compare"])
def test_bad_run_directories_are_one_line_errors(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "transferkit train" in err
    assert main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a finished transferkit run" in err


@pytest.mark.parametrize("command", ["report", "compare"])
def test_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    assert f"example:\n  transferkit {command} runs/" in capsys.readouterr().out


def test_a_chart_laid_out_once_has_the_pixels_savefig_would_give(tmp_path: Path) -> None:
    """Figures are laid out once before saving (savefig would lay them out twice): the PNG must not change."""
    from transferkit.reports.figures import _figure, _save

    def chart() -> object:
        fig = _figure((5.0, 3.0))
        ax_a, ax_b = fig.subplots(1, 2)
        ax_a.plot([0, 1, 2], [3.0, 1.0, 2.0], label="a long legend entry")
        ax_a.set(title="a title", xlabel="epoch", ylabel="a long y label")
        ax_a.legend()
        ax_b.imshow(np.arange(12.0).reshape(3, 4))
        ax_b.set(title="another", xlabel="x")
        return fig

    _save(chart(), tmp_path / "once.png")
    chart().savefig(tmp_path / "savefig.png", format="png", dpi=100)  # constrained layout, run by savefig
    once, usual = (np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("once", "savefig"))
    assert once.shape == usual.shape == (300, 500, 3) and np.array_equal(once, usual)


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path: Path) -> None:
    """matplotlib reads text between two $ as TeX: "$5_to_$10" is no formula, "$5-$10" would lose its $."""
    from transferkit.reports.figures import plot_confusion_matrix

    names = ["$5_to_$10", "$5-$10", "日本語 bee"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a glyph DejaVu Sans lacks is no warning on the user's terminal
        plot_confusion_matrix(names, [[2, 1, 0], [0, 3, 0], [1, 0, 2]], tmp_path / "cm.png")
    assert Image.open(tmp_path / "cm.png").size[0] > 0


@pytest.mark.parametrize("scale", [1e-4, 1.0, 2e3])
def test_charts_laid_out_by_fixed_margins_keep_every_label_inside_the_picture(tmp_path: Path, scale: float) -> None:
    """The curves and the reliability diagram have fixed margins (their labels are numbers and set words):
    whatever the numbers' size, nothing is cut at the picture's edge, which stays background."""
    from transferkit.reports.figures import plot_curves, plot_reliability
    from transferkit.runs import Run

    epochs = 120
    history = [{"epoch": e, "train_loss": scale * (3 - e / epochs), "val_loss": scale * (3.1 - e / epochs),
                "train_accuracy": e / epochs, "val_accuracy": 0.9 * e / epochs, "lr": scale * 1e-3 * (1 - e / epochs)}
               for e in range(epochs)]  # fmt: skip
    metrics = {"best_epoch": 97, "unfreeze_events": [{"epoch": 40, "unfrozen": ["layer4", "layer3"]}]}
    curve = {"confidence": [0.55, 0.75, 0.95], "accuracy": [0.5, 0.8, 0.97]}
    calibration = {"temperature": 1.37, "ece_before": 0.061, "ece_after": 0.012, "fitted_on": "validation",
                   "reliability": {"before": curve, "after": curve}}  # fmt: skip
    for path in (plot_curves(Run(tmp_path, {}, metrics, history), tmp_path / "curves.png"),
                 plot_reliability(calibration, tmp_path / "reliability.png")):  # fmt: skip
        pixels = np.asarray(Image.open(path).convert("L"))
        edges = np.concatenate([pixels[:2].ravel(), pixels[-2:].ravel(), pixels[:, :2].ravel(), pixels[:, -2:].ravel()])
        assert edges.min() == 255, f"{path.name}: something is drawn across the picture's edge"
        assert pixels.std() > 10


def test_a_one_row_history_gets_its_table_instead_of_a_curve(runs: dict[str, Path], tmp_path: Path) -> None:
    """One epoch (or a linear probe's one fit) is one point a chart: the report shows the row's numbers."""
    one = tmp_path / "one-epoch"
    shutil.copytree(runs["feature-extract"], one)
    lines = (one / "history.csv").read_text().splitlines()
    (one / "history.csv").write_text("\n".join(lines[:2]) + "\n")
    page = write_report(one).read_text(encoding="utf-8")
    assert not (one / REPORT_DIR / FIGURES["curves"]).exists()
    assert f"{REPORT_DIR}/{FIGURES['curves']}" not in references(one / "report.html").images
    assert "One row, so no curve to draw" in page and "<table" in page.split('id="training"')[1].split("<section")[0]
    # Two rows or more: the curves, and the table folded under them.
    assert f"{REPORT_DIR}/{FIGURES['curves']}" in references(write_report(runs["feature-extract"])).images


def test_small_learning_rates_and_a_macro_f1_selection_read_as_they_are(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "late-schedule"
    shutil.copytree(runs["feature-extract"], run)
    history = read_history(run / HISTORY_NAME)
    for row, lr in zip(history, (2e-07, 5e-08)):  # the end of a cosine schedule from --lr 1e-5
        row["lr"] = lr
    write_history(run / HISTORY_NAME, history)
    metrics = json.loads((run / "metrics.json").read_text())
    candidate = {"backbone": "resnet18", "strategy": "full", "layer": None, "unfreeze": None, "epochs": 3,
                 "score": 0.5, "seconds": 1.0, "images_per_s": 9.0, "status": "done", "note": ""}  # fmt: skip
    metrics["selection"] = {"metric": "macro_f1", "leaderboard": [candidate], "holdout_images": 4}
    (run / "metrics.json").write_text(json.dumps(metrics))
    page = write_report(run).read_text(encoding="utf-8")
    training = page.split('id="training"')[1].split("<section")[0]
    assert "2e-07" in training and "5e-08" in training and "0.000000" not in training
    selection = page.split('id="selection"')[1].split("<section")[0]
    assert "<th>holdout macro-F1</th>" in selection and "holdout accuracy" not in selection
    assert "<th>epochs</th>" in selection


def test_the_summary_says_when_the_kept_model_was_evaluated_at_another_precision(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """The curves' epochs are validated at the training precision; the headline is the kept model at predict's."""
    run = tmp_path / "mixed"
    shutil.copytree(runs["feature-extract"], run)
    metrics = json.loads((run / "metrics.json").read_text())
    for evaluated_at, label in (("bf16", "validation accuracy (at bf16, as predict runs it)"),
                                ("32", "validation accuracy")):  # fmt: skip
        mixed = {**metrics, "precision": "32", "evaluation_precision": evaluated_at}
        (run / "metrics.json").write_text(json.dumps(mixed))
        summary = write_report(run).read_text(encoding="utf-8").split('id="summary"')[1].split("<section")[0]
        assert f'<div class="label">{label}</div>' in summary
