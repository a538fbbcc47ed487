"""int8 against fp32 ONNX exports of one run: file size, ONNX Runtime speed, and the accuracy the export checked.

A run is trained (feature-extract, 1 epoch, real weights offline) on ../shared/datasets/hymenoptera
for each ``--models`` backbone, or ``--run`` is used as it is; then ``transferkit.export`` writes the
fp32 export and the int8 one (calibrated on the run's training images, checked on its validation
images: the agreement and accuracy numbers printed are the export's own check). Speed is ONNX
Runtime's forward pass on preprocessed validation images (no decoding) at batch 1 (a service's
lone request) and batch 32, the two models taking turns one batch each per round, so that other
work on the machine slows both alike; the median of the rounds is kept.

    .venv/bin/python benchmarks/quantize.py [--models efficientnet_lite0] [--run RUN] [--rounds 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import transferkit
from transferkit.data import build_transform, load_image
from transferkit.performance import cpu_has_native_bf16
from transferkit.prediction import onnx_session

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def forward_seconds(path: Path, batch: torch.Tensor) -> float:
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    x = batch.numpy()
    start = time.perf_counter()
    session.run(None, {name: x})
    return time.perf_counter() - start


def measure(run: Path, rounds: int) -> dict[str, object]:
    fp32 = transferkit.export(run, "onnx", out=run / "bench-fp32.onnx", force=True)
    int8 = transferkit.export(run, "onnx", out=run / "bench-int8.onnx", quantize="int8", force=True)
    model = transferkit.load_checkpoint(run)
    transform = build_transform(model.preprocessing)
    files = sorted((SHARED / "val").rglob("*.jpg"))[:32]
    images = torch.stack([transform(load_image(str(f))) for f in files])
    row: dict[str, object] = {"model": model.record.backbone, "quantization": int8.quantization,
                              "size": (fp32.path.stat().st_size, int8.path.stat().st_size)}  # fmt: skip
    for batch in (1, 32):
        x = images[:batch]
        for path in (fp32.path, int8.path):  # warm-up: sessions built, kernels planned
            forward_seconds(path, x)
        times: dict[Path, list[float]] = {fp32.path: [], int8.path: []}
        for _ in range(rounds):
            for path in times:
                times[path].append(forward_seconds(path, x))
        row[f"batch{batch}"] = tuple(batch / statistics.median(times[p]) for p in (fp32.path, int8.path))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="efficientnet_lite0", help="backbones to train and export, comma-separated")
    parser.add_argument("--run", type=Path, help="measure this run instead (its data must be where it was)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"CPU: {os.cpu_count()} cores, native bf16 {cpu_has_native_bf16()}; torch {torch.__version__}; "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stderr)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [args.run] if args.run else []
        for name in [] if args.run else args.models.split(","):
            print(f"training {name} on {SHARED} (feature-extract, 1 epoch)...", file=sys.stderr)
            runs.append(transferkit.train(str(SHARED), model=name, epochs=1, quiet=True, out=f"{tmp}/{name}").run_dir)
        for run in runs:
            rows.append(measure(Path(run), args.rounds))
    print(f"load after {os.getloadavg()[0]:.2f}\n", file=sys.stderr)
    print("| model | fp32 MB | int8 MB | size ratio | batch 1 img/s fp32 → int8 | batch 32 img/s fp32 → int8 | "
          "top-1 agreement | accuracy fp32 → int8 (drop, points) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["quantization"]
        (f32, i8), (a1, b1), (a32, b32) = r["size"], r["batch1"], r["batch32"]  # type: ignore[misc]
        print(f"| {r['model']} | {f32 / 1e6:.1f} | {i8 / 1e6:.1f} | {f32 / i8:.2f}x smaller | {a1:.0f} → {b1:.0f} "
              f"({b1 / a1:.2f}x) | {a32:.0f} → {b32:.0f} ({b32 / a32:.2f}x) | {q.agreement:.1%} of {q.images} | "
              f"{q.accuracy_fp32:.1%} → {q.accuracy_int8:.1%} ({q.drop:+.1f}) |")  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
