"""The user's path through the command line, in separate processes as a user runs it."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Every test here runs the command line in a new process, as a user does: seconds each, so the quick
# suite (`make test-fast`) leaves them to `make test`.
pytestmark = pytest.mark.slow


def tk(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"transferkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    proc = tk("train", str(tiny_dataset), "--model", "resnet18", "--weights", "none", "--image-size", "32",
              "--strategy", "fine-tune", "--unfreeze", "1", "--epochs", "2", "--lr", "0.01", "--batch-size", "8",
              "--out", str(out), "--quiet")  # fmt: skip
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    return out


def test_train_writes_a_complete_run_directory(trained_run: Path) -> None:
    for name in ("config.json", "command.txt", "model.pt", "history.csv", "metrics.json", "checkpoints/last.ckpt"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    confusion = metrics["val_confusion_matrix"]  # 8 validation images; accuracy is its diagonal share
    assert sum(map(sum, confusion)) == 8 and metrics["strategy"] == "fine-tune"
    assert metrics["val_accuracy"] == sum(confusion[i][i] for i in range(2)) / 8
    assert len((trained_run / "history.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs
    assert "--unfreeze 1" in (trained_run / "command.txt").read_text()


@pytest.mark.precision
def test_train_prints_its_progress_on_stderr_and_only_the_run_directory_on_stdout(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """RUN=$(transferkit train ...) holds the run directory: Lightning's progress bar goes to stderr."""
    proc = tk("train", str(tiny_dataset), "--model", "resnet18", "--weights", "none", "--image-size", "32",
              "--epochs", "2", "--out", str(tmp_path / "run"))  # fmt: skip
    assert proc.stdout == f"{tmp_path / 'run'}\n"
    assert "Epoch 1" in proc.stderr and "val_accuracy" in proc.stderr


def test_evaluate_in_a_new_process_matches_the_run(trained_run: Path, tiny_dataset: Path) -> None:
    result = json.loads(tk("evaluate", str(trained_run), str(tiny_dataset / "val"), "--json").stdout)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    # Same machine, same precision (the run's --precision auto, resolved here): the same numbers, exactly.
    assert result["precision"] == metrics["evaluation_precision"] in ("32", "bf16")
    assert result["accuracy"] == metrics["val_accuracy"] and result["loss"] == metrics["val_loss"]
    assert set(result["per_class"]) == {"blue", "red"} and len(result["confusion_matrix"]) == 2
    table = tk("evaluate", str(trained_run), str(tiny_dataset)).stdout  # a DATA root means its val/
    assert "confusion matrix" in table and "precision" in table
    assert f"precision {'fp32' if result['precision'] == '32' else 'bf16'})" in table.splitlines()[0]


def test_predict_files_and_folders(trained_run: Path, tiny_dataset: Path) -> None:
    out = json.loads(tk("predict", str(trained_run), str(tiny_dataset / "val" / "red"),
                        str(tiny_dataset / "val" / "blue" / "1.jpg"), "--top-k", "2", "--json").stdout)  # fmt: skip
    assert len(out) == 5
    for item in out:
        probs = [p["probability"] for p in item["predictions"]]
        assert len(probs) == 2 and probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)
        assert {p["label"] for p in item["predictions"]} == {"red", "blue"}
    assert "red" in tk("predict", str(trained_run), str(tiny_dataset / "val" / "red" / "0.png")).stdout
    # --csv: the same answers, one row per image, for a spreadsheet
    rows = list(csv.DictReader(io.StringIO(tk("predict", str(trained_run), str(tiny_dataset / "val" / "red"),
                                              str(tiny_dataset / "val" / "blue" / "1.jpg"), "--top-k", "2",
                                              "--csv").stdout)))  # fmt: skip
    assert [row["path"] for row in rows] == [item["path"] for item in out]
    for row, item in zip(rows, out):
        assert [(row[f"label_{i}"], float(row[f"probability_{i}"])) for i in (1, 2)] == [
            (p["label"], pytest.approx(p["probability"], abs=1e-6)) for p in item["predictions"]]
        assert row["error"] == ""


def test_commands_that_cache_take_cache_dir(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """predict keeps its ONNX export, and features its vectors, under --cache-dir, as train does."""
    image = str(tiny_dataset / "val" / "red" / "0.png")
    tk("predict", str(trained_run), image, "--runtime", "onnx", "--cache-dir", str(tmp_path / "a"))
    assert sorted(p.suffix for p in (tmp_path / "a" / "exports").iterdir()) == [".json", ".onnx"]
    tk("features", str(tiny_dataset), "--model", "resnet18", "--weights", "none", "--image-size", "32",
       "--out", str(tmp_path / "F.NPZ"), "--cache-dir", str(tmp_path / "b"))  # fmt: skip
    assert any((tmp_path / "b" / "features").iterdir())
    assert np.load(tmp_path / "F.NPZ")["features"].shape == (28, 512)  # an upper-case suffix is an .npz too


def test_existing_run_directory_is_never_overwritten(trained_run: Path, tiny_dataset: Path) -> None:
    before = (trained_run / "model.pt").stat().st_mtime_ns
    proc = tk("train", str(tiny_dataset), "--model", "resnet18", "--weights", "none", "--out", str(trained_run), check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (trained_run / "model.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "/nonexistent/data"], "does not exist"),
        (["train", "{data}", "--model", "resnet19"], "did you mean"),
        (["train", "{data}", "--strategy", "magic"], "unknown --strategy"),
        (["train", "{data}", "--head", "mlp:x"], "mlp:256"),
        (["evaluate", "{data}", "{data}/val"], "no model.pt"),
        (["predict", "{data}/val/red/0.png", "{data}/val/red/0.png"], "not a transferkit checkpoint"),
        (["train", "{data}", "--scheduler", "step", "--step-size", "0"], "--step-size must be at least 1, got 0"),
        (["train", "--resume", "{data}", "--epochs", "30"], "with its own configuration: leave out --epochs"),
        (["train", "{data}", "--resume", "{data}", "--no-cache"], "leave out DATA, --no-cache"),
        (["train", "{data}", "--unfreeze", "2"], "--unfreeze applies to --strategy fine-tune, gradual or auto; "
                                                  "--strategy feature-extract would ignore it"),
        (["train", "{data}", "--optimizer", "adam", "--momentum", "0.5"], "--momentum applies to --optimizer sgd"),
        (["train", "{data}", "--gamma", "0.5"], "--gamma applies to --scheduler step; --scheduler cosine would"),
        (["train", "{data}/train", "--val", "{data}/val"],  # argparse reads --val as --val-split
         "--val-split: expected a share such as 0.2, got the folder"),
        (["pack", "{data}", "--out", "shards", "--val-split", "1"], "--val-split: must be between 0 and 1"),
        (["train", "{data}", "--strategy", "linear-probe", "--epochs", "30"],  # scikit-learn fits it, epoch-less
         "--epochs applies to --strategy feature-extract, fine-tune, full, gradual or auto; --strategy linear-probe"),
        # Options the strategy would ignore: cached features have no BatchNorm to train, no group but the head.
        (["train", "{data}", "--train-bn"], "--train-bn applies to --strategy fine-tune, gradual or auto"),
        (["train", "{data}", "--lr-decay", "0.5"], "--lr-decay applies to --strategy fine-tune, full, gradual or"),
        (["train", "{data}", "--augment", "strong"], "--augment with --strategy feature-extract needs --views K"),
        (["train", "/nonexistent/data", "--augment", "none"], "does not exist"),  # none is what one view has
        (["train", "{data}", "--model", "resnet18", "--weights", "none", "--strategy", "fine-tune", "--group-lr",
          "layer1=1e-4"],
         "--group-lr names layer1, which fine-tune never trains here (it trains layer4, head)"),
        (["train", "{data}", "--strategy", "gradual", "--unfreeze", "layer4"],
         "--unfreeze with --strategy gradual takes a number"),
        (["train", "{data}", "--strategy", "gradual", "--unfreeze-every", "2", "--unfreeze-at", "1,3"],
         "--unfreeze-every and --unfreeze-at both set gradual's schedule; give one of them"),
        (["train", "{data}", "--strategy", "gradual", "--unfreeze-at=-1,2"], "--unfreeze-at takes epochs 0 or more"),
        (["train", "{data}", "--strategy", "auto", "--unfreeze-every", "2"],  # gradual is no candidate of auto's
         "--unfreeze-every applies to --strategy gradual; --strategy auto would ignore it"),
        (["train", "{data}", "--strategy", "gradual", "--unfreeze-at", ","], "--unfreeze-at: expected comma-separated"),
        (["train", "{data}", "--strategy", "gradual", "--epochs", "2", "--unfreeze-at", "5,7"],  # the head alone
         "--strategy gradual unfreezes its first group at epoch 5 (counted from 0), after the last of --epochs 2"),
    ],
)
def test_bad_input_is_a_one_line_error(tiny_dataset: Path, args: list[str], message: str) -> None:
    proc = tk(*[a.format(data=tiny_dataset) for a in args], check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_evaluate_with_other_classes_is_a_clear_error(trained_run: Path, tmp_path: Path) -> None:
    from helpers import make_colour_folder

    make_colour_folder(tmp_path, 2, classes=("red", "green"))
    proc = tk("evaluate", str(trained_run), str(tmp_path), check=False)
    assert proc.returncode == 2 and "does not know: green" in proc.stderr


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "models"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    out = tk(command, "--help").stdout
    assert "example:" in out and f"transferkit {command}" in out


def test_models_lists_and_marks_offline_weights() -> None:
    out = tk("models", "efficientnet_lite*").stdout.splitlines()
    assert "* efficientnet_lite0" in out
    missed = tk("models", "timm/dinov2*", check=False)  # timm names them vit_*_dinov2
    assert missed.returncode == 2 and "try transferkit models 'timm/*dinov2*'" in missed.stderr
    assert "timm/vit_small_patch14_dinov2.lvd142m" in tk("models", "timm/*dinov2*").stdout
    missed = tk("models", "*dinov2*", check=False)  # timm's names are listed under timm/ only
    assert missed.returncode == 2 and missed.stderr.rstrip().endswith("try transferkit models 'timm/*dinov2*'")
    from transferkit import list_backbones, offline_weights_available

    if not any(offline_weights_available(n) for n in list_backbones("resnet*")):  # none in this machine's caches
        missed = tk("models", "resnet*", "--offline", check=False)
        assert missed.returncode == 2 and "none of the" in missed.stderr and "leave out --offline" in missed.stderr


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(trained_run: Path, tiny_dataset: Path) -> None:
    """``transferkit predict RUN photos/ | head -1``: the reader closes the pipe; no traceback follows."""
    unbuffered = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line written at once, as to a terminal
    for args in (["models"], ["predict", str(trained_run), str(tiny_dataset)]):
        proc = subprocess.Popen([sys.executable, "-m", "transferkit", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=unbuffered)  # fmt: skip
        assert proc.stdout is not None
        proc.stdout.close()  # before a line is read: every write to it fails
        _, err = proc.communicate(timeout=600)
        assert "Traceback" not in err and "BrokenPipeError" not in err, err
        assert proc.returncode == 141  # as a Unix tool killed by SIGPIPE


def test_help_shows_defaults_and_closed_sets_are_checked_by_the_parser() -> None:
    out = tk("train", "--help").stdout
    assert "(default: 10)" in out and "(default: adamw)" in out and "sgd, adam, adamw" in out
    proc = tk("train", "data", "--optimizer", "rmsprop", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown --optimizer 'rmsprop'; choose one of: sgd, adam, adamw" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_parser_is_built_without_importing_torch() -> None:
    # The command re-executes itself with another allocator before torch loads, and --help answers at once.
    code = "import sys; from transferkit.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_version_is_the_installed_packages() -> None:
    from importlib.metadata import version

    import transferkit

    assert tk("--version").stdout == f"transferkit {transferkit.__version__}\n"
    assert version("transferkit") == transferkit.__version__  # pyproject reads it from the package, one place
