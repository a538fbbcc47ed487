"""Frozen features, computed once: pooled CNN codes from any layer, cached on disk.

A frozen backbone gives the same output for the same image every epoch, so recomputing it is
~90 % of a naive feature-extraction loop. Here each image's feature vector is stored under a key
covering the backbone, a digest of its weights, the layer, the preprocessing, the augmentation
view and the file (path, size, mtime; a packed image's content); any change is a miss. The vectors
live in a :class:`~transferkit.feature_store.FeatureStore` (a few large shard files, appended by
atomic renames, so concurrent runs and ranks sharing it cannot corrupt it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .backbones import Preprocessing
from .files import atomic_write, cache_root, new_files
from .shards import packed_identity
from .data import ImageDataset, Sample, build_transform, check_loading, collate_skipping_bad, default_num_workers
from .errors import TransferkitError
from .feature_store import FeatureStore, StoredRows
from .layers import StopForward, capture, layer_path, resolve_layer
from .model import TransferModel
from .performance import autocast, batch_to, inference_mode, pick_device, resolve_precision, to_fast_layout


def features_dir(cache_dir: str | Path | None = None) -> Path:
    """The feature store's folder: ``features/`` beneath the cache (``--cache-dir``, as ``cache clear`` reads it)."""
    return cache_root(cache_dir) / "features"


def weights_digest(model: TransferModel) -> str:
    """Digest of everything before the head: a changed backbone weight changes every key."""
    h = hashlib.sha1()
    for name, tensor in model.net.state_dict().items():
        if model.record.is_head_key(name):
            continue
        h.update(name.encode())
        h.update(zlib.crc32(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).to_bytes(4, "little"))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class FeatureSpec:
    """What, besides the file, determines a feature vector."""

    backbone: str
    weights_digest: str
    layer: str
    preprocessing: dict[str, Any]
    augment: str = "none"
    precision: str = "32"
    # How images are decoded: features cached before EXIF orientation was applied are not reused.
    decoding: str = "exif-upright"

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()[:20]


def file_key(path: str, view: int) -> str:
    """The cache key of one view of one image: its file's identity (path, size, mtime), or a packed image's content."""
    identity = packed_identity(path)
    if identity is None:
        st = os.stat(path)
        identity = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(f"{identity}|{view}".encode()).hexdigest()


def _view_loader(
    todo: list[tuple[int, str, int]],
    prep: Preprocessing,
    augment: str,
    batch_size: int,
    num_workers: int | None,
    device: torch.device,
) -> DataLoader:
    """Batches of (images, positions in ``todo``); each (file, view) gets the same crop in every run."""
    check_loading(batch_size, num_workers)
    views = [(path, pos) for pos, (_, path, _) in enumerate(todo)]
    keys: list[Any] = list(range(len(todo)))
    if augment != "none":
        keys = [(pos, int(file_key(path, view)[:8], 16)) for pos, (_, path, view) in enumerate(todo)]
    return DataLoader(
        ImageDataset(views, build_transform(prep, augment)),
        batch_size=batch_size,
        sampler=keys,
        num_workers=default_num_workers(device.type) if num_workers is None else num_workers,
        collate_fn=collate_skipping_bad,
    )


@dataclass
class FeatureSet:
    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N,)
    paths: list[str]
    hits: int
    misses: int
    skipped: list[str]  # files that could not be decoded


@dataclass
class StoredFeatures:
    """Where the features of ``samples`` are in a :class:`FeatureStore`: one (shard, row) per decoded view."""

    store: FeatureStore
    locations: np.ndarray  # (N, 2)
    labels: torch.Tensor  # (N,)
    paths: list[str]
    hits: int
    misses: int
    skipped: list[str]

    def dataset(self) -> StoredRows:
        """(vector, label) pairs read from the memory-mapped shards a batch at a time."""
        return StoredRows(self.store, self.locations, self.labels)

    def to_feature_set(self) -> FeatureSet:
        features = torch.from_numpy(self.store.read(self.locations))
        return FeatureSet(features, self.labels, self.paths, self.hits, self.misses, self.skipped)


def extract_features(
    model: TransferModel,
    samples: list[Sample],
    layer: str | None = None,
    augment: str = "none",
    views: int = 1,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: torch.device | None = None,
    precision: str = "auto",
) -> FeatureSet:
    """Pooled features of ``samples`` (``views`` augmented copies each when ``augment`` is set).

    Stored vectors are read back; the rest are computed in batches and appended to the store
    (:func:`store_features`); the result is one (N, D) matrix in memory. Without the cache
    (``use_cache=False``) nothing is read or written.
    """
    options = {"layer": layer, "augment": augment, "views": views, "batch_size": batch_size,
               "num_workers": num_workers, "device": device, "precision": precision}  # fmt: skip
    if use_cache:
        return store_features(model, samples, cache_dir=cache_dir, **options).to_feature_set()
    return _features_in_memory(model, samples, **options)


def store_features(
    model: TransferModel,
    samples: list[Sample],
    layer: str | None = None,
    augment: str = "none",
    views: int = 1,
    cache_dir: Path | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: torch.device | None = None,
    precision: str = "auto",
    writer_tag: str = "",
) -> StoredFeatures:
    """Make sure the store has the features of ``samples``; say where they are, without reading them.

    Only the views the store lacks are computed, written in shards as they come (memory stays
    bounded by one shard). ``writer_tag`` goes into the new shards' names (a rank, say).
    """
    device = device or pick_device()
    precision = resolve_precision(precision, device)  # the machine's best unless asked; part of the cache key
    spec = _spec(model, layer, augment, precision)
    store = FeatureStore(features_dir(cache_dir) / spec.key())
    items = _items(samples, views if augment != "none" else 1)
    keys = [bytes.fromhex(file_key(path, view)) for _, path, view in items]
    where = store.locate(keys)
    todo = [(item, key) for item, key, (shard, _) in zip(items, keys, where) if shard < 0]
    if todo:
        _write_spec(store.root, spec)
        with store.writer(writer_tag) as writer:
            for pos, vector in _computed(model, [item for item, _ in todo], layer, augment, batch_size, num_workers,
                                         device, precision):  # fmt: skip
                writer.add(todo[pos][1], vector)
        where = store.locate(keys)
    found = where[:, 0] >= 0
    if not found.any():
        raise TransferkitError("no image could be decoded for feature extraction")
    kept = [item for item, ok in zip(items, found.tolist()) if ok]
    decoded = {index for index, _, _ in kept}
    return StoredFeatures(store, where[found], torch.tensor([samples[i][1] for i, _, _ in kept]),
                          [path for _, path, _ in kept], len(items) - len(todo), len(todo),
                          [path for i, (path, _) in enumerate(samples) if i not in decoded])  # fmt: skip


def _spec(model: TransferModel, layer: str | None, augment: str, precision: str) -> FeatureSpec:
    name, path, head_input = layer_path(model, layer)
    # A layer is keyed by the module read too: features cached when a group was read elsewhere are not reused.
    key = name if head_input else f"{name}@{path}"
    prep = model.preprocessing.to_dict()
    return FeatureSpec(model.record.backbone, weights_digest(model), key, prep, augment, precision)


def _items(samples: list[Sample], view_count: int) -> list[tuple[int, str, int]]:
    return [(i, path, v) for i, (path, _) in enumerate(samples) for v in range(view_count)]


def _features_in_memory(
    model: TransferModel, samples: list[Sample], layer: str | None, augment: str, views: int, batch_size: int,
    num_workers: int | None, device: torch.device | None, precision: str,
) -> FeatureSet:  # fmt: skip
    device = device or pick_device()
    precision = resolve_precision(precision, device)
    resolve_layer(model, layer)  # a clear error for an unknown layer before any image is decoded
    items = _items(samples, views if augment != "none" else 1)
    rows = dict(_computed(model, items, layer, augment, batch_size, num_workers, device, precision))
    order = [pos for pos in range(len(items)) if pos in rows]
    if not order:
        raise TransferkitError("no image could be decoded for feature extraction")
    decoded = {items[pos][0] for pos in order}
    return FeatureSet(torch.from_numpy(np.stack([rows[pos] for pos in order])),
                      torch.tensor([samples[items[pos][0]][1] for pos in order]), [items[pos][1] for pos in order],
                      0, len(items), [path for i, (path, _) in enumerate(samples) if i not in decoded])  # fmt: skip


def _computed(
    model: TransferModel, todo: list[tuple[int, str, int]], layer: str | None, augment: str, batch_size: int,
    num_workers: int | None, device: torch.device, precision: str,
) -> Iterator[tuple[int, np.ndarray]]:  # fmt: skip
    """(position in ``todo``, vector) of each view that decoded, batch by batch."""
    # On a private RNG stream: whether features came from the cache or were computed here (its
    # loader draws seeds) must not change what the caller draws next (a head's dropout, say).
    with torch.random.fork_rng(devices=[]):
        loader = _view_loader(todo, model.preprocessing, augment, batch_size, num_workers, device)
        for positions, vectors in _run_extractor(model, loader, layer, device, precision):
            yield from zip(positions.tolist(), vectors)


def _save_npz(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object keeps numpy from appending ".npz" to the temporary name
        np.savez(f, **arrays)


def _csv_label_columns(class_names: list[str], multi_label: bool) -> list[str]:
    """``label``, or (multi-label) a 0/1 column per class, which must not take a fixed column's name."""
    if not multi_label:
        return ["label"]
    clash = [n for n in class_names if n in ("path", "split") or re.fullmatch(r"f\d+", n)]
    if clash:
        raise TransferkitError(f"class {clash[0]!r} would name a column of the CSV file as a fixed one does; write "
                               f"the features to .npz or .pt instead")  # fmt: skip
    return class_names


def _save_csv(tmp: Path, arrays: dict[str, np.ndarray], multi_label: bool) -> None:
    import csv

    names, features = [str(n) for n in arrays["class_names"]], arrays["features"]
    label_columns = _csv_label_columns(names, multi_label)
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "split", *label_columns, *(f"f{i}" for i in range(features.shape[1]))])
        for path, split, label, row in zip(arrays["paths"], arrays["splits"], arrays["labels"], features):
            labels = [int(v) for v in label] if multi_label else [names[int(label)]]
            writer.writerow([path, split, *labels, *(f"{v:.7g}" for v in row)])


def _write_spec(root: Path, spec: FeatureSpec) -> None:
    target = root / "spec.json"
    if not target.exists():
        atomic_write(target, lambda tmp: tmp.write_text(json.dumps(spec.__dict__, indent=2)))


def _run_extractor(
    model: TransferModel, loader: DataLoader, layer: str | None, device: torch.device, precision: str
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    model.to(device)
    to_fast_layout(model)
    with inference_mode(model), capture(model, layer) as out:
        for x, positions, _ in loader:  # undecodable files are reported by FeatureSet.skipped
            if len(x) == 0:
                continue
            with autocast(device, precision):
                try:
                    model(batch_to(x, device, channels_last=True))
                except StopForward:
                    pass
            yield positions, out["features"].float().cpu().numpy()


def cache_supported(model: TransferModel) -> bool:
    """Whether the head can be trained on pooled vectors (not SqueezeNet's convolutional head)."""
    return isinstance(model.head_module, (nn.Linear, nn.Sequential)) and not any(
        isinstance(m, nn.Conv2d) for m in model.head_module.modules()
    )


def write_features(
    data_dir: str | Path,
    out: str | Path,
    model_name: str = "efficientnet_lite0",
    weights: str = "DEFAULT",
    layer: str | None = None,
    batch_size: int = 32,
    use_cache: bool = True,
    preprocessing: Preprocessing | None = None,
    precision: str = "auto",
    data_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pooled features of every image of ``data_dir`` (all splits) to ``out`` (.npz, .pt or .csv).

    ``data_dir`` is read as ``train`` reads it: class folders, packed shards, or a label file
    (``data_options``: ``labels``, its columns, ``exclude``; see :data:`transferkit.discovery.DATA_OPTIONS`).
    The file holds ``features`` (N, D), ``labels`` (N,) or, for multi-label data, (N, classes) of 0/1,
    ``paths``, ``splits`` (train/val/test as the data gives them, else "all") and ``class_names``.
    A .csv file (for a spreadsheet, R or pandas) has a row per image: ``path``, ``split``, ``label`` (the
    class name; multi-label: one 0/1 column per class) and the features ``f0`` ... ``f{D-1}``.
    """
    from .backbones import load_backbone
    from .discovery import every_image

    out = Path(out)
    kind = out.suffix.lower()  # FEATURES.NPZ, as some systems name files, is an .npz file too
    if kind not in (".npz", ".pt", ".csv"):
        raise TransferkitError(f"--out {out} must end in .npz, .pt or .csv")
    new_files("--out", out)
    found = every_image(data_dir, data_options)
    class_names = found.class_names
    if kind == ".csv":
        _csv_label_columns(class_names, found.multi_label)  # before the features are computed
    backbone = load_backbone(model_name, weights, preprocessing=preprocessing)
    model = TransferModel(backbone, class_names if len(class_names) > 1 else [*class_names, "_"]).eval()
    precision = resolve_precision(precision, pick_device())
    result = extract_features(model, found.samples, layer=layer, batch_size=batch_size, use_cache=use_cache,
                              precision=precision)  # fmt: skip
    kept = set(result.paths)
    split_of = [s for (p, _), s in zip(found.samples, found.splits) if p in kept]
    payload = {"features": result.features.numpy(), "labels": result.labels.numpy(), "paths": np.array(result.paths),
               "splits": np.array(split_of), "class_names": np.array(class_names)}  # fmt: skip
    if kind == ".npz":
        atomic_write(out, lambda tmp: _save_npz(tmp, payload))
    elif kind == ".csv":
        atomic_write(out, lambda tmp: _save_csv(tmp, payload, found.multi_label))
    else:
        tensors = {"features": result.features, "labels": result.labels, "paths": result.paths, "splits": split_of,
                   "class_names": class_names}  # fmt: skip
        atomic_write(out, lambda tmp: torch.save(tensors, tmp))
    return {"path": str(out), "count": len(result.paths), "dim": int(result.features.shape[1]),
            "layer": resolve_layer(model, layer)[0], "hits": result.hits, "misses": result.misses,
            "precision": precision, "multi_label": found.multi_label, "excluded": found.excluded}  # fmt: skip
