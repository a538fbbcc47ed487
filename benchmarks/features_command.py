"""The `transferkit features` command end to end against its forward limit and the seeds' way (not a test).

On N generated 500x375 JPEGs (default 3,000) and resnet18 (random weights: the speed is the same):
- the limit: resnet18's pure forward throughput on random batches (decoding left out), at the
  precision `features` chooses on this machine (bf16 on a CPU with native bf16, else fp32), channels_last;
- transferkit: `transferkit features DATA --out F.npz` as a user runs it, whole process (start-up,
  decoding, forward, writing the cache and the file), cold cache;
- the seeds' way: a whole process with PIL ImageFolder, one DataLoader worker, fp32, a plain loop.
Prints the CPU kind, images/s of each, transferkit's fraction of the limit and the ratio. With
--rounds R the three take turns R times (limit, transferkit, seeds' way, then again), and the medians
are printed with the ratios of each round, so that a machine drifting between phases moves all three.

    python benchmarks/features_command.py [--images 3000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from throughput import make_jpegs  # noqa: E402

MODEL = "resnet18"
SEEDS = """
import sys, torch
from torch import nn
from torchvision import datasets, transforms
from transferkit import load_backbone
backbone = load_backbone("resnet18", "none")
p = backbone.preprocessing
tf = transforms.Compose([transforms.Resize(p.resize_size), transforms.CenterCrop(p.image_size), transforms.ToTensor(),
                         transforms.Normalize(p.mean, p.std)])
loader = torch.utils.data.DataLoader(datasets.ImageFolder(sys.argv[1], tf), batch_size=32, num_workers=1)
model = backbone.model.eval()
model.fc = nn.Identity()
features = []
with torch.no_grad():
    for x, _ in loader:
        features.append(model(x))
torch.save(torch.cat(features), sys.argv[2])
"""
LIMIT = """
import time, torch
from transferkit import TransferModel, load_backbone
from transferkit.performance import autocast, pick_device, resolve_precision, to_fast_layout
device = pick_device()
precision = resolve_precision("auto", device)
model = to_fast_layout(TransferModel(load_backbone("resnet18", "none"), ["a", "b"]).eval())
x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
rates = []
with torch.inference_mode(), autocast(device, precision):
    model(x)
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(4):
            model(x)
        rates.append(128 / (time.perf_counter() - start))
print(sorted(rates)[1], precision)
"""


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    from transferkit.launch import fast_env
    from transferkit.performance import cpu_kind, cpu_model, restart_as_avx2_cpu

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--as-avx2", action="store_true",
                        help="run as a CPU that reports AVX2 only: kernels limited to AVX2, no native bf16")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1, help="times the three take turns (medians are printed)")
    args = parser.parse_args()
    if args.as_avx2:
        restart_as_avx2_cpu()
    ours_env = fast_env() or dict(os.environ)
    rounds: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "jpegs"
        make_jpegs(data, args.images)
        for round_index in range(args.rounds):
            limit_out = subprocess.run([sys.executable, "-c", LIMIT], env=ours_env, capture_output=True, text=True,
                                       check=True).stdout.split()  # fmt: skip
            limit, precision = float(limit_out[0]), limit_out[1]
            out = Path(tmp) / f"round{round_index}"
            ours_s = timed([sys.executable, "-m", "transferkit", "features", str(data), "--model", MODEL, "--weights",
                            "none", "--out", f"{out}-features.npz"],
                           {**os.environ, "TRANSFERKIT_CACHE_DIR": f"{out}-cache"})  # fmt: skip
            seeds_s = timed([sys.executable, "-c", SEEDS, str(data), f"{out}-seeds.pt"],
                            {**os.environ, "TRANSFERKIT_ALLOCATOR": "default"})  # fmt: skip
            rounds.append((limit, args.images / ours_s, args.images / seeds_s))
    limit, ours, seeds = (statistics.median(column) for column in zip(*rounds))
    of_limit = ", ".join(f"{o / lim:.0%}" for lim, o, _ in rounds)
    ratios = ", ".join(f"{o / s:.2f}x" for _, o, s in rounds)
    print(f"`transferkit features`, {args.images} generated 500x375 JPEGs, {MODEL}; {cpu_model()}: {cpu_kind()}"
          f"{'' if args.rounds == 1 else f'; medians of {args.rounds} rounds taking turns'}")
    print(f"  forward limit ({precision}, channels_last, random batches of 32): {limit:7.1f} images/s")
    print(f"  transferkit features, whole process:   {ours:7.1f} images/s  ({args.images / ours:6.1f} s), "
          f"{ours / limit:.0%} of the limit (each round: {of_limit})")
    print(f"  the seeds' way, whole process:         {seeds:7.1f} images/s  ({args.images / seeds:6.1f} s)")
    print(f"  ratio {ours / seeds:.2f}x (each round: {ratios})")


if __name__ == "__main__":
    main()
