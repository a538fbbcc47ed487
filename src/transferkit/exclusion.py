"""Exclude lists (``transferkit inspect``'s suspects.txt): the images a user confirmed should be left out.

One path a line, absolute or relative to the list's folder; blank lines and ``#`` comments ignored.
:mod:`transferkit.discovery` leaves them out of every way data is read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .errors import TransferkitError
from .files import is_not
from .shards import is_packed_image, is_url


def read_exclude_list(path: str | Path) -> set[str]:
    """The images an exclude list names, each as :func:`exclude_key` matches it."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise TransferkitError(f"--exclude {source} {is_not(source)}; give a file listing one image path per line")
    try:  # utf-8-sig: a list saved by Notepad starts with a byte-order mark, which is no part of its first path
        text = source.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TransferkitError(f"--exclude {source} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    lines = [line.strip() for line in text.splitlines()]
    return {exclude_key(line, source.parent) for line in lines if line and not line.startswith("#")}


def exclude_key(path: str, folder: Path = Path()) -> str:
    """How an image is matched against an exclude list: a packed image by its name, a file by its resolved path."""
    return path if is_packed_image(path) or is_url(path) else str((folder / path).resolve())


def warn_names_none(source: Path, images: int, root: Path) -> None:
    """A list that leaves nothing out was most likely written for other data: said, not refused."""
    warnings.warn(f"--exclude {source} names none of the {images} images of {root}; was it written for other data?",
                  stacklevel=4)  # fmt: skip
