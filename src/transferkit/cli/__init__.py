"""``transferkit`` command line: thin commands over the Python API.

Each module below lists its commands as ``COMMANDS`` (:class:`~transferkit.cli.common.Command`
records); :func:`build_parser` registers them all the same way. Handlers import the API lazily,
so that the parser (and ``transferkit --help``) is built without importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from .. import TransferkitError, __version__
from ..files import CACHE_ENV, is_not
from . import explore, export, inspect, maintenance, pack, predict, reports, serve, train
from .common import Command, HelpFormatter, Parser

COMMAND_MODULES = (train, predict, explore, inspect, pack, export, serve, reports, maintenance)
COMMANDS: tuple[Command, ...] = tuple(command for module in COMMAND_MODULES for command in module.COMMANDS)
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    """The ``transferkit`` parser with every command of :data:`COMMANDS`."""
    parser = Parser(
        prog="transferkit",
        description="Turn a folder of labelled images into an evaluated, exportable classifier by transfer learning.",
        epilog="example:\n  transferkit train data/hymenoptera --epochs 10\n  transferkit predict runs/<run> photo.jpg",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


@contextlib.contextmanager
def _one_cache(cache_dir: str | None) -> Iterator[None]:
    """``--cache-dir`` for every cache the command touches (features, exports, a packed URL's chunks, in
    DataLoader workers too), as ``$TRANSFERKIT_CACHE_DIR`` would be; the caller's setting back after."""
    if not cache_dir:
        yield
        return
    root = Path(cache_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise TransferkitError(f"--cache-dir {root} {is_not(root)}; give the cache's folder")
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(root)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a :class:`TransferkitError` is one line on stderr and its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("TRANSFERKIT_DEBUG") == "1"
    shown = warnings.showwarning
    if not debug:
        warnings.showwarning = functools.partial(_show_warning, shown, set())
    try:
        with _one_cache(getattr(args, "cache_dir", None)):
            code: int = args.handler(args)
        return code
    except TransferkitError as exc:
        if debug:
            raise
        print(f"transferkit: error: {_own_message(exc)}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if debug or exc.filename is None:  # not about a file the user named: a fault to report, with its traceback
            raise
        print(f"transferkit: error: {_file_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"transferkit: interrupted{f'; {exc}' if str(exc) else ''}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def _own_message(exc: TransferkitError) -> str:
    """The error's one line: raised in a DataLoader worker, it comes back behind the worker's traceback."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    return text.rstrip().splitlines()[-1].removeprefix(f"{type(exc).__module__}.{type(exc).__name__}: ")


# What to do about the file errors a user can fix, by errno.
FILE_ERROR_FIXES = {
    errno.EACCES: "choose a path you may write (or read), or change its permissions",
    errno.EPERM: "choose a path you may write (or read), or change its permissions",
    errno.EROFS: "the file system is read-only: choose a path on another",
    errno.ENOSPC: "the disk is full: free some space or choose a path on another disk",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder: give a file's path",
    errno.EEXIST: "something is there already where a folder is needed: check the path",
}


def _file_error(exc: OSError) -> str:
    """``Permission denied: /x/model.onnx; choose a path you may write ...``: one line, naming the file."""
    names = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    fix = FILE_ERROR_FIXES.get(exc.errno or 0, "check the path")
    return f"{exc.strerror or exc}: {names}; {fix}"


def _show_warning(
    shown: Callable[..., None], printed: set[str], message: Warning | str, category: type[Warning], filename: str,
    lineno: int, file: TextIO | None = None, line: str | None = None,
) -> None:  # fmt: skip
    """transferkit's own warnings (a skipped file, a repeated row) in one line each, as its errors are, and
    each once: a command that reads the data twice (advise) says so once. Other libraries' warnings as
    Python shows them, with their source line (``--debug``: all of them so)."""
    if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
        if str(message) not in printed:
            printed.add(str(message))
            print(f"transferkit: warning: {message}", file=file or sys.stderr)
    else:
        shown(message, category, filename, lineno, file, line)


if __name__ == "__main__":
    sys.exit(main())
