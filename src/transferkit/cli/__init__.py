"""``transferkit`` command line: thin commands over the Python API.

Each module below lists its commands as ``COMMANDS`` (:class:`~transferkit.cli.common.Command`
records); :func:`build_parser` registers them all the same way. Handlers import the API lazily,
so that the parser (and ``transferkit --help``) is built without importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import TransferkitError
from . import explore, export, inspect, maintenance, pack, predict, reports, serve, train
from .common import Command, HelpFormatter, Parser

COMMAND_MODULES = (train, predict, explore, inspect, pack, export, serve, reports, maintenance)
COMMANDS: tuple[Command, ...] = tuple(command for module in COMMAND_MODULES for command in module.COMMANDS)


def build_parser() -> argparse.ArgumentParser:
    """The ``transferkit`` parser with every command of :data:`COMMANDS`."""
    parser = Parser(
        prog="transferkit",
        description="Turn a folder of labelled images into an evaluated, exportable classifier by transfer learning.",
        epilog="example:\n  transferkit train data/hymenoptera --epochs 10\n  transferkit predict runs/<run> photo.jpg",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a :class:`TransferkitError` is one line on stderr and its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("TRANSFERKIT_DEBUG") == "1"
    try:
        code: int = args.handler(args)
        return code
    except TransferkitError as exc:
        if debug:
            raise
        print(f"transferkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("transferkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
