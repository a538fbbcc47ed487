"""The one way a command is declared and registered, and the options several commands share.

A command module lists its commands as ``COMMANDS``, a tuple of :class:`Command` records;
``transferkit.cli`` registers every module's records the same way. Nothing here imports torch:
``transferkit --help`` answers at once, and the closed sets of choices (:class:`ApiChoices`)
are read from the Python API only when a value is checked or a command's help is printed.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NoReturn

Handler = Callable[[argparse.Namespace], int]
ParentParser = Callable[[], argparse.ArgumentParser]

DEFAULT_MODEL = "efficientnet_lite0"  # transferkit.DEFAULT_BACKBONE, which cannot be read without importing torch


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples keep their line breaks; every option that has a value by default shows it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default in ([], ""):
            return action.help  # flags, and options whose help says what happens without them
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage errors on one line, worded as the library's own: ``unknown --optimizer 'x'; choose one of: ...``."""

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse's one hook for a value outside ``choices`` (its own message is "invalid choice").
        if action.choices is not None and value not in action.choices:
            name = action.option_strings[0] if action.option_strings else action.dest
            listed = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(None, f"unknown {name} {value!r}; choose one of: {listed}")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        given = sys.argv[1:] if args is None else list(args)
        parsed, extras = self.parse_known_args(given, namespace)
        if extras:
            self.error(comma_separated_hint(given, extras) or f"unrecognized arguments: {' '.join(extras)}")
        return parsed


# Options that take several values in one argument, comma-separated: given space-separated, argparse
# would call all but the first "unrecognized arguments" (or take the next one for DATA).
COMMA_SEPARATED = ("--mean", "--std", "--models", "--unfreeze-at")


def comma_separated_hint(given: Sequence[str], extras: Sequence[str]) -> str | None:
    """``--mean takes its values in one argument, separated by commas: --mean 0.5,0.5,0.5`` for
    ``--mean 0.5 0.5 0.5`` (where the command has ``--mean``: else it is among the ``extras``)."""
    for i, token in enumerate(given):
        option, joined, first = token.partition("=")  # --mean 0.5 or --mean=0.5
        if option not in COMMA_SEPARATED or token in extras:
            continue
        following = itertools.takewhile(lambda v: not v.startswith("-") or _is_number(v), given[i + 1:])
        values = [first] * bool(joined) + list(following)
        if not set(values[1:]) & set(extras):
            continue
        # Numbers are all the option's; a name may be DATA's, so two are enough to show the form.
        shown = values if all(map(_is_number, values)) else values[:2]
        return f"{option} takes its values in one argument, separated by commas: {option} {','.join(shown)}"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class ApiChoices:
    """A closed set of values that the Python API names, e.g. ``ApiChoices("OPTIMIZERS")``, read on first use.

    Each such constant lives in a module that imports torch, so it is read only when argparse checks
    a given value or prints the help (give the option a ``metavar``: argparse would otherwise list the
    choices while the parser is built). ``extra`` values are listed and accepted; ``unlisted`` values
    are accepted without being listed, for the library to answer them (a retired export format).
    """

    def __init__(self, name: str, *, extra: Sequence[str] = (), unlisted: Sequence[str] = ()) -> None:
        self.name, self.extra, self.unlisted = name, tuple(extra), tuple(unlisted)

    @cached_property
    def values(self) -> tuple[str, ...]:
        import transferkit

        return (*getattr(transferkit, self.name), *self.extra)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, value: object) -> bool:
        return value in self.values or value in self.unlisted


@dataclass(frozen=True)
class Command:
    """One sub-command: its name, one-line summary, example lines, shared and own options, and handler."""

    name: str
    summary: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Handler
    parents: Sequence[ParentParser] = ()

    def register(self, subparsers: Any) -> argparse.ArgumentParser:
        """Add this command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
        parser: argparse.ArgumentParser = subparsers.add_parser(
            self.name,
            help=self.summary,
            description=self.summary,
            epilog="example:\n" + textwrap.indent(self.example.strip(), "  "),
            formatter_class=HelpFormatter,
            parents=[make() for make in self.parents],
        )
        self.add_arguments(parser)
        parser.set_defaults(handler=self.handler)
        return parser


# --------------------------------------------------------------------------- type helpers


def floats(text: str) -> list[float]:
    """``0.5`` or ``0.485,0.456,0.406``: one value per colour channel (one value means all three)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 1 or 3 numbers, got {text!r}")
    return values


def bounded(kind: type[int] | type[float], low: float, high: float | None = None, *, low_open: bool = False
            ) -> Callable[[str], Any]:  # fmt: skip
    """An option's type: a whole number (``int``) or a number (``float``) from ``low`` (excluded where
    ``low_open``) to ``high``; outside that, argparse's one-line usage error says which values are meant."""
    word = "a whole number" if kind is int else "a number"
    shown: Callable[[float], str] = str if kind is int else "{:g}".format  # 4294967295, not 4.29497e+09

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {word}, got {text!r}") from None
        if not math.isfinite(value):  # nan passes every comparison below
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high):
            wanted = (f"from {shown(low)} to {shown(high)}" if high is not None else
                      f"{'above' if low_open else 'at least'} {shown(low)}")  # fmt: skip
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


def val_split(text: str) -> float:
    """``--val-split``'s type: a share of each class, between 0 and 1. A folder given instead (``--val
    data/val``, which argparse reads as ``--val-split``) is told where validation images go."""
    try:
        value = float(text)
    except ValueError:
        if os.path.isdir(os.path.expanduser(text)):
            raise argparse.ArgumentTypeError(f"expected a share such as 0.2, got the folder {text!r}; validation "
                                             f"images go in DATA/val/<class>/ beside DATA/train/<class>/ (or in a "
                                             f"label file's split column)") from None  # fmt: skip
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (a share of each class, such as 0.2), got {text}")
    return value


SEED = bounded(int, 0, 2**32 - 1)  # NumPy's seeds (training.config.MAX_SEED, which needs torch to be read)


def epochs(text: str) -> list[int]:
    """``2,4,6``: comma-separated epoch numbers (empty items ignored, but not all of them)."""
    try:
        numbers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers:
        raise argparse.ArgumentTypeError(f"expected comma-separated epochs, e.g. 2,4,6; got {text!r}")
    return numbers


# --------------------------------------------------------------------------- shared options (parent parsers)


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def backbone_options() -> argparse.ArgumentParser:
    """--model, --weights, --mean, --std: which pretrained network, and how its inputs are normalised."""
    parent = _parent()
    parent.add_argument("--model", default=DEFAULT_MODEL, help="backbone name (see: transferkit models)")
    parent.add_argument("--weights", default="DEFAULT", help="DEFAULT, a torchvision enum name, none, or a weights file")
    parent.add_argument("--mean", type=floats,
                        help="normalisation mean for a weights file, e.g. 0.5 or 0.485,0.456,0.406")  # fmt: skip
    parent.add_argument("--std", type=floats, help="normalisation std for a weights file")
    return parent


def image_size_option() -> argparse.ArgumentParser:
    parent = _parent()
    parent.add_argument("--image-size", type=bounded(int, 1), help="input size (crop) instead of the weights' own")
    return parent


def batch_size_option() -> argparse.ArgumentParser:
    parent = _parent()
    parent.add_argument("--batch-size", type=bounded(int, 1), default=32, help="images per batch")
    return parent


def checkpoint_run_options() -> argparse.ArgumentParser:
    """--precision, --compile: how a trained model runs (evaluate, predict)."""
    parent = _parent()
    parent.add_argument("--precision", choices=ApiChoices("PRECISIONS"), metavar="PRECISION",
                        help="%(choices)s (default: the run's)")  # fmt: skip
    parent.add_argument("--compile", action="store_true", help="torch.compile the network first (pays on many images)")
    return parent


def precision_option() -> argparse.ArgumentParser:
    """--precision for commands that run a backbone: auto is the machine's best (bf16 where native)."""
    parent = _parent()
    parent.add_argument("--precision", default="auto", choices=ApiChoices("PRECISIONS"), metavar="PRECISION",
                        help="%(choices)s; auto: bf16 on a GPU or a CPU with native bf16, else fp32")  # fmt: skip
    return parent


def data_options() -> argparse.ArgumentParser:
    """How DATA's labels are read: a CSV label file and its columns, and files to leave out."""
    parent = _parent()
    group = parent.add_argument_group("labels from a CSV file (DATA may itself be the CSV)")
    group.add_argument("--labels", metavar="FILE", help="a CSV of path,label[,split] rows for the images in DATA")
    group.add_argument("--path-col", help="the CSV's path column (default: detected: path, file, filename, image, id)")
    group.add_argument("--label-col", help="the label column (default: detected: label, labels, class, category); "
                       "without one, 0/1 columns mean one class each (multi-label)")  # fmt: skip
    group.add_argument("--split-col", help="the train/val/test column (default: detected: split, set, subset)")
    group.add_argument("--label-sep", help="between several labels in one cell, making the data multi-label "
                       "(default: | or ; where found)")  # fmt: skip
    group.add_argument("--image-ext", help="extension of files named by an id without one (default: looked up)")
    parent.add_argument("--exclude", metavar="FILE", help="leave out the images this file lists, one path a line "
                        "(e.g. transferkit inspect's suspects.txt)")  # fmt: skip
    return parent


def data_options_given(args: argparse.Namespace) -> dict[str, Any]:
    """The :func:`data_options` given on the command line, by their names in the library (``label_col``, ...)."""
    names = [action.dest for action in data_options()._actions if action.dest != "help"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cache_dir_option() -> argparse.ArgumentParser:
    parent = _parent()
    parent.add_argument("--cache-dir", help="the cache: features/, exports/ and a packed URL's shards/ beneath it "
                        "(default $TRANSFERKIT_CACHE_DIR, else ~/.cache/transferkit)")  # fmt: skip
    return parent
