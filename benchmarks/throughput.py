"""End-to-end CPU throughput, transferkit's way vs the seeds' way, in one run (not a test).

For resnet18 and efficientnet_lite0, on generated 500x375 JPEGs:
- the limit: the model's pure forward throughput at transferkit's chosen precision and layout;
- transferkit's images/s for feature extraction, predict (eager, and ONNX Runtime on an export, whose
  own forward throughput is its limit) and one fine-tune epoch (last 2 groups), each as a fraction
  of the limit, in a process started the way the `transferkit` command starts
  (mimalloc preloaded, OMP_WAIT_POLICY=PASSIVE);
- the same jobs the seeds' way (fp32, glibc malloc, PIL decoding, plain loop), and the ratio.

    python benchmarks/throughput.py [--images 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ("resnet18", "efficientnet_lite0")
ROUNDS = 3
LIMIT_BATCHES = 4


def make_jpegs(root: Path, count: int) -> None:
    """Smooth random scenes (JPEG-compressible like photos), two classes."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        noise = rng.integers(0, 255, (375 // 8, 500 // 8, 3)).astype(np.uint8)
        image = Image.fromarray(noise).resize((500, 375), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        image.save(folder / f"{i}.jpg", quality=90)


def ours(data: Path) -> dict:
    import statistics

    import torch

    from transferkit import TransferModel, load_backbone
    from transferkit.data import build_transform, make_loader, scan_class_folder
    from transferkit.exports import export_model
    from transferkit.prediction import onnx_session
    from transferkit.features import extract_features
    from transferkit.inference import predict
    from transferkit.performance import autocast, pick_device, resolve_precision, to_fast_layout
    from transferkit.training import quiet_lightning

    quiet_lightning()
    names, samples, _ = scan_class_folder(data)
    files = [p for p, _ in samples]
    device = pick_device()
    out = {}
    for name in MODELS:
        weights = "DEFAULT" if name == "efficientnet_lite0" else "none"
        model = TransferModel(load_backbone(name, weights), names).eval()
        precision = resolve_precision("auto", device)
        to_fast_layout(model)
        onnx = export_model(model, data.parent / f"{name}.onnx", "onnx").path
        session = onnx_session(onnx)
        # The limit runs on the same images, decoded beforehand: activations (and their cost) as in the jobs.
        batch = next(iter(make_loader(samples[:32], build_transform(model.preprocessing, "none"), 32)))[0]
        x = batch.contiguous(memory_format=torch.channels_last)

        def forward(x: torch.Tensor = x) -> None:
            with torch.inference_mode(), autocast(device, precision):
                for _ in range(LIMIT_BATCHES):
                    model(x)

        def onnx_forward(x: torch.Tensor = x) -> None:
            for _ in range(LIMIT_BATCHES):
                session.run(None, {"images": x.contiguous().numpy()})

        jobs = {
            "limit": (32 * LIMIT_BATCHES, forward),
            "features": (len(samples), lambda: extract_features(model, samples, use_cache=False, precision=precision)),
            "predict": (len(samples), lambda: predict(model, files, precision=precision)),
            "onnx_limit": (32 * LIMIT_BATCHES, onnx_forward),
            "onnx_predict": (len(samples), lambda: predict(onnx, files)),
        }
        # One warm-up each, then the jobs take turns, so that a neighbour's load slows them alike.
        rates: dict[str, list[float]] = {job: [] for job in jobs}
        for round_ in range(ROUNDS + 1):
            for job, (count, run) in jobs.items():
                start = time.perf_counter()
                run()
                if round_:
                    rates[job].append(count / (time.perf_counter() - start))
        out[name] = {job: statistics.median(r) for job, r in rates.items()}
        out[name] |= {"fine_tune": _fine_tune_epoch(model, samples, names, device), "precision": precision}
    return out


def _fine_tune_epoch(model, samples, names, device) -> float:
    import lightning as L

    from transferkit import apply_strategy
    from transferkit.training import LIGHTNING_PRECISION, TrainConfig
    from transferkit.training.fit import learner_and_loaders, training_precision

    config = TrainConfig(data="-", strategy="fine-tune", unfreeze=2, epochs=1, quiet=True)
    spec = config.strategy_spec()
    apply_strategy(model, spec)
    splits = type("Splits", (), {"train": samples, "val": samples[:1], "skipped": []})()
    learner, train_loader, _, _ = learner_and_loaders(model, spec, splits, config, device)
    # At the precision `transferkit train` picks here (bf16 where the CPU has it, unless depthwise layers train).
    precision = LIGHTNING_PRECISION[training_precision(config.precision, device, model, spec, config.epochs)]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator=device.type,
                        precision=precision)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(learner, train_loader)
    return len(samples) / (time.perf_counter() - start)


def seeds(data: Path) -> dict:
    """The tutorial's loops: PIL ImageFolder, fp32, contiguous layout, glibc malloc."""
    import statistics

    import torch
    from torch import nn
    from torchvision import datasets, transforms

    from transferkit import load_backbone
    from transferkit.backbones import get_module, set_module

    out = {}
    for name in MODELS:
        backbone = load_backbone(name, "DEFAULT" if name == "efficientnet_lite0" else "none")
        p = backbone.preprocessing
        norm = transforms.Normalize(p.mean, p.std)
        eval_tf = transforms.Compose([transforms.Resize(p.resize_size), transforms.CenterCrop(p.image_size),
                                      transforms.ToTensor(), norm])  # fmt: skip
        train_tf = transforms.Compose([transforms.RandomResizedCrop(p.image_size), transforms.RandomHorizontalFlip(),
                                       transforms.ToTensor(), norm])  # fmt: skip
        model = backbone.model.eval()
        head = get_module(model, backbone.classifier_path)
        set_module(model, backbone.classifier_path, nn.Linear(head.in_features, 2))
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(data), eval_tf), batch_size=32, num_workers=1)
        n = len(loader.dataset)

        def features() -> None:
            with torch.no_grad():
                for x, _ in loader:
                    model(x)  # the tutorial's frozen-backbone pass: the whole network, every time

        def predicted() -> None:
            with torch.no_grad():
                for x, _ in loader:
                    model(x).softmax(1)

        rates: dict[str, list[float]] = {"features": [], "predict": []}
        for round_ in range(ROUNDS + 1):  # as for ours: a warm-up, then turns, medians
            for job, run in (("features", features), ("predict", predicted)):
                start = time.perf_counter()
                run()
                if round_:
                    rates[job].append(n / (time.perf_counter() - start))
        groups = backbone.groups[-3:-1]
        params = [p for n_, p in model.named_parameters() if any(n_.startswith(q) for g in groups for q in g.prefixes)]
        optimizer = torch.optim.SGD(params + list(get_module(model, backbone.classifier_path).parameters()), lr=1e-3,
                                    momentum=0.9)  # fmt: skip
        train_loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(data), train_tf), batch_size=32,
                                                   shuffle=True, num_workers=1)  # fmt: skip
        model.train()
        start = time.perf_counter()
        for x, y in train_loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        out[name] = {job: statistics.median(r) for job, r in rates.items()}
        out[name]["fine_tune"] = n / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--as-avx2", action="store_true",
                        help="run as a CPU that reports AVX2 only: kernels limited to AVX2, no native bf16")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--child", choices=["ours", "seeds"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from transferkit.performance import cpu_kind, cpu_model, restart_as_avx2_cpu

    if args.as_avx2:
        restart_as_avx2_cpu()
    if args.child:
        print(json.dumps((ours if args.child == "ours" else seeds)(args.data)))
        return
    from transferkit.launch import fast_env

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "jpegs"
        make_jpegs(data, args.images)
        runs = {}
        for way, env in (("ours", fast_env() or dict(os.environ)),
                         ("seeds", {**os.environ, "TRANSFERKIT_ALLOCATOR": "default"})):  # fmt: skip
            proc = subprocess.run([sys.executable, __file__, "--child", way, "--data", str(data)], env=env,
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            runs[way] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"CPU: {cpu_model()}: {cpu_kind()} (ONNX Runtime picks its own kernels whatever the limit)")
    print(
        f"{args.images} generated 500x375 JPEGs, images/s, medians of {ROUNDS} turns (transferkit precision: "
        f"{runs['ours'][MODELS[0]]['precision']}, channels_last, mimalloc; ONNX rows: ONNX Runtime on an export)"
    )
    print(f"{'model':<20} {'job':<16} {'limit':>7} {'ours':>7} {'of limit':>9} {'seeds':>7} {'ours/seeds':>10}")
    for name in MODELS:
        o, s = runs["ours"][name], runs["seeds"][name]
        rows = [("features", "limit", "features"), ("predict", "limit", "predict"),
                ("predict (ONNX)", "onnx_limit", "predict"), ("fine-tune epoch", None, "fine_tune")]  # fmt: skip
        for job, limit_key, seeds_job in rows:
            key = {"predict (ONNX)": "onnx_predict", "fine-tune epoch": "fine_tune"}.get(job, job)
            limit = f"{o[limit_key]:7.1f}" if limit_key else f"{'':>7}"
            share = f"{o[key] / o[limit_key]:9.0%}" if limit_key else f"{'':>9}"
            print(
                f"{name:<20} {job:<16} {limit} {o[key]:7.1f} {share} {s[seeds_job]:7.1f} {o[key] / s[seeds_job]:10.2f}"
            )


if __name__ == "__main__":
    main()
