"""Commands that run a trained model: ``evaluate`` on a labelled folder, ``predict`` on images."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, TextIO

from .common import (
    ApiChoices,
    Command,
    batch_size_option,
    bounded,
    cache_dir_option,
    checkpoint_run_options,
    data_options,
    data_options_given,
)


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (or its model.pt)")
    p.add_argument("data", help="folder with one sub-folder per class (a DATA root means its test/ or val/), or a "
                   "label file (its test rows, else its val rows, else every row)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print a JSON object (with 'accuracy') instead of a table")
    _trust_options(p)


def _trust_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average each image over 6 views "
                   "(itself, its mirror, 4 corner crops): about 6x the time")  # fmt: skip
    p.add_argument("--calibration", default="temperature", choices=("temperature", "none"),
                   help="temperature: the probabilities calibrated after training; none: the network's own softmax")


def _evaluate(args: argparse.Namespace) -> int:
    from .. import evaluate

    result = evaluate(args.run, args.data, batch_size=args.batch_size, precision=args.precision, compile=args.compile,
                      tta=args.tta, calibrated=args.calibration != "none",
                      data_options=data_options_given(args))  # fmt: skip
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    if result.tta and not args.json:
        t = result.tta
        print(f"\ntest-time augmentation ({len(t['views'])} views): accuracy {t['accuracy_without']:.4f} -> "
              f"{result.accuracy:.4f} ({t['accuracy_gain']:+.4f}), {t['seconds_without']:.1f} s -> "
              f"{t['seconds_with']:.1f} s ({t['cost']:.1f}x)")  # fmt: skip
    return 0


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory, its model.pt, or an ONNX export (.onnx)")
    p.add_argument("paths", nargs="+", help="image files, folders (searched recursively), or CSV files listing "
                                             "images in a path column")  # fmt: skip
    p.add_argument("--top-k", type=bounded(int, 1), default=3,
                   help="labels shown per image, most probable first (a multi-label run shows every label at or over "
                        "its threshold instead)")  # fmt: skip
    p.add_argument("--runtime", default="auto", choices=ApiChoices("RUNTIMES"), metavar="RUNTIME",
                   help="%(choices)s. auto: ONNX Runtime (when installed, on a CPU where the run's precision is fp32) "
                   "if the run has an export of its model.pt as it is now, or there are 256+ images (exported "
                   "once, verified, cached); else PyTorch")  # fmt: skip
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help='print [{"path", "predictions": [{"label", "probability"}]}]')
    output.add_argument("--csv", action="store_true", help="print CSV for a spreadsheet: path, label_1, probability_1, "
                        "..., error; one row per image, in order")  # fmt: skip
    p.add_argument("--explain", metavar="DIR", help="also write DIR/<image>_gradcam.png: Grad-CAM of the predicted "
                   "class over the image as the model saw it (its input size); images from several folders keep "
                   "their sub-folders (DIR/bees/1_gradcam.png); DIR must be new or empty")  # fmt: skip
    _trust_options(p)


def _predict(args: argparse.Namespace) -> int:
    from .. import format_predictions, predict
    from ..gradcam import check_explain_target, write_overlays

    if args.explain:
        check_explain_target(args.run, args.explain)  # before predicting: a refusal costs nothing
    results = predict(args.run, args.paths, top_k=args.top_k, batch_size=args.batch_size, precision=args.precision,
                      compile=args.compile, runtime=args.runtime, tta=args.tta,
                      calibrated=args.calibration != "none")  # fmt: skip
    if args.csv:
        _write_csv(results, sys.stdout)
    else:
        print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    if args.explain:
        answered = [r for r in results if not r.get("error")]  # each explained for the class printed
        written = write_overlays(args.run, [r["path"] for r in answered], args.explain, precision=args.precision,
                                 targets=[_printed_class(r) for r in answered])  # fmt: skip
        print(f"wrote {len(written)} Grad-CAM overlays to {args.explain}", file=sys.stderr)
    return 0 if all(not r.get("error") for r in results) else 1


def _printed_class(result: dict[str, Any]) -> str | None:
    """The class an image's overlay explains: the first printed; none for a multi-label image with no class
    over its threshold (its top class, then)."""
    return result["predictions"][0]["label"] if result["predictions"] else None


def _write_csv(results: list[dict[str, Any]], out: TextIO) -> None:
    """One row per image: its labels and probabilities, most probable first, or why it has none."""
    ranks = range(1, 1 + max((len(r["predictions"]) for r in results), default=0))
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", *(f"{kind}_{i}" for i in ranks for kind in ("label", "probability")), "error"])
    for r in results:
        cells = [cell for p in r["predictions"] for cell in (p["label"], f"{p['probability']:.6f}")]
        writer.writerow([r["path"], *cells, *[""] * (2 * len(ranks) - len(cells)), r.get("error", "")])


COMMANDS = (
    Command("evaluate", "Accuracy, per-class precision/recall/F1 and confusion matrix on a folder.", """
transferkit evaluate runs/efficientnet_lite0-feature-extract-20260101-120000 data/hymenoptera/val
transferkit evaluate runs/my-run data/test --json > metrics.json
transferkit evaluate runs/my-run test_images/ --labels test.csv --label-col diagnosis
""", _evaluate_arguments, _evaluate, parents=(batch_size_option, checkpoint_run_options, data_options,
                                                                 cache_dir_option)),
    Command("predict", "Predict labels of image files or folders.", """
transferkit predict runs/my-run photo.jpg more_photos/ --top-k 3
transferkit predict runs/my-run photos/ --json
transferkit predict runs/my-run photos/ --csv > predictions.csv
transferkit predict runs/my-run photos/ --explain heatmaps/
""", _predict_arguments, _predict, parents=(batch_size_option, checkpoint_run_options, cache_dir_option)),
)  # fmt: skip
