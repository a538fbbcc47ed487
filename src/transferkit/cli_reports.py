"""CLI commands of the reports module: registered by transferkit.cli; keep imports here light."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add this module's sub-commands to the transferkit parser (see transferkit.cli._parser)."""
    from .cli import _parser

    p = _parser(sub, "report", "Write a run's HTML report (curves, metrics, confusion matrix, mistakes).", """
transferkit report runs/efficientnet_lite0-feature-extract-20260101-120000
""")
    p.add_argument("run", help="run directory written by transferkit train")
    p.set_defaults(handler=_report)

    p = _parser(sub, "compare", "Compare runs side by side: metrics, strategies and times.", """
transferkit compare runs/*
transferkit compare runs/a runs/b --out comparison.html
""")
    p.add_argument("runs", nargs="+", help="run directories written by transferkit train")
    p.add_argument("--out", help="also write an HTML page with the table and a plot (FILE_plot.png beside it)")
    p.set_defaults(handler=_compare)


def _report(args: argparse.Namespace) -> int:
    from .reports import write_report

    print(write_report(args.run))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .reports import format_comparison, load_run, write_comparison

    runs = [load_run(r) for r in args.runs]
    print(format_comparison(runs))
    if args.out:
        print(f"\n{write_comparison(runs, args.out)}")
    return 0
