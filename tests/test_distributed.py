"""A real 2-process DDP run on CPU (gloo), launched by Lightning, as a user would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transferkit import evaluate, load_checkpoint


# A user's training script, with a callback of the test's own: each rank counts its training batches and
# rank 0 gathers the counts, proof that both ranks trained. Lightning starts rank 1 by running it again.
SCRIPT = """
import json, sys
import torch
from lightning.pytorch.callbacks import Callback
import transferkit

class Participation(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        gathered = pl_module.all_gather(torch.tensor([self.batches], device=pl_module.device))
        if trainer.is_global_zero:
            with open(sys.argv[3], "w") as f:
                json.dump([int(v) for v in gathered.flatten().tolist()], f)

data, out, counts, strategy = sys.argv[1:5]
transferkit.train(data, model="resnet18", weights="none", image_size=32, strategy=strategy, epochs=2, batch_size=4,
                  accelerator="cpu", devices=2, dist="ddp", num_workers=0, out=out, quiet=True,
                  callbacks=[Participation()])
"""


@pytest.mark.precision
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fine-tune", "feature-extract"])
def test_two_process_ddp_training(tiny_dataset: Path, tmp_path: Path, strategy: str) -> None:
    out, counts, script = tmp_path / "ddp", tmp_path / "batches.json", tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    # Its own feature cache: the session's may already hold these images' features (test order decides).
    env = {**os.environ, "TRANSFERKIT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(script), str(tiny_dataset), str(out), str(counts), strategy],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 20 training images, batch 4, split over 2 ranks: 3 batches each per epoch, on both ranks.
    assert json.loads(counts.read_text()) == [6, 6]
    if strategy == "feature-extract":
        assert metrics["feature_cache"]["misses"] == 28  # computed once: each rank its share (test_feature_store.py)
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
