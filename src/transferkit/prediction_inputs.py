"""What ``predict`` is given, as image files: files, folders, lists, packed shards and images in memory.

An image in memory (a notebook's PIL image or array) is saved losslessly to a temporary PNG and read
back as any file is: one prediction path, the same decoding, the same answers as for its file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .data import IMAGE_EXTENSIONS, to_rgb, upright
from .errors import TransferkitError
from .files import is_not
from .image_files import unread_format
from .label_tables import LABEL_FILE_SUFFIXES
from .runs import folders_to_walk
from .shards import is_packed_image, is_url


def collect_images(paths: list[str | Path]) -> list[str]:
    """Image files among ``paths``; folders are searched recursively, hidden files ignored; a packed
    folder or URL (``transferkit pack``) gives its images, every split's; a CSV file the images in its path column."""
    from .label_tables import listed_images
    from .shards import is_packed_source, packed_images

    found: list[str] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if is_url(str(raw)) or is_packed_source(p):  # a folder (or URL) of `transferkit pack`: its images
            found += packed_images(raw)
        elif p.suffix.lower() in LABEL_FILE_SUFFIXES and p.is_file():  # a list of images: its path column
            found += listed_images(p, IMAGE_EXTENSIONS)
        elif p.is_dir():
            for dirpath, subdirs, files in os.walk(p):
                subdirs[:] = folders_to_walk(dirpath, subdirs)
                found += [
                    str(Path(dirpath) / f)
                    for f in sorted(files)
                    if (f.lower().endswith(IMAGE_EXTENSIONS) or unread_format(f)) and not f.startswith(".")
                ]
        elif p.is_file():
            found.append(str(p))
        else:
            raise TransferkitError(f"{p} {is_not(p)}; give image files or folders")
    if not paths:
        raise TransferkitError("no images given; give image files or folders")
    if not found:
        raise TransferkitError(f"no image files found in {', '.join(map(str, paths))}")
    return found


def why_not_predicted(path: str, reason: str | None = None) -> str:
    """What a result says of an image it has no answer for; ``reason``: the decoder's, where it gave one."""
    if is_packed_image(path):
        return reason or "cannot decode image"
    if not Path(path).exists():  # listed in a label file (a file or folder given is checked before)
        return "no such file"
    return unread_format(path) or reason or "cannot decode image"


@contextlib.contextmanager
def images_as_files(given: Any) -> Iterator[tuple[list[str | Path], dict[str, str]]]:
    """``given`` (one item or a list) as paths, each image in memory saved to a temporary PNG, and the
    name to answer each such file under: the image's own file name, else ``<image N>`` (its position)."""
    import numpy as np
    from PIL import Image

    single = isinstance(given, (str, Path, Image.Image)) or (isinstance(given, np.ndarray) and given.ndim in (2, 3))
    items = [given] if single else list(given)
    if any(type(item).__module__.startswith("torch") for item in items):  # (C, H, W) floats, normalised or not
        raise TransferkitError("predict takes image files, PIL images or uint8 arrays (H x W x 3), not tensors: "
                               "give the images the tensors were made from")  # fmt: skip
    if not any(isinstance(item, (Image.Image, np.ndarray)) for item in items):
        yield items, {}
        return
    with tempfile.TemporaryDirectory(prefix="transferkit-predict-") as folder:
        paths: list[str | Path] = []
        names: dict[str, str] = {}
        for position, item in enumerate(items):
            if not isinstance(item, (Image.Image, np.ndarray)):
                paths.append(item)
                continue
            path = os.path.join(folder, f"{position}.png")
            to_rgb(upright(_as_pil(item, position))).save(path, compress_level=1)
            paths.append(path)
            names[path] = getattr(item, "filename", "") or f"<image {position}>"
        yield paths, names


def _as_pil(item: Any, position: int) -> Any:
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if item.dtype != "uint8" or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] not in (1, 3, 4)):
        raise TransferkitError(f"image {position} is a {item.dtype} array of shape {tuple(item.shape)}; give an "
                               f"image as uint8 pixels (0-255), H x W or H x W x 3 (RGB), and several as a list "
                               f"(list(batch))")  # fmt: skip
    return Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[2] == 1 else item)
