"""Where `--compile` (torch.compile) pays on this CPU, measured in one run (not a test).

For resnet18 and efficientnet_lite0 (fp32, channels_last, as transferkit runs them): the time to
compile, the images/s of eager and compiled inference (batch 32 at 224 px) and of a fine-tune
training step (last two layer groups), and the number of images after which compiling has paid
for itself. Run in the environment the `transferkit` command sets up (mimalloc preloaded):

    python benchmarks/compile.py [--models resnet18,efficientnet_lite0] [--batches 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

BATCH, SIZE = 32, 224
WEIGHTS = {"efficientnet_lite0": "DEFAULT", "resnet18": "none"}


def seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def model_and_step(name: str, training: bool):
    from transferkit import StrategySpec, TransferModel, apply_strategy, load_backbone
    from transferkit.performance import to_fast_layout

    model = TransferModel(load_backbone(name, WEIGHTS[name]), [f"c{i}" for i in range(10)])
    to_fast_layout(model)
    x = torch.randn(BATCH, 3, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))
    if not training:
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(x)

        return model, infer
    apply_strategy(model, StrategySpec(name="fine-tune", unfreeze=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return model.train(), train_step


def measure(name: str, job: str, batches: int) -> str:
    training = job == "fine-tune step"
    _, eager = model_and_step(name, training)
    model, compiled = model_and_step(name, training)
    eager()  # oneDNN's primitives are built on the first batch
    model.compile()
    compile_s = seconds(compiled)
    # The two take turns, batch by batch, so that a neighbour's load slows both alike; medians.
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(batches):
        times["eager"].append(seconds(eager))
        times["compiled"].append(seconds(compiled))
    eager_rate, compiled_rate = (BATCH / statistics.median(times[k]) for k in ("eager", "compiled"))
    saved_per_image = 1 / eager_rate - 1 / compiled_rate
    pays_after = f"{compile_s / saved_per_image:,.0f}" if saved_per_image > 0 else "never"
    return (f"| {name} | {job} | {compile_s:.0f} s | {eager_rate:.1f} | {compiled_rate:.1f} | "
            f"{compiled_rate / eager_rate:.2f}× | {pays_after} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(WEIGHTS))
    parser.add_argument("--batches", type=int, default=8, help="timed batches per variant, taken in turns")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(*args.child, args.batches))
        return
    from transferkit.launch import fast_env

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    print("| model | job | compile time | eager img/s | compiled img/s | speed-up | pays after (images) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for job in ("inference", "fine-tune step"):
            # A fresh process and an empty inductor cache each: the compile time a first run pays.
            with tempfile.TemporaryDirectory() as cache:
                env = {**(fast_env() or os.environ), "TORCHINDUCTOR_CACHE_DIR": cache}
                proc = subprocess.run([sys.executable, __file__, "--child", name, job, "--batches", str(args.batches)],
                                      env=env, capture_output=True, text=True)  # fmt: skip
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
