"""Writing files so that a reader never sees half of one: write a temporary file, then rename it."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import TransferkitError


@functools.cache
def _umask() -> int:
    # Read without changing it: os.umask can only be read by setting it, which races with other threads.
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old or the new file, never half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # named by the file asked for, not by the temporary one beside it
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files are as readable as any other
        with open(tmp, "rb") as written:  # on disk before the rename: after a power cut, the old file or the new
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_with_companions(path: Path, write: Callable[[Path], Any], companions: tuple[str, ...] = ()) -> None:
    """:func:`atomic_write` for a writer that may put files named after ``path`` beside it (an ONNX
    model's weights past 1.5 GB go to ``NAME.data``, which the model refers to by that name): they are
    written in a staging folder under their final names, then renamed in, ``path`` last, so that it
    never refers to a file that is not there, nor to a temporary name.

    ``companions``: the names such files may have; one this write did not make is removed once ``path``
    is in place (a large model's weights, replaced by a small model that holds its own)."""
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:  # named by the file asked for, as atomic_write names it
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    try:
        write(staging / path.name)
        written = sorted(staging.iterdir(), key=lambda p: p.name == path.name)
        for file in written:
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            os.replace(file, path.parent / file.name)
        for stale in set(companions) - {file.name for file in written}:
            (path.parent / stale).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_leftovers(folder: Path, older_than_s: float = 0) -> list[Path]:
    """Remove what a killed process left half-written directly in ``folder``: the hidden ``.NAME.*.tmp``
    files of :func:`atomic_write` and the staged ``.*.tmp`` folders that are renamed into place when
    complete; returns what went. ``older_than_s`` spares those another process may still be writing (0:
    a folder no other process writes, such as a run being resumed)."""
    import shutil
    import time

    def stale(path: Path) -> bool:
        with contextlib.suppress(OSError):  # gone meanwhile: its writer finished
            return not path.is_symlink() and time.time() - path.lstat().st_mtime >= older_than_s
        return False

    leftovers = [p for p in folder.glob(".*.tmp") if stale(p)] if folder.is_dir() else []
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def new_or_empty_folder(out: str | Path, option: str) -> Path:
    """``out`` as a path if it is new or an empty folder (nothing there is lost); else the one-line error."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise TransferkitError(f"{option} {path} {is_not(path)}; choose another {option}")
    if path.exists() and any(path.iterdir()):
        raise TransferkitError(f"{option} {path} already exists and is not empty; choose another {option} or remove it")
    return path


def is_not(path: Path) -> str:
    """Why ``path`` cannot be used where a file or a folder of the other kind was expected, for an error:
    ``does not exist``, ``is a file, not a folder``, ... (the same words for every command)."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a folder, not a file"
    if path.is_file():
        return "is a file, not a folder"
    return "is not a regular file or folder"


def new_files(option: str, *paths: str | Path) -> list[Path]:
    """``paths`` (what ``option`` writes) if none exists yet: a user's file is never overwritten unasked."""
    found = [Path(p).expanduser() for p in paths]
    for path in found:
        if path.exists():
            raise TransferkitError(f"{option} {path} already exists; choose another {option} or remove it")
        check_writable_folder(option, path)
    return found


def check_writable_folder(option: str, path: Path) -> None:
    """Refuse, before the work that ``path`` is for, a path whose folder cannot be made or written."""
    nearest = next(p for p in path.absolute().parents if p.exists() or p == p.parent)
    if not nearest.is_dir():
        raise TransferkitError(f"{option} {path}: {nearest} {is_not(nearest)}; choose another {option}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise TransferkitError(f"{option} {path}: {nearest} is not writable; choose another {option} or change "
                               f"the folder's permissions")  # fmt: skip


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


CACHE_ENV = "TRANSFERKIT_CACHE_DIR"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where transferkit keeps what it can recompute: ``$TRANSFERKIT_CACHE_DIR`` or ``~/.cache/transferkit``.

    Beneath it, ``features/`` (frozen backbone features), ``exports/`` (ONNX exports ``predict`` made) and
    ``shards/`` (packed datasets' chunks fetched from a URL).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "transferkit"))


# What transferkit names in each cache folder (anything else there is not its own, and stays):
# a feature store per spec (its key), ONNX exports by checkpoint digest (sidecars and temporary files
# beside them), and a fetched pack per URL.
CACHE_ENTRIES = {
    "features": re.compile(r"[0-9a-f]{20}"),
    "exports": re.compile(r"\.?[0-9a-f]{24}\.onnx.*"),
    "shards": re.compile(r"[0-9a-f]{16}"),
}


def cache_info(cache_dir: str | Path | None = None) -> dict[str, dict[str, int]]:
    """What transferkit keeps in the cache, by folder: ``{"features": {"count": vectors, "bytes": ...},
    "exports": {"count": ONNX exports, ...}, "shards": {"count": fetched chunks, ...}}``."""
    return {folder: {"count": sum(count for _, count in entries), "bytes": sum(_bytes(p) for p, _ in entries)}
            for folder, entries in _cache_entries(cache_root(cache_dir)).items()}  # fmt: skip


def clear_cache(cache_dir: str | Path | None = None) -> dict[str, int]:
    """Empty the cache of what transferkit put there: returns how many feature vectors, ONNX exports and
    fetched shard chunks were removed. Other files in it (a ``--cache-dir`` shared with other things) stay."""
    import shutil

    root = cache_root(cache_dir)
    removed = {}
    for folder, entries in _cache_entries(root).items():
        removed[folder] = sum(count for _, count in entries)
        for p, _ in entries:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: other files are there
            (root / folder).rmdir()
    return removed


def _cache_entries(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """transferkit's own entries in each cache folder: (path, how many vectors, exports or chunks it holds)."""
    count = {"features": _feature_vectors, "exports": lambda p: int(p.name.endswith(".onnx")),
             "shards": lambda p: sum(1 for _ in p.rglob("chunk-*.bin"))}  # fmt: skip
    found = {}
    for folder, entry in CACHE_ENTRIES.items():
        path = root / folder
        own = [p for p in path.iterdir() if entry.fullmatch(p.name)] if path.is_dir() else []
        found[folder] = [(p, count[folder](p)) for p in own]
    return found


def _bytes(path: Path) -> int:
    """The bytes of a file, or of every file beneath a folder (links not followed; a file another
    process renamed away meanwhile counts nothing)."""
    files = [path] if path.is_symlink() or not path.is_dir() else path.rglob("*")
    total = 0
    for p in files:
        with contextlib.suppress(FileNotFoundError):
            total += 0 if p.is_dir() and not p.is_symlink() else p.lstat().st_size
    return total


def _feature_vectors(store: Path) -> int:
    """Vectors in a feature store folder: 20 bytes of key each in its shards (or a ``.npy`` file each, as
    a cache of an earlier version kept them)."""
    keys = sum(_bytes(p) // 20 for p in store.rglob("*.keys"))  # a shard renamed away meanwhile: 0
    return keys + sum(1 for p in store.rglob("*.npy") if not p.name.endswith(".rows.npy"))
