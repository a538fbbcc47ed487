"""`--strategy auto --budget B` against each fixed strategy run by hand, measured in one run.

For each dataset, every row is a full `transferkit.train` (fresh run directory, shared feature
cache, as a user's second run would have it): the measured choice, then feature-extract, a
logistic probe on the last and on an earlier layer, fine-tuning the last 2 groups and full
training. Trainable strategies get the epochs that fit the same budget (measured from their first
epoch), so every row had the same time to work with. Prints validation accuracy (the split that
auto never looked at), seconds, and what auto chose.

    .venv/bin/python benchmarks/selection.py [--budget 120] [--datasets hymenoptera,digits,fashion_mnist_subset]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import transferkit
from transferkit.demo import write_digits_folder
from transferkit.performance import cpu_kind, cpu_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MODEL = "efficientnet_lite0"


def dataset(name: str, work: Path) -> Path:
    if name == "digits":
        return write_digits_folder(work / "digits")
    path = SHARED / name
    if not path.is_dir():
        raise SystemExit(f"{path} is missing (the shared datasets beside the checkout)")
    return path


def run(data: Path, out: Path, **options: object) -> dict:
    started = time.perf_counter()
    result = transferkit.train(data, model=MODEL, out=str(out), quiet=True, **options)
    return {"val_accuracy": result.val_accuracy, "seconds": time.perf_counter() - started, "metrics": result.metrics,
            "history": result.history}


def epochs_within(data: Path, work: Path, budget: float, **options: object) -> int:
    """Epochs of a trainable strategy that fit ``budget``, from the time its first epoch takes."""
    probe = run(data, work / f"probe-{options['strategy']}", epochs=1, **options)
    per_epoch = probe["history"][0]["seconds"]
    fixed_cost = probe["seconds"] - per_epoch  # start-up, final evaluation, report
    return max(1, int((budget - fixed_cost) // per_epoch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds for auto, and for each fixed strategy")
    parser.add_argument("--datasets", default="hymenoptera,digits,fashion_mnist_subset")
    args = parser.parse_args()
    print(f"transferkit {transferkit.__version__}, {cpu_model()}: {cpu_kind()}, {MODEL}, "
          f"budget {args.budget:.0f} s per row")
    work = Path(tempfile.mkdtemp(prefix="tk-selection-"))
    os.environ["TRANSFERKIT_CACHE_DIR"] = str(work / "cache")  # every dataset starts with a cold cache
    summary = []
    for name in args.datasets.split(","):
        data = dataset(name, work)
        rows = {"auto": run(data, work / name / "auto", strategy="auto", budget=f"{args.budget}s")}
        chosen = rows["auto"]["metrics"]["selection"]["winner"]
        advice_layer = transferkit.advise(data, MODEL).options.get("layer")
        rows["feature-extract"] = run(data, work / name / "fe", strategy="feature-extract")
        rows["linear-probe (last layer)"] = run(data, work / name / "lp", strategy="linear-probe")
        rows[f"linear-probe ({advice_layer or 'earlier'})"] = run(
            data, work / name / "lp-early", strategy="linear-probe", layer=advice_layer or "blocks.3")
        for label, options in (("fine-tune 2 groups", {"strategy": "fine-tune", "unfreeze": 2}),
                               ("full", {"strategy": "full", "lr": 3e-4})):  # fmt: skip
            epochs = epochs_within(data, work / name, args.budget, **options)
            rows[f"{label} ({epochs} epochs)"] = run(data, work / name / label.split()[0], epochs=epochs, **options)
        fixed = {k: v for k, v in rows.items() if k != "auto"}
        best_label = max(fixed, key=lambda k: fixed[k]["val_accuracy"])
        print(f"\n{name}: auto chose {chosen['backbone']} {chosen['strategy']} "
              f"{chosen.get('layer') or ''} (holdout {chosen['score']:.4f})")
        print(f"| strategy | val accuracy | seconds | vs best fixed | vs feature-extract |")
        print("|---|---|---|---|---|")
        for label, row in rows.items():
            print(f"| {label} | {row['val_accuracy']:.4f} | {row['seconds']:.0f} | "
                  f"{(row['val_accuracy'] - fixed[best_label]['val_accuracy']) * 100:+.1f} pt | "
                  f"{(row['val_accuracy'] - fixed['feature-extract']['val_accuracy']) * 100:+.1f} pt |")
        summary.append({"dataset": name, "auto": rows["auto"]["val_accuracy"], "best_fixed": best_label,
                        "best_fixed_accuracy": fixed[best_label]["val_accuracy"],
                        "feature_extract": fixed["feature-extract"]["val_accuracy"]})
    print("\n" + json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
