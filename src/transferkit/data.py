"""Samples → tensors: decoding, the backbone's own preprocessing, augmentation, loaders.

Which images there are, and their labels and splits, is :mod:`transferkit.discovery`'s (its names
are re-exported here, where the rest of the package has always found them).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral
from typing import Any, NamedTuple

import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .lean_imports import import_torchvision

import_torchvision()  # first: torchvision without dynamo's start-up cost
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2

from .backbones import Preprocessing
from .discovery import (  # noqa: F401  (re-exported)
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    VAL_DIR_NAMES,
    ImageFolderSplits,
    discover,
    discover_for,
    read_exclude_list,
    scan_class_folder,
)
from .samples import (  # noqa: F401  (re-exported)
    Sample,
    class_counts,
    first_label,
    label_indices,
    relabelled,
    shuffled_by_class,
    stratified_split,
)
from .errors import TransferkitError
from .image_files import IMAGE_FORMATS, shape_problem
from .performance import pick_device
from .shards import read_packed

JPEG_EXTENSIONS = (".jpg", ".jpeg")
AUGMENTATIONS = ("none", "light", "strong")
# An image's EXIF is read for its orientation alone: PIL's warning of a damaged EXIF block (common in
# photos, harmless here) would repeat for every such image, in every loader worker.
warnings.filterwarnings("ignore", message="Corrupt EXIF data|Tag offset too large|Tag data larger than file",
                        category=UserWarning, module=r"PIL\.")  # fmt: skip


# --------------------------------------------------------------------------- decoding


def load_image(path: str) -> torch.Tensor:
    """Decode ``path`` to an RGB uint8 tensor (3, H, W); greyscale, palette, RGBA and CMYK included.

    The image is turned upright as its EXIF orientation says (a phone's photo taken sideways), as
    an image viewer shows it and as the person who labelled it saw it. ``path`` may also name an
    image packed in shards (:mod:`transferkit.shards`).
    """
    packed = read_packed(path)
    if path.lower().endswith(JPEG_EXTENSIONS):
        try:
            # libjpeg-turbo straight to a tensor: ~2x PIL on typical photos, no PIL→numpy copy.
            data = read_file(path) if packed is None else torch.frombuffer(bytearray(packed), dtype=torch.uint8)
            _check_jpeg_header(data)
            return _checked(decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True))
        except RuntimeError:
            pass  # CMYK, progressive oddities, mislabelled files: PIL below knows them all
    with Image.open(path if packed is None else io.BytesIO(packed), formats=IMAGE_FORMATS) as im:
        _checked(im)
        im.seek(0)  # first frame of an animated GIF
        return v2.functional.pil_to_tensor(to_rgb(upright(im)))


def _check_jpeg_header(data: torch.Tensor) -> None:
    """Refuse a JPEG by the size its frame header gives, before libjpeg allocates it (a 700-byte file can
    claim 20000 x 20000 pixels: 1.2 GB decoded). The markers are walked here: a few microseconds, where
    PIL's header read would nearly double a small image's decode."""
    size = _jpeg_frame_size(memoryview(data.numpy()))
    if size is not None:
        _checked_size(*size)


# Start-of-frame markers (baseline, progressive, lossless ...); C4, C8 and CC are other segments.
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_frame_size(data: memoryview) -> tuple[int, int] | None:
    """(width, height) of a JPEG's frame header; None where none is found (libjpeg then says why)."""
    at = 2  # after the start-of-image marker
    while at + 9 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _JPEG_FRAMES:
            return (data[at + 7] << 8) | data[at + 8], (data[at + 5] << 8) | data[at + 6]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        at += 2 + ((data[at + 2] << 8) | data[at + 3])
    return None


def decode_failure(exc: Exception) -> str:
    """Why an image was not decoded, as its result and warning say it (beside its path)."""
    if isinstance(exc, UnidentifiedImageError):  # PIL's message is the path again
        return "cannot decode (UnidentifiedImageError: not an image format transferkit reads)"
    return f"cannot decode ({type(exc).__name__}: {exc})"[:200]


def upright(im: Image.Image) -> Image.Image:
    """``im`` turned as its EXIF orientation says; itself, not a copy, where it needs no turn."""
    if im.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return im
    return ImageOps.exif_transpose(im)


def _checked(image: Any) -> Any:
    """``image`` (a tensor or PIL image) unless its shape is refused (``ValueError``: a skipped file)."""
    _checked_size(*(image.size if isinstance(image, Image.Image) else (image.shape[-1], image.shape[-2])))
    return image


def _checked_size(width: int, height: int) -> None:
    problem = shape_problem(width, height)
    if problem:
        raise ValueError(problem)


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scaled to 8 bits instead of clipped to white above 255 (or to black below 1): 16-bit greyscale
        # from its full range, whatever one image's brightest pixel (a dark scan stays as dark as it is
        # beside the others); 32-bit integers, whose range is not known, by their values; floats from 0-1.
        import numpy as np

        arr = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16"):
            peak = 65535.0
        elif im.mode == "F":
            peak = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        else:
            peak = 65535.0 if arr.max(initial=0.0) > 255 else 255.0
        im = Image.fromarray((arr * (255.0 / peak)).clip(0, 255).round().astype("uint8"), mode="L")
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
        except FileNotFoundError:  # listed in a label file, or removed since it was found
            return BadImage(path, "no such file")
        except TransferkitError:  # of the data as a whole (damaged or changed shards): said once, not per image
            raise
        except Exception as exc:  # one bad file must never end an epoch
            return BadImage(path, decode_failure(exc))

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
            torch.random.default_generator.manual_seed(aug_seed)  # the CPU's: torch.manual_seed reseeds GPUs too
            return self.transform(image), self.samples[index][1]


def collate_skipping_bad(batch: list[Any], warn: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    """Stack the good images; the bad ones travel along by name (they are counted, not fatal)."""
    bad = [b for b in batch if isinstance(b, BadImage)]
    good = [b for b in batch if not isinstance(b, BadImage)]
    for b in bad if warn else ():
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


def check_whole_number(option: str, value: Any, low: int, what: str = "") -> None:
    """A count given from Python (argparse checks the command line's) as a one-line error, not a traceback."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise TransferkitError(f"{option} must be a whole number of at least {low}{what}, got {value!r}")


def check_loading(batch_size: int, num_workers: int | None) -> None:
    """What DataLoader would refuse with a traceback."""
    check_whole_number("--batch-size", batch_size, 1)
    if num_workers is not None:
        check_whole_number("--num-workers", num_workers, 0)


def _collate_quietly(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, list[BadImage]]:
    return collate_skipping_bad(batch, warn=False)  # a module-level function: worker processes pickle it


def make_loader(
    samples: list[Sample],
    transform: v2.Compose,
    batch_size: int = 32,
    shuffle: bool = False,
    num_workers: int | None = None,
    seed: int = 0,
    device_type: str | None = None,
    sampler: EpochSeededSampler | None = None,
    warn_undecodable: bool = True,
) -> DataLoader:
    """Batches of (images, labels, undecodable images); workers as :func:`default_num_workers` says for the device.

    ``sampler`` replaces the (seeded, shuffling when ``shuffle``) order, e.g. by a class-balanced one.
    ``warn_undecodable=False``: an image that fails to decode is only listed, for a caller that answers
    for it (without a ``catch_warnings``, which is not thread-safe).
    """
    check_loading(batch_size, num_workers)
    workers = default_num_workers(device_type) if num_workers is None else num_workers
    return DataLoader(
        ImageDataset(samples, transform),
        batch_size=batch_size,
        # Only shuffled (training) batches carry augmentation seeds; the others transform on threads too.
        sampler=sampler or EpochSeededSampler(len(samples), seed, shuffle, with_aug_seeds=shuffle),
        num_workers=workers,
        collate_fn=collate_skipping_bad if warn_undecodable else _collate_quietly,
        persistent_workers=workers > 0,
        # Workers' base seed from a private generator: the global RNG (dropout's) stays untouched.
        generator=torch.Generator().manual_seed(seed),
    )
