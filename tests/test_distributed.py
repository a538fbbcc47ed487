"""A real 2-process DDP run on CPU (gloo), launched by Lightning, as a user would start it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from transferkit import evaluate, load_checkpoint


@pytest.mark.precision
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fine-tune", "feature-extract"])
def test_two_process_ddp_training(tiny_dataset: Path, tmp_path: Path, strategy: str) -> None:
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "transferkit", "train", str(tiny_dataset), "--model", "resnet18", "--weights", "none",
         "--image-size", "32", "--strategy", strategy, "--epochs", "2", "--batch-size", "4", "--accelerator", "cpu",
         "--devices", "2", "--dist", "ddp", "--num-workers", "0", "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    per_rank = metrics["train_batches_per_rank"]
    # 20 training images, batch 4, split over 2 ranks: 3 batches each per epoch, on both ranks.
    assert per_rank == [6, 6]
    if strategy == "feature-extract":
        assert metrics["feature_cache"]["misses"] == 28  # computed once, by rank 0
    # The result is a run like any other: it loads, evaluates and matches its metrics.
    assert load_checkpoint(out).class_names == ["blue", "red"]
    assert evaluate(out, tiny_dataset / "val").accuracy == pytest.approx(metrics["val_accuracy"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "checkpoints", "command.txt", "config.json", "history.csv", "metrics.json", "model.pt", "report", "report.html"
    ]  # fmt: skip


def test_fsdp_is_refused_where_it_cannot_run(tiny_dataset: Path, tmp_path: Path) -> None:
    """Lightning's FSDP needs CUDA, and shards trained weights: a clear error before any run directory exists."""
    from transferkit import TransferkitError, train

    out = tmp_path / "fsdp"
    with pytest.raises(TransferkitError, match="--dist fsdp needs CUDA GPUs.*use --dist ddp"):
        train(tiny_dataset, strategy="fine-tune", unfreeze=1, accelerator="cpu", dist="fsdp", out=str(out))
    assert not out.exists()
