"""Images/s of the paths `transferkit predict` could take on this CPU, measured in one run.

Eager PyTorch (fp32; fp32 + channels_last; bf16 autocast + channels_last) against ONNX Runtime on
an export made by ``transferkit.export`` (fp32). Pure forward passes, softmax included, on
preprocessed tensors: batch 32 at 224 px, no decoding. ``efficientnet_lite0`` with its real weights,
``resnet18`` with random ones (speed does not depend on weight values). After a warm-up round, the
paths of a model take turns, one batch each per round, so that other work on the machine slows
them alike and the ratios to eager fp32 of the same model hold; it still shows as a wide range and
in the load averages printed before and after.

    .venv/bin/python benchmarks/predict_paths.py [--rounds 3] [--models efficientnet_lite0,resnet18]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from transferkit import TransferModel, load_backbone
from transferkit.exports import Probabilities, export_model
from transferkit.prediction import onnx_session
from transferkit.performance import cpu_has_native_bf16

BATCH, SIZE, CLASSES = 32, 224, 10
WEIGHTS = {"efficientnet_lite0": "DEFAULT", "resnet18": "none"}
Forward = Callable[[torch.Tensor], torch.Tensor]


def eager(net: torch.nn.Module, channels_last: bool, bf16: bool) -> Forward:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = copy.deepcopy(net).to(memory_format=fmt)  # a copy each: the paths take turns

    def forward(x: torch.Tensor) -> torch.Tensor:
        context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with torch.inference_mode(), context:
            return net(x.contiguous(memory_format=fmt)).float()

    return forward


def onnx_runtime(path: Path) -> Forward:
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def images_per_second(forward: Forward, x: torch.Tensor) -> float:
    start = time.perf_counter()
    forward(x)
    return len(x) / (time.perf_counter() - start)


def bench_model(name: str, rounds: int, workdir: Path) -> list[tuple[str, str, list[float], float]]:
    """(model, path, images/s per batch, max abs probability difference from eager fp32) per path."""
    model = TransferModel(load_backbone(name, WEIGHTS[name]), [f"class{i}" for i in range(CLASSES)]).eval()
    x = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    net = Probabilities(model).eval()
    paths: dict[str, Forward] = {
        "eager fp32": eager(net, channels_last=False, bf16=False),
        "eager fp32 + channels_last": eager(net, channels_last=True, bf16=False),
        "eager bf16 autocast + channels_last": eager(net, channels_last=True, bf16=True),
        "ONNX Runtime fp32": onnx_runtime(export_model(model, workdir / f"{name}.onnx", "onnx").path),
    }
    # Warm-up round: oneDNN primitives and ORT's arena are built on the first batch.
    outputs = {label: forward(x) for label, forward in paths.items()}
    rates: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(rounds):
        for label, forward in paths.items():
            rates[label].append(images_per_second(forward, x))
    for label in paths:
        print(f"  {name:<18} {label:<36} {statistics.median(rates[label]):7.1f} img/s", flush=True)
    reference = outputs["eager fp32"]
    return [(name, label, rates[label], float((outputs[label] - reference).abs().max())) for label in paths]


def table(rows: list[tuple[str, str, list[float], float]]) -> str:
    lines = [
        "| model | path | img/s (median) | range | × eager fp32 | max abs Δp vs fp32 |",
        "|---|---|---|---|---|---|",
    ]
    base = {m: statistics.median(r) for m, label, r, _ in rows if label == "eager fp32"}
    for model, label, rates, diff in rows:
        median = statistics.median(rates)
        lines.append(
            f"| {model} | {label} | {median:.1f} | {min(rates):.0f}–{max(rates):.0f} ({len(rates)} batches) "
            f"| {median / base[model]:.2f} | {diff:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed batches per path, taken in turns")
    parser.add_argument("--models", default=",".join(WEIGHTS), help="comma-separated, from: " + ", ".join(WEIGHTS))
    args = parser.parse_args()
    import onnxruntime

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}, "
          f"{os.cpu_count()} CPUs, native bf16: {cpu_has_native_bf16()}, "
          f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or 'none (glibc malloc)'}")  # fmt: skip
    print(f"load average before: {os.getloadavg()}")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name.strip(), args.rounds, Path(tmp))
    print(f"load average after: {os.getloadavg()}; {time.perf_counter() - started:.0f} s\n")
    print(table(rows))


if __name__ == "__main__":
    main()
