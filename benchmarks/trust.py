"""How far to trust a prediction, measured (not a test): calibration, test-time augmentation, k-fold.

For each dataset (default: ../shared/datasets/hymenoptera and fashion_mnist_subset), with
efficientnet_lite0's offline ImageNet weights and a frozen backbone (10 head epochs):
- calibration: expected calibration error and NLL of the validation predictions before and after
  the temperature fitted on them (as every run does);
- test-time augmentation: validation accuracy without and with `--tta` (6 views), and the time of each;
- k-fold: `--folds 5` mean ± std of validation accuracy, against the single split's.

    python benchmarks/trust.py [DATA ...] [--folds 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULT_DATA = (SHARED / "hymenoptera", SHARED / "fashion_mnist_subset")
OPTIONS = {"model": "efficientnet_lite0", "weights": "DEFAULT", "strategy": "feature-extract", "epochs": 10,
           "quiet": True}  # fmt: skip


def measure(data: Path, folds: int, tmp: Path) -> dict:
    from transferkit import evaluate, train

    single = train(data, **OPTIONS, out=str(tmp / f"{data.name}-single"))
    c = single.metrics["calibration"]
    evaluation = evaluate(single.run_dir, data, tta=True)  # a DATA root with val/ means its val images
    kfold = train(data, **OPTIONS, folds=folds, out=str(tmp / f"{data.name}-folds"))
    return {"accuracy": single.val_accuracy, "temperature": c["temperature"], "ece": (c["ece_before"], c["ece_after"]),
            "nll": (c["nll_before"], c["nll_after"]), "tta": evaluation.tta, "tta_accuracy": evaluation.accuracy,
            "kfold": (kfold.metrics["val_accuracy"], kfold.metrics["val_accuracy_std"])}  # fmt: skip


def main() -> None:
    from transferkit.performance import cpu_kind, cpu_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", type=Path, default=list(DEFAULT_DATA))
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    print(f"efficientnet_lite0 (ImageNet), feature-extract, 10 epochs; {cpu_model()}: {cpu_kind()}")
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            r = measure(data, args.folds, Path(tmp))
            t = r["tta"]
            print(f"\n{data.name}")
            print(f"  calibration: T = {r['temperature']:.3f}; ECE {r['ece'][0]:.4f} -> {r['ece'][1]:.4f}; "
                  f"NLL {r['nll'][0]:.4f} -> {r['nll'][1]:.4f}")
            print(f"  TTA ({len(t['views'])} views): accuracy {t['accuracy_without']:.4f} -> {r['tta_accuracy']:.4f} "
                  f"({t['accuracy_gain']:+.4f}); {t['seconds_without']:.1f} s -> {t['seconds_with']:.1f} s "
                  f"({t['cost']:.1f}x)")
            print(f"  single split: val accuracy {r['accuracy']:.4f}; {args.folds}-fold: {r['kfold'][0]:.4f} "
                  f"± {r['kfold'][1]:.4f}")


if __name__ == "__main__":
    main()
