"""Commands that read finished runs: ``report`` (one run's HTML page) and ``compare`` (runs side by side)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import Command, cache_dir_option


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory written by transferkit train")


def _report(args: argparse.Namespace) -> int:
    from .. import write_report

    print(write_report(args.run))
    return 0


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories written by transferkit train")
    p.add_argument("--out", help="also write an HTML page with the table and a plot (FILE_plot.png beside it)")


def _compare(args: argparse.Namespace) -> int:
    from .. import format_comparison, load_run, write_comparison
    from ..files import new_files

    if args.out:
        out = Path(args.out).expanduser()
        new_files("--out", out, out.with_name(f"{out.stem}_plot.png"))
    runs = [load_run(run) for run in args.runs]
    print(format_comparison(runs))
    if args.out:
        print(f"\n{write_comparison(runs, args.out)}")
    return 0


COMMANDS = (
    Command("report", "Write a run's HTML report (curves, metrics, confusion matrix, mistakes).", """
transferkit report runs/efficientnet_lite0-feature-extract-20260101-120000
""", _report_arguments, _report, parents=(cache_dir_option,)),
    Command("compare", "Compare runs side by side: metrics, strategies and times.", """
transferkit compare runs/*
transferkit compare runs/a runs/b --out comparison.html
""", _compare_arguments, _compare),
)  # fmt: skip
