"""`transferkit inspect`: seconds per 1,000 images beyond feature extraction (not a test).

For each dataset the features are extracted first, into a fresh cache, and timed alone; then
`inspect_data` runs on the warm cache, twice in the same process: the first run pays the imports
of scikit-learn, cleanlab and pandas (what one `transferkit inspect` command pays),
the second is the steady state (the imports are paid once per process, by the first dataset). "Beyond extraction" is the checks (neighbours, cross-validated
probe + cleanlab, hashing, pairs, outliers) plus writing the page, its thumbnails, the JSON and
the list; reading the cached features back (and loading the backbone) is shown beside it.

Datasets: ../shared/datasets/hymenoptera (398 photos, efficientnet_lite0 at its 224 px) when
present, and N generated 64 px shape images in 10 classes (default 3,000; efficientnet_lite0 at
64 px, which keeps extraction short and the feature dimension, 1280, the same).

    python benchmarks/inspect_data.py [--images 3000] [--no-hymenoptera] [--neighbours-rows 20000]

`--neighbours-rows N` also times the nearest-neighbour search alone on N random 512-d features,
transferkit's blockwise search against scikit-learn's brute-force `NearestNeighbors` (the way it
was done before), taking turns, and checks that both find the same neighbours.

(Not benchmarks/inspect.py: run as a script, that name would shadow the standard library's inspect.)
"""

from __future__ import annotations

import argparse
import colorsys
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def make_shapes(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    """``count`` 64 px images, ``classes`` hues, 80 % in train/ and 20 % in val/."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = i % classes
        split = "val" if (i // classes) % 5 == 0 else "train"
        folder = root / split / f"hue{label}"
        folder.mkdir(parents=True, exist_ok=True)
        grey = int(rng.integers(70, 190))
        image = Image.new("RGB", (64, 64), (grey, grey, grey))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(4, 8))):
            r, g, b = colorsys.hsv_to_rgb((label / classes + rng.normal(0, 0.02)) % 1, rng.uniform(0.7, 1), 0.9)
            x0, y0 = rng.integers(-8, 48, 2)
            w, h = rng.integers(12, 40, 2)
            shape = draw.ellipse if rng.integers(0, 2) else draw.rectangle
            shape([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=(int(r * 255), int(g * 255), int(b * 255)))
        image.save(folder / f"{i}.png")


def measure(name: str, data: Path, workdir: Path, preprocessing: object) -> dict[str, float]:
    from transferkit import inspect_data
    from transferkit.features import extract_features

    cache = workdir / f"cache-{name}"
    from transferkit import TransferModel, load_backbone
    from transferkit.data import discover

    splits = discover(data)
    samples = [(str(Path(p).absolute()), 0) for p, _ in splits.train + splits.val + (splits.test or [])]
    start = time.perf_counter()
    model = TransferModel(load_backbone("efficientnet_lite0", "DEFAULT", preprocessing=preprocessing),
                          splits.class_names).eval()  # fmt: skip
    features = extract_features(model, samples, cache_dir=cache)
    cold = time.perf_counter() - start
    runs = []
    for attempt in ("first", "again"):
        start = time.perf_counter()
        result = inspect_data(data, preprocessing=preprocessing, cache_dir=cache, out=workdir / f"{name}-{attempt}")
        total = time.perf_counter() - start
        beyond = result.timings["checks"] + result.timings["page"]
        runs.append({"total": total, "read": result.timings["features"], "beyond": beyond, **result.timings,
                     "found": (len(result.label_issues), len(result.duplicates) + len(result.leaks),
                               len(result.outliers))})  # fmt: skip
        assert result.feature_cache["misses"] == 0, "the cache was not warm"
    n = len(features.paths)
    print(f"\n{name}: {n} images, {features.features.shape[1]}-d features; extraction (cold cache) {cold:.1f} s "
          f"= {cold / n * 1000:.0f} s per 1,000")  # fmt: skip
    for attempt, run in zip(("first in a process", "again"), runs):
        print(f"  {attempt:<19} beyond extraction {run['beyond']:6.2f} s = {run['beyond'] / n * 1000:5.2f} s per 1,000"
              f"  (neighbours {run['neighbours']:.2f}, label issues {run['label_issues']:.2f}, hashing "
              f"{run['hashing']:.2f}, page {run['page']:.2f}); cached features read + backbone {run['read']:.2f} s;"
              f" label issues/pairs/outliers found {run['found']}")  # fmt: skip
    return {"images": n, "cold": cold, "first": runs[0]["beyond"], "again": runs[1]["beyond"]}


def compare_neighbour_search(rows: int, rounds: int = 3) -> None:
    from sklearn.neighbors import NearestNeighbors

    from transferkit.inspection_checks import nearest_neighbours

    x = np.random.default_rng(0).standard_normal((rows, 512)).astype(np.float32)
    ours, theirs = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        index, _ = nearest_neighbours(x, 10)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        _, found = NearestNeighbors(n_neighbors=11, metric="cosine", algorithm="brute").fit(x).kneighbors(x)
        theirs.append(time.perf_counter() - start)
    same = np.mean([set(a) == set(b[1:]) for a, b in zip(index, found)])
    ours_s, theirs_s = sorted(ours)[rounds // 2], sorted(theirs)[rounds // 2]
    print(f"nearest neighbours, {rows} x 512, k=10 (medians of {rounds}): transferkit {ours_s:.2f} s, "
          f"scikit-learn brute force {theirs_s:.2f} s ({theirs_s / ours_s:.1f}x); same neighbours for {same:.1%} of rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="generated images")
    parser.add_argument("--no-hymenoptera", action="store_true")
    parser.add_argument("--neighbours-rows", type=int, default=0, help="also time the neighbour search alone")
    args = parser.parse_args()
    import torch

    from transferkit.backbones import explicit_preprocessing
    from transferkit.performance import cpu_kind, cpu_model

    print(f"CPU: {cpu_model()}: {cpu_kind()}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)
        if not args.no_hymenoptera and (SHARED / "datasets" / "hymenoptera").is_dir():
            measure("hymenoptera", SHARED / "datasets" / "hymenoptera", work, None)
        make_shapes(work / "shapes", args.images)
        measure("generated", work / "shapes", work, explicit_preprocessing("efficientnet_lite0", image_size=64))
    if args.neighbours_rows:
        compare_neighbour_search(args.neighbours_rows)


if __name__ == "__main__":
    sys.exit(main())
