"""Feature extraction the seeds' way vs transferkit's way, in one run (not a test).

The seeds' way (the PyTorch transfer-learning tutorial): PIL ImageFolder, a plain loop, the frozen
backbone recomputed for every image in every epoch, fp32, SGD(0.001, momentum 0.9), StepLR(7, 0.1).
transferkit's way: `transferkit train DATA --strategy feature-extract` (the command, as a user runs it,
end to end: start-up, features computed once, head training, final evaluation, HTML report), cold cache.
Same backbone, same data, 10 epochs each; prints the CPU kind, both wall times, their ratio, both
accuracies, and where transferkit's time went: start-up (the imports a run needs, timed in a process
of their own), features, head training, final evaluation, and the report with process exit (the rest).

    python benchmarks/feature_extract.py [DATA] [--model efficientnet_lite0] [--weights DEFAULT] [--epochs 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from transferkit import load_backbone
from transferkit.launch import fast_env
from transferkit.backbones import get_module, set_module

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def seeds_way(data: Path, model_name: str, weights: str, epochs: int) -> tuple[float, float]:
    """The tutorial's loop, unchanged in substance: returns (seconds, best val accuracy)."""
    torch.manual_seed(0)
    backbone = load_backbone(model_name, weights)
    prep = backbone.preprocessing
    normalize = transforms.Normalize(prep.mean, prep.std)
    tf = {
        "train": transforms.Compose([transforms.RandomResizedCrop(prep.image_size), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), normalize]),
        "val": transforms.Compose([transforms.Resize(prep.resize_size), transforms.CenterCrop(prep.image_size),
                                   transforms.ToTensor(), normalize]),
    }  # fmt: skip
    sets = {x: datasets.ImageFolder(str(data / x), tf[x]) for x in ("train", "val")}
    loaders = {x: torch.utils.data.DataLoader(sets[x], batch_size=32, shuffle=x == "train", num_workers=1)
               for x in ("train", "val")}  # fmt: skip
    model = backbone.model
    for p in model.parameters():
        p.requires_grad = False
    head = get_module(model, backbone.classifier_path)
    set_module(model, backbone.classifier_path, nn.Linear(head.in_features, len(sets["train"].classes)))
    new_head = get_module(model, backbone.classifier_path)
    optimizer = torch.optim.SGD(new_head.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    criterion = nn.CrossEntropyLoss()
    best_acc, best_wts = 0.0, copy.deepcopy(model.state_dict())
    start = time.perf_counter()
    for _ in range(epochs):
        for phase in ("train", "val"):
            model.train(phase == "train")
            correct = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                correct += int((outputs.argmax(1) == labels).sum())
            if phase == "train":
                scheduler.step()
            acc = correct / len(sets[phase])
            if phase == "val" and acc > best_acc:
                best_acc, best_wts = acc, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_wts)  # as the tutorial ends
    return time.perf_counter() - start, best_acc


def transferkit_way(data: Path, model_name: str, weights: str, epochs: int) -> tuple[float, dict]:
    """As a user runs it: the `transferkit` command (its own allocator), a cold feature cache."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TRANSFERKIT_CACHE_DIR": str(Path(tmp) / "cache")}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--model", model_name, "--weights",
                        weights, "--strategy", "feature-extract", "--epochs", str(epochs), "--out",
                        str(Path(tmp) / "run"), "--quiet"], env=env, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        seconds = time.perf_counter() - start
        return seconds, json.loads((Path(tmp) / "run" / "metrics.json").read_text())


def startup_seconds() -> float:
    """What a training run imports before it starts (torch, torchvision, Lightning, ...), timed inside a fresh
    process that pauses the cyclic collector while torch imports and defers torch._dynamo, as the command
    does (transferkit.launch)."""
    code = ("import time; start = time.perf_counter(); from transferkit.launch import "
            "pause_collector_until_torch_imports; pause_collector_until_torch_imports(); "
            "from transferkit.deferred_dynamo import defer_dynamo; defer_dynamo(); "
            "import transferkit.workflow, transferkit.reports, transferkit.cli; print(time.perf_counter() - start)")  # fmt: skip
    env = {**os.environ, **(fast_env() or {})}
    return float(subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True).stdout)


def main() -> None:
    from transferkit.performance import cpu_kind, cpu_model, restart_as_avx2_cpu

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--weights", default="none", help="none: random weights (resnet18's need a download)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5, help="transferkit runs (medians are printed: VMs are noisy)")
    parser.add_argument("--as-avx2", action="store_true",
                        help="run as a CPU that reports AVX2 only: kernels limited to AVX2, no native bf16")
    parser.add_argument("--skip-seeds", action="store_true", help="transferkit's side and its breakdown only")
    args = parser.parse_args()
    if args.as_avx2:
        restart_as_avx2_cpu()
    # transferkit's runs on both sides of the seeds' one: a machine that drifts during the seeds'
    # two minutes moves the ratio less than with all of them before it.
    before = (args.repeat + 1) // 2
    runs = [transferkit_way(args.data, args.model, args.weights, args.epochs) for _ in range(before)]
    seeds_s, seeds_acc = (float("nan"), float("nan")) if args.skip_seeds else seeds_way(args.data, args.model, args.weights, args.epochs)
    runs += [transferkit_way(args.data, args.model, args.weights, args.epochs) for _ in range(args.repeat - before)]
    start_s = statistics.median(startup_seconds() for _ in range(args.repeat))

    def median(of: Callable[[float, dict], float]) -> float:
        return statistics.median(of(seconds, metrics) for seconds, metrics in runs)

    def spread(of: Callable[[float, dict], float]) -> str:
        values = [of(seconds, metrics) for seconds, metrics in runs]
        return f"{statistics.median(values):6.2f} s  ({min(values):.2f}-{max(values):.2f})"

    ours_s = median(lambda s, m: s)
    train_s = median(lambda s, m: m["train_seconds"])
    metrics = runs[0][1]
    print(f"{args.epochs} epochs of feature extraction, {args.model} (--weights {args.weights}), {args.data}; "
          f"{cpu_model()}: {cpu_kind()}; transferkit's figures are medians of {len(runs)} runs (min-max)")  # fmt: skip
    print(f"  seeds' way (backbone recomputed every epoch, fp32, PIL): {seeds_s:7.1f} s   val accuracy {seeds_acc:.4f}"
          + ("" if args.skip_seeds else f"   (run between transferkit's runs {before} and {before + 1})"))
    print(f"  transferkit (features computed once, cold cache):        {ours_s:7.1f} s   val accuracy "
          f"{metrics['val_accuracy']:.4f}   features at {metrics['feature_cache']['precision']}")
    print(f"  speed-up {seeds_s / ours_s:.1f}x end to end, {seeds_s / train_s:.1f}x training alone; "
          f"accuracy difference {100 * (metrics['val_accuracy'] - seeds_acc):+.1f} points")
    print("  where transferkit's time went:")
    print(f"    start-up (imports, timed alone)  {start_s:6.2f} s")
    print(f"    features (computed once)         {spread(lambda s, m: m['feature_seconds'])}")
    print(f"    head training ({args.epochs} epochs)       {spread(lambda s, m: m['train_seconds'] - m['feature_seconds'])}")
    print(f"    final evaluation                 {spread(lambda s, m: m.get('evaluation_seconds', float('nan')))}"
          f"   ({metrics.get('evaluated_on', 'images')})")  # fmt: skip
    print(f"    report and exit (the rest)       {spread(lambda s, m: s - m['total_seconds'] - start_s)}")
    print(f"  fixed cost beyond features and head training: {spread(lambda s, m: s - m['train_seconds'])}")


if __name__ == "__main__":
    main()
