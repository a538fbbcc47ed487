"""Image folders → samples → tensors, with the backbone's own preprocessing.

Layouts: ``DATA/train/<class>/*`` + ``DATA/val/<class>/*`` (+ optional ``DATA/test``), or plain
``DATA/<class>/*`` split into train/val by a stratified, seeded split.
"""

from __future__ import annotations

import os
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from PIL import Image, UnidentifiedImageError

from . import torchvision_import  # noqa: F401  (first: torchvision without dynamo's start-up cost)
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from .backbones import Preprocessing
from .errors import TransferkitError
from .performance import pick_device

# torchvision's ImageFolder extensions, and GIF (its first frame), which PIL reads and torchvision does not list.
IMAGE_EXTENSIONS = (*IMG_EXTENSIONS, ".gif")
JPEG_EXTENSIONS = (".jpg", ".jpeg")
AUGMENTATIONS = ("none", "light", "strong")
VAL_DIR_NAMES = ("val", "valid", "validation")
# Refuse absurd images from their header, before decoding them (decompression bombs). PIL's own guard
# (its Image.MAX_IMAGE_PIXELS, left as the user has it) may refuse some sooner.
MAX_IMAGE_PIXELS = 16384 * 16384

Sample = tuple[str, int]
T = TypeVar("T")


@dataclass
class ImageFolderSplits:
    root: Path
    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layout: str = "train/val"

    def summary(self) -> dict[str, Any]:
        def counts(samples: list[Sample] | None) -> dict[str, int] | None:
            if samples is None:
                return None
            c = Counter(label for _, label in samples)
            return {name: c.get(i, 0) for i, name in enumerate(self.class_names)}

        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": self.class_names,
            "train_counts": counts(self.train),
            "val_counts": counts(self.val),
            "test_counts": counts(self.test),
            "skipped_files": len(self.skipped),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_image(path: Path) -> str | None:
    """Why ``path`` cannot be used, from a cheap header read; None if it looks like an image."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            return f"too large ({w}x{h} pixels)"
    except Image.DecompressionBombError:
        return "too large (decompression bomb guard)"
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return f"not a readable image ({type(exc).__name__})"
    return None


def scan_class_folder(
    folder: Path, class_names: list[str] | None = None, check: bool = True
) -> tuple[list[str], list[Sample], list[tuple[str, str]]]:
    """(class names, samples, skipped files) of a ``<class>/*`` folder; nested folders are walked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TransferkitError(f"data folder {folder} does not exist; give a folder holding one sub-folder per class")
    dirs = _class_dirs(folder)
    names = [d.name for d in dirs]
    if class_names is not None:
        extra = sorted(set(names) - set(class_names))
        if extra:
            raise TransferkitError(
                f"{folder} has classes the model does not know: {', '.join(extra)}; expected a subset of: "
                f"{', '.join(class_names)}"
            )
    _check_case_clashes(names, folder)
    known = class_names or names
    samples: list[Sample] = []
    skipped: list[tuple[str, str]] = []
    for d in dirs:
        found = 0
        for dirpath, subdirs, files in os.walk(d):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            for f in sorted(files):
                path = Path(dirpath) / f
                if f.startswith(".") or _is_hidden(path, folder):
                    continue
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    skipped.append((str(path), "not an image file extension"))
                    continue
                reason = _check_image(path) if check else None
                if reason:
                    skipped.append((str(path), reason))
                    continue
                samples.append((str(path), known.index(d.name)))
                found += 1
        if found == 0 and class_names is None:
            raise TransferkitError(f"class folder {d} has no usable images; add images or remove the folder")
    for path, reason in skipped:
        warnings.warn(f"skipping {path}: {reason}", stacklevel=2)
    return known, samples, skipped


def _check_case_clashes(names: list[str], folder: Path) -> None:
    lowered = Counter(n.lower() for n in names)
    clashes = sorted(n for n in names if lowered[n.lower()] > 1)
    if clashes:
        raise TransferkitError(
            f"class folders in {folder} differ only in case: {', '.join(clashes)}; merge or rename them"
        )


def discover(data_dir: str | Path, val_split: float = 0.2, seed: int = 0) -> ImageFolderSplits:
    """Find classes and samples in ``data_dir`` (see module docstring for the layouts)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise TransferkitError(f"data folder {root} does not exist; pass DATA holding train/ and val/ or class folders")
    train_dir = root / "train"
    val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    if train_dir.is_dir():
        names, train, skipped = scan_class_folder(train_dir)
        if val_dir is not None:
            val_names = [d.name for d in _class_dirs(val_dir)]
            if set(val_names) != set(names):
                raise TransferkitError(
                    f"{val_dir} classes ({', '.join(val_names)}) differ from {train_dir} classes "
                    f"({', '.join(names)}); give both the same class folders"
                )
            _, val, more = scan_class_folder(val_dir, names)
            layout = "train/val"
        else:
            train, val = stratified_split(train, val_split, seed)
            more, layout = [], f"train split {1 - val_split:.0%}/{val_split:.0%}"
        test = None
        if (root / "test").is_dir():
            _, test, test_skipped = scan_class_folder(root / "test", names)
            more = more + test_skipped
        splits = ImageFolderSplits(root, names, train, val, test, skipped + more, layout)
    else:
        names, samples, skipped = scan_class_folder(root)
        train, val = stratified_split(samples, val_split, seed)
        splits = ImageFolderSplits(root, names, train, val, None, skipped, f"split {1 - val_split:.0%}/{val_split:.0%}")
    if len(splits.class_names) < 2:
        raise TransferkitError(
            f"{root} has {len(splits.class_names)} class folder(s); a classifier needs at least 2 (one sub-folder per class)"
        )
    if not splits.val:
        raise TransferkitError(f"no validation images in {root}; add a val/ folder or raise --val-split")
    return splits


def shuffled_by_class(items: Sequence[T], label: Callable[[T], int], seed: int) -> list[list[T]]:
    """``items`` grouped by class (classes in label order), each group in a seeded random order.

    The one per-class sampler: the train/val split, advise's sample and the report's grids all draw
    from it, so a seed means the same thing everywhere.
    """
    rng = random.Random(seed)
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(label(item), []).append(item)
    ordered = [groups[k] for k in sorted(groups)]
    for group in ordered:
        rng.shuffle(group)
    return ordered


def stratified_split(samples: list[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split each class by ``val_split``, the same way for the same seed."""
    if not 0 < val_split < 1:
        raise TransferkitError(f"--val-split must be between 0 and 1, got {val_split}")
    train: list[Sample] = []
    val: list[Sample] = []
    for members in shuffled_by_class(samples, lambda s: s[1], seed):
        n_val = min(len(members) - 1, max(1, round(len(members) * val_split))) if len(members) > 1 else 0
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


# --------------------------------------------------------------------------- decoding


def load_image(path: str) -> torch.Tensor:
    """Decode ``path`` to an RGB uint8 tensor (3, H, W); greyscale, palette, RGBA and CMYK included."""
    if path.lower().endswith(JPEG_EXTENSIONS):
        try:
            # libjpeg-turbo straight to a tensor: ~2x PIL on typical photos, no PIL→numpy copy.
            return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # CMYK, progressive oddities, mislabelled files: PIL below knows them all
    with Image.open(path) as im:
        im.seek(0)  # first frame of an animated GIF
        return v2.functional.pil_to_tensor(_to_rgb(im))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        import numpy as np

        arr = np.asarray(im, dtype=np.float32)
        peak = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).astype("uint8"), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return background
    return im.convert("RGB")


def build_transform(prep: Preprocessing, augment: str = "none") -> v2.Compose:
    """Train-time (``light``/``strong``) or evaluation (``none``) transform on uint8 tensors."""
    if augment not in AUGMENTATIONS:
        raise TransferkitError(f"unknown --augment {augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    interpolation = v2.InterpolationMode(prep.interpolation)
    if augment == "none":
        geometry: list[Any] = [
            v2.Resize(prep.resize_size, interpolation=interpolation, antialias=True),
            v2.CenterCrop(prep.image_size),
        ]
    else:
        geometry = [
            v2.RandomResizedCrop(prep.image_size, interpolation=interpolation, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
        if augment == "strong":
            geometry += [v2.RandomRotation(15), v2.ColorJitter(0.2, 0.2, 0.2)]
    # Geometry on uint8 before the float conversion: 4x less memory traffic per resize.
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)])


class BadImage(NamedTuple):
    """Stands in for an image that failed to decode, so the batch can report it by name.

    A NamedTuple, since Lightning rebuilds every batch element when moving it to a device.
    """

    path: str
    reason: str


class EpochSeededSampler(Sampler):
    """Shuffles by (seed, epoch) alone and hands each index its own augmentation seed.

    The epoch is the number of passes already made, a counter that is saved with a training
    checkpoint (see ``training.ResumableState``): resuming at epoch k then sees the same order and
    the same random crops as an uninterrupted run, whatever the worker processes' RNG states are.
    (No ``set_epoch``: Lightning may start a resumed epoch's iterator before calling it.)
    """

    def __init__(self, length: int, seed: int, shuffle: bool = True, with_aug_seeds: bool = True) -> None:
        self.length, self.seed, self.shuffle, self.epoch = length, seed, shuffle, 0
        self.with_aug_seeds = with_aug_seeds

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.length, generator=g).tolist() if self.shuffle else range(self.length)
        for index in order:
            yield (index, hash((self.seed, epoch, index)) & 0x7FFFFFFF) if self.with_aug_seeds else index


class ImageDataset(Dataset):
    """(image tensor, label) pairs; an image that fails to decode becomes a :class:`BadImage`.

    Indexed by an int, or by (index, augmentation seed) from :class:`EpochSeededSampler`.
    """

    def __init__(self, samples: list[Sample], transform: v2.Compose) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | BadImage:
        return self._finish(key, self._decode(key))

    def __getitems__(self, keys: list[Any]) -> list[tuple[torch.Tensor, int] | BadImage]:
        """A whole batch, decoded on all of torch's threads when the loader runs in this process.

        Decoders and resizes release the GIL, so threads scale with cores. Augmented items
        (with a seed) are decoded in parallel but transformed in order: torch's global RNG,
        which the v2 transforms draw from, cannot be seeded per thread.
        """
        threads = torch.get_num_threads()  # 1 inside DataLoader worker processes
        if threads <= 1 or len(keys) <= 1:
            return [self[key] for key in keys]
        with ThreadPoolExecutor(min(threads, len(keys))) as pool:
            if not any(isinstance(key, tuple) for key in keys):  # no augmentation seeds
                return list(pool.map(self.__getitem__, keys))
            decoded = list(pool.map(self._decode, keys))
        return [self._finish(key, image) for key, image in zip(keys, decoded)]

    def _decode(self, key: int | tuple[int, int]) -> torch.Tensor | BadImage:
        path = self.samples[key[0] if isinstance(key, tuple) else key][0]
        try:
            return load_image(path)
        except Exception as exc:  # one bad file must never end an epoch
            return BadImage(path, f"cannot decode ({type(exc).__name__}: {exc})"[:200])

    def _finish(
        self, key: int | tuple[int, int], image: torch.Tensor | BadImage
    ) -> tuple[torch.Tensor, int] | BadImage:
        if isinstance(image, BadImage):
            return image
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        if aug_seed is None:
            return self.transform(image), self.samples[index][1]
        # v2 transforms draw from torch's global RNG and take no generator: seed it for this image
        # only, and give it back, so dropout (which draws from it too) never sees these seeds.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(aug_seed)
            return self.transform(image), self.samples[index][1]


def collate_skipping_bad(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    """Stack the good images; the bad ones travel along by name (they are counted, not fatal)."""
    bad = [b for b in batch if isinstance(b, BadImage)]
    good = [b for b in batch if not isinstance(b, BadImage)]
    for b in bad:
        warnings.warn(f"skipping {b.path}: {b.reason}", stacklevel=1)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, labels = zip(*good)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), bad


def default_num_workers(device_type: str | None = None) -> int:
    """Decoding processes beside the model's: none when the model runs on the CPU.

    There a worker decoding during the forward pass takes a core from torch's threads, and each
    parallel kernel then waits for its slowest thread. Measured on 2 cores (benchmarks/throughput.py):
    inference at 59-74 % of the forward limit with one worker, 89-100 % decoding in this process
    between batches on all threads (``ImageDataset.__getitems__``); a fine-tune epoch 1.0-1.4x
    faster. An accelerator leaves the cores free, so they decode.
    """
    if (device_type or pick_device().type) == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(
    samples: list[Sample],
    transform: v2.Compose,
    batch_size: int = 32,
    shuffle: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
    device_type: str | None = None,
) -> DataLoader:
    """Batches of (images, labels, undecodable images); workers as :func:`default_num_workers` says for the device."""
    workers = default_num_workers(device_type) if num_workers is None else num_workers
    return DataLoader(
        ImageDataset(samples, transform),
        batch_size=batch_size,
        # Only shuffled (training) batches carry augmentation seeds; the others transform on threads too.
        sampler=EpochSeededSampler(len(samples), seed, shuffle, with_aug_seeds=shuffle),
        num_workers=workers,
        collate_fn=collate_skipping_bad,
        persistent_workers=workers > 0,
        # Workers' base seed from a private generator: the global RNG (dropout's) stays untouched.
        generator=torch.Generator().manual_seed(seed),
    )
