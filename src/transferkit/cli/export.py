"""The ``export`` command: a trained model as ONNX or torch.export (pt2), checked against its checkpoint."""

from __future__ import annotations

import argparse
import sys

from .common import ApiChoices, Command, bounded, cache_dir_option


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory (or its model.pt)")
    # torchscript is accepted so that the library can say it is retired and what replaces it.
    p.add_argument("--format", default="onnx", choices=ApiChoices("FORMATS", unlisted=["torchscript"]), metavar="FORMAT",
                   help="onnx (ONNX Runtime) or pt2 (torch.export; PyTorch alone)")  # fmt: skip
    p.add_argument("--out", help="output file (default RUN/model.onnx or RUN/model.pt2); "
                   "the sidecar FILE.json holds class names and preprocessing")  # fmt: skip
    p.add_argument("--quantize", choices=ApiChoices("QUANTIZATIONS"), metavar="TYPE",
                   help="int8: ONNX Runtime static quantization calibrated on the run's training images "
                   "(default --out RUN/model.int8.onnx), checked on its validation images")  # fmt: skip
    p.add_argument("--max-drop", type=bounded(float, -100, 100), help="with --quantize: largest accepted accuracy "
                   "drop against fp32, in points (default 2)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing output file and its sidecar; "
                   "with --quantize, keep a model whose accuracy dropped more than --max-drop")  # fmt: skip
    p.add_argument("--tolerance", type=bounded(float, 0, low_open=True), help="largest accepted difference between the export's and the "
                   "checkpoint's probabilities (default 1e-4)")  # fmt: skip


def _export(args: argparse.Namespace) -> int:
    from .. import DEFAULT_MAX_DROP, DEFAULT_TOLERANCE, TransferkitError, export

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if args.max_drop is not None and args.quantize is None:
        raise TransferkitError("--max-drop applies to --quantize int8")
    max_drop = DEFAULT_MAX_DROP if args.max_drop is None else args.max_drop
    result = export(args.run, args.format, args.out, force=args.force, tolerance=tolerance, quantize=args.quantize,
                    max_drop=max_drop)  # fmt: skip
    print(result.summary(), file=sys.stderr)
    print(result.path)
    return 0


COMMANDS = (
    Command("export", "Export a trained model to ONNX or torch.export (pt2), checked against its checkpoint.", """
transferkit export runs/my-run                                   # runs/my-run/model.onnx + model.onnx.json
transferkit export runs/my-run --format pt2 --out classifier.pt2   # + classifier.pt2.json
transferkit export runs/my-run --quantize int8                  # runs/my-run/model.int8.onnx, accuracy checked
transferkit predict runs/my-run/model.onnx photos/              # runs it with ONNX Runtime
""", _export_arguments, _export, parents=(cache_dir_option,)),
)  # fmt: skip
