"""Allocator comparison (not a test): inference images/s under glibc's defaults and with
tcmalloc, jemalloc (Debian packages) or mimalloc (PyPI: cmeel-mimalloc) preloaded, each tuned to
keep freed memory, measured in one run.

    python benchmarks/allocator.py [--batches 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, os, sys, time, resource
import torch
from transferkit.backbones import load_backbone
torch.manual_seed(0)
out = {}
for name in ("resnet18", "efficientnet_lite0"):
    model = load_backbone(name, weights="none").model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        start, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(int(sys.argv[1])):
            model(x)
        wall, r1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    out[name] = {"img_s": 32 * int(sys.argv[1]) / wall, "sys_s": r1.ru_stime - r0.ru_stime,
                 "minor_faults": r1.ru_minflt - r0.ru_minflt}
print(json.dumps(out))
"""

LIBS = {
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "mimalloc": str(Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                    / "site-packages" / "cmeel.prefix" / "lib" / "libmimalloc.so.3"),
}


def run(config: str, batches: int) -> dict:
    env = {**os.environ, "ALLOC": config, "TRANSFERKIT_ALLOCATOR": "default"}
    if config == "tcmalloc":
        env.update(LD_PRELOAD=LIBS["tcmalloc"], TCMALLOC_RELEASE_RATE="0")
    if config == "jemalloc":
        env.update(LD_PRELOAD=LIBS["jemalloc"], MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1")
    if config == "mimalloc":
        env.update(LD_PRELOAD=LIBS["mimalloc"], MIMALLOC_PURGE_DELAY="-1", MIMALLOC_ARENA_EAGER_COMMIT="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(batches)], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    configs = ["glibc"] + [c for c, lib in LIBS.items() if Path(lib).exists()]
    results = {c: run(c, args.batches) for c in configs}
    print(f"{'allocator':<10} {'model':<20} {'img/s':>7} {'x glibc':>8} {'kernel s':>9} {'minor faults':>13}")
    for config, res in results.items():
        for model in ("resnet18", "efficientnet_lite0"):
            r, base = res[model], results["glibc"][model]
            print(f"{config:<10} {model:<20} {r['img_s']:7.1f} {r['img_s'] / base['img_s']:8.2f} "
                  f"{r['sys_s']:9.2f} {r['minor_faults']:13d}")


if __name__ == "__main__":
    main()
