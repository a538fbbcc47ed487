"""Images packed as shards, read as a folder is: ``transferkit pack DATA --out SHARDS``.

The format is Lightning's litdata (``litdata.StreamingDataset``), one dataset per split:

``SHARDS/transferkit-pack.json``
    classes, multi-label or not, and each split's images in order: [name, label, SHA-1 of the bytes].
``SHARDS/transferkit-pack.version``
    the manifest's SHA-1: a URL's copy in the cache is kept per version, so a folder packed again
    and copied to the same URL is fetched again, never read from the old copy.
``SHARDS/train/``, ``SHARDS/val/`` (, ``SHARDS/test/``)
    litdata's ``index.json`` and ``chunk-*.bin`` files (64 MB each by default), items
    ``{"name", "image" (the file's bytes, not re-encoded), "labels" (class names, ";"-joined)}``.

Why litdata rather than WebDataset tar shards: training here draws a new global order every epoch
from (seed, epoch) and gives each image its own augmentation seed (``EpochSeededSampler``), which
is what makes a resumed run see exactly what an uninterrupted one would. That needs reading image
*i* of the dataset by index; litdata reads any item by index, from a local folder or (its
downloaders fetching whole chunks into a cache first) from object storage (``s3://``, ``gs://``,
``azure://``, ``hf://``, ``r2://``), while WebDataset streams tar files in order and shuffles in a buffer. It is also the Lightning
ecosystem the trainer already uses.

Wherever transferkit expects an image path, a packed image is named ``SHARDS::split/index/name``:
:func:`read_packed` gives its bytes (``data.load_image`` decodes them), :func:`packed_identity` its
content digest (the feature store's key), so loaders, samplers and caches need no other change.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any

from .errors import TransferkitError
from .files import atomic_write, cache_root, new_files

MANIFEST = "transferkit-pack.json"
VERSION = "transferkit-pack.version"
FORMAT = "transferkit-pack/1"
SPLITS = ("train", "val", "test")
SEPARATOR = "::"
DEFAULT_CHUNK_BYTES = "64MB"
# Object stores litdata streams from; "local:PATH" reads a local folder through the same cache.
URL_PREFIXES = ("s3://", "gs://", "azure://", "hf://", "r2://", "local:")


def is_url(source: str) -> bool:
    return str(source).startswith(URL_PREFIXES)


def is_packed_source(source: str | Path) -> bool:
    """Whether ``source`` is a folder or URL written by :func:`pack` (a URL is checked by reading its manifest)."""
    text = str(source)
    if is_url(text):
        _manifest(text.rstrip("/"))  # a clear error when it is not one
        return True
    return (Path(text).expanduser() / MANIFEST).is_file()


def packed_split(folder: str | Path) -> tuple[str, str] | None:
    """(SHARDS, split) when ``folder`` is one split of a packed folder (SHARDS/val, say), else None."""
    path = Path(folder).expanduser()
    if path.name in SPLITS and (path.parent / MANIFEST).is_file():
        return str(path.parent), path.name
    return None


def packed_samples(source: str | Path) -> tuple[dict[str, Any], dict[str, list[tuple[str, Any]]]]:
    """The manifest of a packed folder or URL, and each split's samples (name, label) as named here."""
    root = _source(source)
    manifest = _manifest(root)
    if not is_url(root):  # before any image is read (in loader workers too)
        for split in manifest["splits"]:
            _check_chunks(Path(root) / split)
    samples = {split: [(f"{root}{SEPARATOR}{split}/{i}/{name}", _label(label)) for i, (name, label, _) in enumerate(rows)]
               for split, rows in manifest["splits"].items()}  # fmt: skip
    return manifest, samples


def packed_images(source: str | Path) -> list[str]:
    """Every packed image of ``source`` (all splits), as image paths for ``predict``."""
    return [path for samples in packed_samples(source)[1].values() for path, _ in samples]


def _label(label: Any) -> Any:
    return tuple(label) if isinstance(label, list) else label


def _source(source: str | Path) -> str:
    text = str(source)
    return text.rstrip("/") if is_url(text) else str(Path(text).expanduser().resolve())


def _parse(path: str) -> tuple[str, str, int, str] | None:
    if SEPARATOR not in path:
        return None
    root, rest = path.split(SEPARATOR, 1)
    parts = rest.split("/", 2)
    if len(parts) != 3 or parts[0] not in SPLITS or not parts[1].isdigit():
        return None
    if not is_url(root) and not _is_local_pack(root):
        return None
    return root, parts[0], int(parts[1]), parts[2]


@functools.lru_cache(maxsize=64)
def _is_local_pack(root: str) -> bool:
    return (Path(root) / MANIFEST).is_file()


def packed_identity(path: str) -> str | None:
    """What identifies a packed image's content (its SHA-1), or None when ``path`` is a plain file."""
    parsed = _parse(path)
    if parsed is None:
        return None
    root, split, index, _ = parsed
    return f"packed|{_manifest(root)['splits'][split][index][2]}"


def read_packed(path: str) -> bytes | None:
    """The bytes of a packed image, or None when ``path`` is a plain file."""
    parsed = _parse(path)
    if parsed is None:
        return None
    root, split, index, name = parsed
    dataset, lock = _dataset(root, split, os.getpid(), _url_cache(root) if is_url(root) else None)
    with lock:  # batches decode on threads; litdata's reader is not made for concurrent calls
        if is_url(root):
            _fetch_chunk(root, split, index)
        item = dataset[index]
    if item["name"] != name:
        raise TransferkitError(f"{root}: item {index} of {split} is {item['name']}, not {name}; the shards changed "
                               f"after they were read (pack again, or start a new process)")  # fmt: skip
    return bytes(item["image"])


def image_bytes(path: str) -> bytes:
    """The bytes of an image: a packed one's from its shard, a file's from disk."""
    packed = read_packed(path)
    return Path(path).read_bytes() if packed is None else packed


def as_file_path(path: str) -> str:
    """A packed image's path as a file's would read (``SHARDS/split/name``: no separator, no index); a file's
    path as it is."""
    parsed = _parse(path)
    return path if parsed is None else f"{parsed[0]}/{parsed[1]}/{parsed[3]}"


def is_packed_image(path: str) -> bool:
    """Whether ``path`` names an image in shards (``SHARDS::split/index/name``) rather than a file."""
    return _parse(path) is not None


@functools.lru_cache(maxsize=64)
def _manifest(root: str) -> dict[str, Any]:
    local = Path(_fetched(root, MANIFEST)) if is_url(root) else Path(root) / MANIFEST
    try:
        manifest = json.loads(local.read_text())
    except (OSError, ValueError) as exc:
        raise TransferkitError(f"{root} is not a packed dataset ({MANIFEST}: {exc}); write one with "
                               f"transferkit pack DATA --out SHARDS") from None  # fmt: skip
    if manifest.get("format") != FORMAT:
        raise TransferkitError(f"{root}: {MANIFEST} is not a {FORMAT} manifest; pack the data again")
    return manifest


def _url_cache(root: str) -> Path:
    """The cache folder of a packed URL's version, in the cache root of the moment (``--cache-dir``)."""
    return _url_cache_in(root, cache_root())


@functools.lru_cache(maxsize=64)
def _url_cache_in(root: str, cache: Path) -> Path:
    """A packed URL's version folder in ``cache``: its version file is read from the store once a process
    (DataLoader workers, forked later, share the answer). A pack older than version files has one folder."""
    base = cache / "shards" / hashlib.sha1(root.encode()).hexdigest()[:16]
    base.mkdir(parents=True, exist_ok=True)
    try:
        version = Path(_download(root, VERSION, base / VERSION, fresh=True)).read_text().strip()
    except TransferkitError:
        version = "unversioned"
    if not re.fullmatch(r"[0-9a-f]{40}|unversioned", version):
        raise TransferkitError(f"{root}/{VERSION} is not a transferkit pack version; pack the data again")
    return base / version


def _fetched(root: str, name: str) -> str:
    """A file of a packed URL, downloaded whole into the cache (once per version of the pack)."""
    return _download(root, name, _url_cache(root) / name)


def _download(root: str, name: str, target: Path, fresh: bool = False) -> str:
    """``root/name`` at ``target`` through litdata's own downloaders, unless already there (or ``fresh``).

    Each process downloads into a name of its own and renames it into place, so concurrent readers
    (ranks, DataLoader workers) never see half a file. litdata's downloader alone is not enough
    here: while another process holds its lock on a file it returns at once, before the file exists.
    """
    from litdata.streaming.downloader import get_downloader

    if target.is_file() and not fresh:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        get_downloader(root, str(target.parent), []).download_file(f"{root}/{name}", str(part))
        os.replace(part, target)
    except Exception as exc:  # each object store fails in its own words
        raise TransferkitError(f"cannot read {root}/{name} ({type(exc).__name__}: {exc}); is it a folder "
                               f"written by transferkit pack, and are the store's credentials set?") from None  # fmt: skip
    finally:
        part.unlink(missing_ok=True)
        Path(f"{part}.lock").unlink(missing_ok=True)
    return str(target)


@functools.lru_cache(maxsize=64)
def _chunks(root: str, split: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Each chunk of a split, in order: (the index one past its last item, ...), (its file name, ...)."""
    chunks = json.loads(Path(_fetched(root, f"{split}/index.json")).read_text())["chunks"]
    ends = itertools.accumulate(chunk["chunk_size"] for chunk in chunks)
    return tuple(ends), tuple(chunk["filename"] for chunk in chunks)


def _fetch_chunk(root: str, split: str, index: int) -> None:
    """Bring the whole chunk holding item ``index`` into the cache, once (later reads are local)."""
    ends, names = _chunks(root, split)
    position = bisect.bisect_right(ends, index)
    if position >= len(ends):
        raise TransferkitError(f"{root}: {split} has {ends[-1] if ends else 0} images, not {index + 1}; "
                               f"the shards changed after they were read (pack again, or start a new process)")  # fmt: skip
    _fetched(root, f"{split}/{names[position]}")


@functools.lru_cache(maxsize=16)
def _dataset(root: str, split: str, pid: int, url_cache: Path | None) -> tuple[Any, threading.Lock]:
    """litdata's dataset of one split, per process (DataLoader workers open their own).

    A URL's split is read from ``url_cache``, the folder its chunks are fetched into (:func:`_fetch_chunk`):
    whole chunks, each fetched once, rather than litdata's default for reads by index (one ranged
    request per image, again every epoch), and no background download thread racing the reads.
    """
    from litdata import StreamingDataset

    if url_cache is None:
        _check_chunks(Path(root) / split)
        return StreamingDataset(f"{root}/{split}"), threading.Lock()
    _fetched(root, f"{split}/index.json")  # which the local dataset reads
    return StreamingDataset(str(url_cache / split)), threading.Lock()


def _check_chunks(folder: Path) -> None:
    """Each chunk file of a local split at the size its index gives: litdata waits for a short or missing
    one as for a download (seconds per image), then calls each of its images a missing file."""
    try:
        chunks = json.loads((folder / "index.json").read_text())["chunks"]
    except (OSError, ValueError, KeyError) as exc:
        raise TransferkitError(f"{folder / 'index.json'} cannot be read ({exc}); pack the data again") from None
    for chunk in chunks:
        path = folder / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "missing" if size is None else f"{size:,} of its {chunk['chunk_bytes']:,} bytes"
            raise TransferkitError(f"{path} is damaged ({found}); pack the data again (transferkit pack)")


def chunk_size(text: str | int) -> int:
    """``64MB``, ``512KB``, ``1GB``: a shard file's size in bytes, read with litdata's units (1 KB = 1,000 bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]b?|b)\s*", str(text).lower())
    size = int(float(match[1]) * 1000 ** "bkmgt".index(match[2][0])) if match else 0
    if isinstance(text, int):
        size = text
    if size < 1:
        raise TransferkitError(f"--chunk-bytes {text!r}: give a size with its unit, e.g. 64MB, 512KB or 1GB")
    return size


def pack(splits: Any, out: str | Path, chunk_bytes: str | int = DEFAULT_CHUNK_BYTES) -> dict[str, Any]:
    """Write the images of ``splits`` (a :class:`~transferkit.discovery.ImageFolderSplits`) as litdata shards.

    Files are copied byte for byte (no re-encoding). All or nothing: the shards are written into a
    hidden folder beside ``out`` and renamed to it at the end. Returns what was written.
    """
    from litdata.streaming.writer import BinaryWriter

    size = chunk_size(chunk_bytes)
    target = Path(out).expanduser()
    if is_url(str(out)):
        raise TransferkitError(f"--out {out}: pack writes a local folder; copy it to the object store afterwards "
                               f"(e.g. aws s3 sync) and give the URL to train")  # fmt: skip
    new_files("--out", target)
    if is_packed_image(splits.train[0][0] if splits.train else ""):
        raise TransferkitError(f"{splits.root} is already packed; give the image folder (or label file) it was "
                               f"packed from")  # fmt: skip
    work = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    names = splits.class_names
    manifest: dict[str, Any] = {"format": FORMAT, "class_names": names, "multi_label": splits.multi_label,
                                "source": str(splits.root), "layout": splits.layout, "splits": {}}  # fmt: skip
    base = _names_base(splits)
    try:
        for split, samples in zip(SPLITS, (splits.train, splits.val, splits.test)):
            if not samples:
                continue
            writer = BinaryWriter(str(work / split), chunk_bytes=size)
            rows = []
            for index, (path, label) in enumerate(samples):
                data = _read(path)
                name = _relative_name(path, base)
                writer[index] = {"name": name, "image": data, "labels": ";".join(_class_names(label, names))}
                rows.append([name, list(label) if isinstance(label, tuple) else label, hashlib.sha1(data).hexdigest()])
            writer.done()
            writer.merge()
            manifest["splits"][split] = rows
        text = json.dumps(manifest)
        atomic_write(work / MANIFEST, lambda tmp: tmp.write_text(text))
        atomic_write(work / VERSION, lambda tmp: tmp.write_text(hashlib.sha1(text.encode()).hexdigest() + "\n"))
        os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    counts = {split: len(rows) for split, rows in manifest["splits"].items()}
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return {"path": str(target), "images": counts, "classes": names, "bytes": size,
            "chunks": sum(1 for _ in target.rglob("chunk-*.bin"))}  # fmt: skip


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TransferkitError(f"cannot read {path} ({exc.strerror or exc}); nothing was packed") from None


def _class_names(label: Any, names: list[str]) -> list[str]:
    return [names[i] for i, v in enumerate(label) if v] if isinstance(label, tuple) else [names[label]]


def _names_base(splits: Any) -> Path:
    """The folder packed images are named under: the data folder, or a label file's, or (for a label file
    listing images elsewhere) the folder common to all, so that two files never share a name."""
    root = Path(splits.root).resolve()
    base = root if root.is_dir() else root.parent
    paths = [Path(p).resolve() for samples in (splits.train, splits.val, splits.test) for p, _ in samples or []]
    if all(p.is_relative_to(base) for p in paths):
        return base
    return Path(os.path.commonpath([base, *paths]))


def _relative_name(path: str, base: Path) -> str:
    """The image's name under ``base`` (class/file.jpg), kept so packed images read as the files did."""
    name = Path(path).resolve().relative_to(base).as_posix()
    name = re.sub(r"^(train|val|valid|validation|test)/", "", name)
    return name.replace(SEPARATOR, "_")
