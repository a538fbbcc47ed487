"""A sharded feature store: many images' feature vectors in a few large files, memory-mapped to read.

One file per image and view (the first cache's layout) means 10^6 files for 10^6 images, which
filesystems and object stores handle badly long before that. Here a store folder (one per
:class:`~transferkit.features.FeatureSpec`) holds shards of up to ~10^4 rows:

``shards/<writer>-<n>.rows.npy``
    float32 (rows, D): a plain ``.npy`` file, opened with ``numpy.load(mmap_mode="r")``.
``shards/<writer>-<n>.keys``
    the rows' keys, 20 bytes each (the SHA-1 of the file's identity and view), in row order;
    renamed into place after the rows file, so its presence says the shard is complete.

Appending writes new shards and never rewrites one. Each writer names its shards by host, process,
an optional tag (a rank) and a random part, so concurrent writers (the ranks of a run, runs sharing
a cache) never write the same file; a key written by two of them is the same vector, and a lookup
takes either.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch.utils.data import Dataset

from .files import atomic_write

KEY_BYTES = 20
KEY_DTYPE = f"S{KEY_BYTES}"
# A shard holds ~10^4 rows (fewer for wide vectors): few files, and a bounded buffer while writing.
SHARD_ROWS = 10_000
SHARD_BYTES = 32 << 20
ROWS_SUFFIX, KEYS_SUFFIX = ".rows.npy", ".keys"


class FeatureStore:
    """The shards of one store folder: look rows up by key, read them, append new ones."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"
        self.names: list[str] = []  # shards in the order they were taken in; a location's shard is an index here
        self._arrays: dict[int, np.ndarray] = {}
        self._sorted_keys = np.empty(0, KEY_DTYPE)
        self._where = np.empty((0, 2), np.int64)  # (shard, row) of each sorted key
        self.refresh()

    def refresh(self) -> None:
        """Take in the shards completed since the last look, by this process or any other."""
        if not self.shard_dir.is_dir():
            return
        known = set(self.names)
        found = sorted(e.name[: -len(KEYS_SUFFIX)] for e in os.scandir(self.shard_dir)
                       if e.name.endswith(KEYS_SUFFIX) and not e.name.startswith("."))  # fmt: skip
        new = [name for name in found if name not in known]
        if new:
            allow_open_files(len(new))
        keys, where = [self._sorted_keys], [self._where]
        for name in new:
            shard_keys = self._open_shard(name)
            if shard_keys is None:
                continue
            index = len(self.names)
            self.names.append(name)
            keys.append(shard_keys)
            where.append(np.stack([np.full(len(shard_keys), index), np.arange(len(shard_keys))], axis=1))
        if len(keys) > 1:
            all_keys, all_where = np.concatenate(keys), np.concatenate(where)
            order = np.argsort(all_keys, kind="stable")  # a key in two shards: the one taken in first wins
            self._sorted_keys, self._where = all_keys[order], all_where[order]

    def _open_shard(self, name: str) -> np.ndarray | None:
        try:
            keys = np.fromfile(self.shard_dir / (name + KEYS_SUFFIX), dtype=KEY_DTYPE)
            rows = np.load(self.shard_dir / (name + ROWS_SUFFIX), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            warnings.warn(f"feature store {self.root}: ignoring shard {name} ({type(exc).__name__}: {exc})", stacklevel=3)
            return None
        if rows.ndim != 2 or len(rows) != len(keys):
            warnings.warn(f"feature store {self.root}: ignoring shard {name} (rows and keys disagree)", stacklevel=3)
            return None
        self._arrays[len(self.names)] = rows
        return keys

    def __len__(self) -> int:
        return len(self._sorted_keys)

    def locate(self, keys: Sequence[bytes]) -> np.ndarray:
        """(shard, row) of each key, (-1, -1) where the store does not have it."""
        out = np.full((len(keys), 2), -1, np.int64)
        if not len(keys) or not len(self._sorted_keys):
            return out
        wanted = np.array(keys, dtype=KEY_DTYPE)
        pos = np.minimum(np.searchsorted(self._sorted_keys, wanted), len(self._sorted_keys) - 1)
        hit = self._sorted_keys[pos] == wanted
        out[hit] = self._where[pos[hit]]
        return out

    def dim(self) -> int:
        return int(next(iter(self._arrays.values())).shape[1]) if self._arrays else 0

    def read(self, locations: np.ndarray) -> np.ndarray:
        """The rows at ``locations`` ((n, 2) shard, row), copied out of the memory maps in that order."""
        out = np.empty((len(locations), self.dim()), np.float32)
        if not len(locations):
            return out
        by_shard = np.argsort(locations[:, 0], kind="stable")
        shards, starts = np.unique(locations[by_shard, 0], return_index=True)
        for shard, picked in zip(shards.tolist(), np.split(by_shard, starts[1:])):
            if shard < 0:
                raise KeyError(f"feature store {self.root}: {len(picked)} row(s) are not in the store")
            rows = locations[picked, 1]
            order = np.argsort(rows, kind="stable")  # ascending offsets: sequential reads of the mapped file
            out[picked[order]] = self._arrays[shard][rows[order]]
        return out

    def writer(self, tag: str = "") -> ShardWriter:
        return ShardWriter(self, tag)


class ShardWriter:
    """Appends rows to a store in new shard files of this writer's own; used as a context manager.

    Rows are buffered up to :data:`SHARD_ROWS` (or :data:`SHARD_BYTES`) and then written as one
    shard, rows first, keys last, each by an atomic rename: an interrupted writer loses at most its
    buffer, and no reader ever sees half a shard.
    """

    def __init__(self, store: FeatureStore, tag: str = "") -> None:
        self.store = store
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"
        parts = [host, *([re.sub(r"[^A-Za-z0-9_.-]", "_", tag)] if tag else []), str(os.getpid()), secrets.token_hex(4)]
        self.prefix = "-".join(parts)
        self.written: list[str] = []  # names of the shards this writer completed
        self._keys: list[bytes] = []
        self._rows: list[np.ndarray] = []

    def add(self, key: bytes, row: np.ndarray) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a feature store key is {KEY_BYTES} bytes, got {len(key)}")
        self._keys.append(key)
        self._rows.append(np.asarray(row, dtype=np.float32))
        if len(self._rows) >= SHARD_ROWS or len(self._rows) * self._rows[0].nbytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        name = f"{self.prefix}-{len(self.written):05d}"
        rows, keys = np.stack(self._rows), b"".join(self._keys)
        shard_dir = self.store.shard_dir
        atomic_write(shard_dir / (name + ROWS_SUFFIX), lambda tmp: _save_rows(tmp, rows))
        atomic_write(shard_dir / (name + KEYS_SUFFIX), lambda tmp: tmp.write_bytes(keys))
        self.written.append(name)
        self._keys, self._rows = [], []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # Rows already computed are right even when a later batch failed: keep them.
        if kind is None or issubclass(kind, Exception):
            self.flush()
        self.store.refresh()


def allow_open_files(more: int) -> None:
    """Room for ``more`` open files: each shard's memory map holds one for as long as the store is open,
    and a store of millions of images has hundreds of shards, past the usual soft limit (1024, 256 on
    macOS). The soft limit is raised toward the hard one where needed, as a user's ``ulimit -n`` would."""
    try:
        import resource
    except ImportError:  # Windows: no such limit on memory maps
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_dir = Path("/proc/self/fd") if Path("/proc/self/fd").is_dir() else Path("/dev/fd")
    wanted = len(os.listdir(fd_dir)) + more + 64  # and a margin for the files a run opens meanwhile
    if soft == resource.RLIM_INFINITY or wanted <= soft:
        return
    raised = wanted * 2 if hard == resource.RLIM_INFINITY else min(hard, wanted * 2)
    with contextlib.suppress(ValueError, OSError):  # not allowed: shards past the limit are said and skipped
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))


def _save_rows(tmp: Path, rows: np.ndarray) -> None:
    with open(tmp, "wb") as f:  # a file object keeps numpy from renaming the temporary file
        np.save(f, rows, allow_pickle=False)


class StoredRows(Dataset):
    """(feature vector, label) pairs read from a store's memory-mapped shards, a batch at a time.

    What a head trains on instead of one (N, D) matrix in memory: only the batch's rows are copied
    out, so the process's own memory does not grow with the number of images (the mapped pages are
    the kernel's page cache, which it reclaims under pressure).
    """

    def __init__(self, store: FeatureStore, locations: np.ndarray, labels: torch.Tensor) -> None:
        self.store, self.locations, self.labels = store, locations, labels

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = torch.from_numpy(self.store.read(self.locations[np.asarray(indices, dtype=np.int64)]))
        return [(rows[i], self.labels[index]) for i, index in enumerate(indices)]
