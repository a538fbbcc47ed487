"""Writing files so that a reader never sees half of one: write a temporary file, then rename it."""

from __future__ import annotations

import functools
import json
import os
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a run's files are as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_or_empty_folder(out: str | Path, option: str) -> Path:
    """``out`` as a path if it is new or an empty folder (nothing there is lost); else the one-line error."""
    path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise TransferkitError(f"{option} {path} already exists and is not empty; choose another {option} or remove it")
    return path


def new_files(option: str, *paths: str | Path) -> list[Path]:
    """``paths`` (what ``option`` writes) if none exists yet: a user's file is never overwritten unasked."""
    found = [Path(p).expanduser() for p in paths]
    for path in found:
        if path.exists():
            raise TransferkitError(f"{option} {path} already exists; choose another {option} or remove it")
    return found


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where transferkit keeps what it can recompute: ``$TRANSFERKIT_CACHE_DIR`` or ``~/.cache/transferkit``.

    Beneath it, ``features/`` (frozen backbone features), ``exports/`` (ONNX exports ``predict`` made) and
    ``shards/`` (packed datasets' chunks fetched from a URL).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("TRANSFERKIT_CACHE_DIR", Path.home() / ".cache" / "transferkit"))


def clear_cache(cache_dir: str | Path | None = None) -> dict[str, int]:
    """Empty the cache: returns how many feature vectors, ONNX exports and fetched shard chunks were removed."""
    import shutil

    root = cache_root(cache_dir)
    removed = {}
    for folder, pattern in (("features", "*.npy"), ("exports", "*.onnx"), ("shards", "chunk-*.bin")):
        path = root / folder
        removed[folder] = sum(1 for _ in path.rglob(pattern)) if path.is_dir() else 0
        if folder == "features" and path.is_dir():  # the feature store's shards: 20 bytes of key per vector
            shards = list(path.rglob("*.rows.npy"))
            removed[folder] += sum(p.stat().st_size // 20 for p in path.rglob("*.keys")) - len(shards)
        shutil.rmtree(path, ignore_errors=True)
    return removed
