"""Scale-out: the feature store against the per-file cache, head training from the store, 1 vs N processes.

Not a test. On N generated small JPEGs (64 px, two classes), with a small backbone (mobilenet_v3_small,
random weights: the numbers are about the data path, not accuracy), each phase in a process of its own:

1. extraction, cold and warm: the old per-file cache (one ``.npy`` per image, written atomically, read
   back with ``np.load``: what ``extract_features`` did before the store) against the store
   (``store_features``: shards, no matrix kept; and ``extract_features``: the store, then one matrix);
   images/s, files written, peak RSS;
2. one epoch of a linear head over 10^4 and N images, fed from the store's memory-mapped shards (the
   loaders ``train`` uses) and, for comparison, from one in-memory matrix (the old TensorDataset);
   epoch seconds, peak RSS, and peak anonymous RSS (the process's own memory; RSS also counts the
   mapped shard pages, which are the kernel's page cache and reclaimable);
3. extraction by 1 process and by P processes each extracting images r, r + P, ... into the store
   (what every rank does in a multi-process run), cold.

    python benchmarks/scale_out.py [--images 100000] [--workdir /tmp/scale-out] [--procs 2] [--device cpu|cuda]

On a GPU machine: ``--device cuda --procs <GPUs>`` (process r uses cuda:r); use more images there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

MODEL, SIZE = "mobilenet_v3_small", 64


class PeakMemory:
    """Peak RSS (the kernel's high-water mark) and peak anonymous RSS, sampled every 20 ms."""

    def __init__(self) -> None:
        self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.anon = max(self.anon, _status("RssAnon"))

    def result(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.anon = max(self.anon, _status("RssAnon"))
        return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "peak_anon_mb": round(self.anon / 1024, 1)}  # fmt: skip


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def make_images(root: Path, count: int) -> None:
    """``count`` 64 px JPEGs in two class folders (reused when already there)."""
    import numpy as np
    from PIL import Image

    done = root / f".made-{count}"
    if done.exists():
        return
    rng = np.random.default_rng(0)
    for i in range(count):
        label = i % 2
        folder = root / ("red" if label else "blue")
        folder.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 90, (SIZE, SIZE, 3), dtype=np.uint8)
        a[..., 0 if label else 2] += 140
        Image.fromarray(a).save(folder / f"{i:07d}.jpg", quality=90)
    done.touch()


def _samples(data: Path, count: int) -> list[tuple[str, int]]:
    names = sorted(f"{i:07d}.jpg" for i in range(count))
    return [(str(data / ("red" if int(n[:7]) % 2 else "blue") / n), int(n[:7]) % 2) for n in names]


def _model(device: str) -> Any:
    import torch

    from transferkit import Preprocessing, TransferModel, load_backbone

    torch.manual_seed(0)
    prep = Preprocessing(image_size=SIZE, resize_size=SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)
    return TransferModel(load_backbone(MODEL, weights="none", preprocessing=prep), ["blue", "red"]).eval()


def phase_per_file(data: Path, count: int, cache: Path, device: str) -> dict[str, Any]:
    """The old layout: one .npy per image, written atomically as computed, read back one by one."""
    import hashlib

    import numpy as np
    import torch

    from transferkit.features import _computed, _items, file_key
    from transferkit.files import atomic_write

    model, samples, memory = _model(device), _samples(data, count), PeakMemory()
    items = _items(samples, 1)
    root = cache / hashlib.sha1(b"per-file").hexdigest()[:20]
    root.mkdir(parents=True, exist_ok=True)
    timings = {}
    for label in ("cold", "warm"):
        started, rows = time.perf_counter(), {}
        todo = []
        for pos, (_, path, view) in enumerate(items):
            target = root / (file_key(path, view) + ".npy")
            if target.is_file():
                rows[pos] = np.load(target, allow_pickle=False)
            else:
                todo.append((pos, path, view))
        for pos, vec in _computed(model, todo, None, "none", 128, 0, torch.device(device), "32"):
            rows[todo[pos][0]] = vec
            atomic_write(root / (file_key(todo[pos][1], 0) + ".npy"), lambda tmp, v=vec: _save(tmp, v))
        matrix = np.stack([rows[p] for p in range(len(items))])
        timings[label] = {"seconds": round(time.perf_counter() - started, 2), "computed": len(todo)}
        del rows, matrix
    return {"files": sum(1 for _ in root.iterdir()), **timings, **memory.result()}


def _save(tmp: Path, vector: Any) -> None:
    import numpy as np

    with open(tmp, "wb") as f:
        np.save(f, vector, allow_pickle=False)


def phase_store(data: Path, count: int, cache: Path, device: str, matrix: bool) -> dict[str, Any]:
    import torch

    from transferkit.features import extract_features, store_features

    model, samples, memory = _model(device), _samples(data, count), PeakMemory()
    timings = {}
    for label in ("cold", "warm"):
        started = time.perf_counter()
        options = {"cache_dir": cache, "batch_size": 128, "num_workers": 0, "device": torch.device(device),
                   "precision": "32"}  # fmt: skip
        result = extract_features(model, samples, **options) if matrix else store_features(model, samples, **options)
        timings[label] = {"seconds": round(time.perf_counter() - started, 2), "computed": result.misses}
        del result
    files = sum(1 for p in cache.rglob("*") if p.is_file())
    return {"files": files, **timings, **memory.result()}


def phase_head(data: Path, count: int, cache: Path, device: str, source: str) -> dict[str, Any]:
    """One epoch of a linear head, as ``train`` feeds it: from the store's shards, or one in-memory matrix."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from transferkit.data import EpochSeededSampler
    from transferkit.features import store_features

    model, samples = _model(device), _samples(data, count)
    memory = PeakMemory()
    stored = store_features(model, samples, cache_dir=cache, batch_size=128, num_workers=0, precision="32")
    assert stored.misses == 0, "run the store phase first"
    dataset = stored.dataset() if source == "store" else TensorDataset(stored.to_feature_set().features, stored.labels)
    loader = DataLoader(dataset, batch_size=32, sampler=EpochSeededSampler(len(dataset), 0, with_aug_seeds=False))
    head = torch.nn.Linear(stored.store.dim(), 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    started = time.perf_counter()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(head(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"epoch_seconds": round(time.perf_counter() - started, 2), "rows": len(dataset), **memory.result()}


def phase_share(data: Path, count: int, cache: Path, device: str, rank: int, procs: int) -> dict[str, Any]:
    import torch

    from transferkit.features import store_features

    if procs > 1 and device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    where = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if device == "cuda" else torch.device("cpu")
    model, samples = _model(device), _samples(data, count)[rank::procs]
    started = time.perf_counter()
    result = store_features(model, samples, cache_dir=cache, batch_size=128, num_workers=0 if device == "cpu" else 4,
                            device=where, precision="32", writer_tag=f"rank{rank}")  # fmt: skip
    return {"seconds": round(time.perf_counter() - started, 2), "computed": result.misses}


def run_phase(args: argparse.Namespace, phase: str, *extra: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--phase", phase, "--images", str(args.images), "--workdir",
               str(args.workdir), "--device", args.device, *extra]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=_env())
    if out.returncode != 0:
        raise SystemExit(f"{phase} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    """The environment the ``transferkit`` command runs in (mimalloc, passive OpenMP threads).

    Without it, on this 2-core machine shared with other jobs, torch's two spinning OpenMP threads
    made extraction ~9x slower than one thread (134 s against 15 s for 20,000 images).
    """
    from transferkit.launch import fast_env

    return fast_env() or dict(os.environ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scale-out"))
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--phase")
    parser.add_argument("--count", type=int)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--source", default="store")
    args = parser.parse_args()
    data, work = args.workdir / "images", args.workdir
    if args.phase:  # a phase, in a process of its own (so its peak RSS is its own)
        count = args.count or args.images
        phases = {
            "per-file": lambda: phase_per_file(data, count, work / "per-file", args.device),
            "store": lambda: phase_store(data, count, work / "store", args.device, matrix=False),
            "store+matrix": lambda: phase_store(data, count, work / "store-matrix", args.device, matrix=True),
            "head": lambda: phase_head(data, count, work / "store", args.device, args.source),
            "share": lambda: phase_share(data, count, work / f"share-{args.procs}", args.device, args.rank,
                                         args.procs),
        }  # fmt: skip
        print(json.dumps(phases[args.phase]()))
        return
    import shutil

    import torch

    print(f"{args.images} images of {SIZE} px, {MODEL} (random weights), {args.device}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    started = time.perf_counter()
    make_images(data, args.images)
    print(f"images made in {time.perf_counter() - started:.0f} s")
    for name in ("per-file", "store", "store-matrix", "share-1", f"share-{args.procs}"):
        shutil.rmtree(work / name, ignore_errors=True)
    results: dict[str, Any] = {}
    for phase in ("per-file", "store", "store+matrix"):
        r = results[phase] = run_phase(args, phase)
        print(f"extract {phase:13s} files {r['files']:7d}  cold {args.images / r['cold']['seconds']:7.0f} img/s  "
              f"warm {r['warm']['seconds']:6.2f} s ({args.images / r['warm']['seconds']:.0f} img/s)  peak RSS {r['peak_rss_mb']:6.0f} MB  "
              f"(anon {r['peak_anon_mb']:.0f} MB)", flush=True)  # fmt: skip
    for count in sorted({min(10_000, args.images), args.images}):
        for source in ("store", "matrix"):
            r = results[f"head-{source}-{count}"] = run_phase(args, "head", "--count", str(count), "--source", source)
            print(f"head epoch  {source:6s} {count:7d} rows  {r['epoch_seconds']:6.2f} s  peak RSS "
                  f"{r['peak_rss_mb']:6.0f} MB  (anon {r['peak_anon_mb']:.0f} MB)", flush=True)  # fmt: skip
    for procs in (1, args.procs):
        started = time.perf_counter()
        ranks = [subprocess.Popen([sys.executable, __file__, "--phase", "share", "--images", str(args.images),
                                   "--workdir", str(work), "--device", args.device, "--rank", str(r),
                                   "--procs", str(procs)], stdout=subprocess.PIPE, text=True, env=_env())
                 for r in range(procs)]  # fmt: skip
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in ranks]
        seconds = time.perf_counter() - started
        results[f"procs-{procs}"] = {"seconds": round(seconds, 2), "ranks": outs}
        slowest = max(o["seconds"] for o in outs)
        print(f"extract by {procs} process(es): {seconds:6.1f} s wall with start-up ({args.images / seconds:.0f} "
              f"img/s), {slowest:.1f} s extracting ({args.images / slowest:.0f} img/s), computed per rank "
              f"{[o['computed'] for o in outs]}", flush=True)  # fmt: skip
    extracting = {p: max(o["seconds"] for o in results[f"procs-{p}"]["ranks"]) for p in (1, args.procs)}
    print(f"{args.procs} processes vs 1: {results['procs-1']['seconds'] / results[f'procs-{args.procs}']['seconds']:.2f}x "
          f"wall, {extracting[1] / extracting[args.procs]:.2f}x extracting")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
