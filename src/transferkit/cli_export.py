"""CLI commands of the export module: registered by transferkit.cli; keep imports here light."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli import _parser


def register(sub: Any) -> None:
    """Add this module's sub-commands to the transferkit parser (see transferkit.cli._parser)."""
    p = _parser(sub, "export", "Export a trained model to ONNX or torch.export (pt2), checked against its checkpoint.", """
transferkit export runs/my-run                                   # runs/my-run/model.onnx + model.onnx.json
transferkit export runs/my-run --format pt2 --out classifier.pt2   # + classifier.pt2.json
transferkit predict runs/my-run/model.onnx photos/              # runs it with ONNX Runtime
""")
    p.add_argument("run", help="run directory (or its model.pt)")
    p.add_argument("--format", default="onnx", help="onnx (default; ONNX Runtime) or pt2 (torch.export; PyTorch alone)")
    p.add_argument("--out", help="output file (default RUN/model.onnx or RUN/model.pt2); "
                   "the sidecar FILE.json holds class names and preprocessing")  # fmt: skip
    p.add_argument("--force", action="store_true", help="overwrite an existing output file and its sidecar")
    p.add_argument("--tolerance", type=float, help="largest accepted difference between the export's and the "
                   "checkpoint's probabilities (default 1e-4)")  # fmt: skip
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from .export import DEFAULT_TOLERANCE, export

    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    result = export(args.run, args.format, args.out, force=args.force, tolerance=tolerance)
    print(result.summary(), file=sys.stderr)
    print(result.path)
    return 0
