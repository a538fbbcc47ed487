"""Which image files transferkit decodes: the formats, the size limits, and a header check.

Every way in (a data folder, a label file, ``predict``'s files, an upload to ``serve``) applies these
rules before decoding, so an image that cannot be used is refused by name instead of stopping a run.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

# Refuse absurd images from their header, before decoding them (decompression bombs). PIL's own guard
# (its Image.MAX_IMAGE_PIXELS, left as the user has it) may refuse some sooner.
MAX_IMAGE_PIXELS = 16384 * 16384
# Longer side over shorter: resizing the shorter side to a few hundred pixels makes a 1 x 100,000 PNG
# of a few hundred bytes into billions of pixels.
MAX_ASPECT_RATIO = 100
# PIL's decoders for the extensions read (MPO, phones' JPEGs, comes with JPEG), and no other: never
# PostScript, which PIL hands to Ghostscript, whatever a file's name says.
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "GIF", "TIFF", "WEBP")


def shape_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused before it is decoded, or None."""
    if width * height > MAX_IMAGE_PIXELS:
        return f"too large ({width}x{height} pixels)"
    if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
        return f"too elongated ({width}x{height} pixels; at most {MAX_ASPECT_RATIO}:1)"
    return None


# Image formats people have that transferkit does not read (PIL needs plug-ins for them): named when
# such a file is skipped, so that a folder of iPhone photos is not just "not an image file extension".
UNREAD_FORMATS = {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF", ".jxl": "JPEG XL", ".dcm": "DICOM",
                  ".dng": "DNG raw", ".cr2": "Canon raw", ".cr3": "Canon raw", ".nef": "Nikon raw",
                  ".arw": "Sony raw", ".svg": "SVG"}  # fmt: skip


def unread_format(path: str | Path) -> str | None:
    """Why an image in a format transferkit does not read is skipped (its format named), or None."""
    name = UNREAD_FORMATS.get(Path(path).suffix.lower())
    return f"{name} images are not read; convert them to JPEG or PNG" if name else None


def image_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used, from a cheap header read; None if it looks like an image."""
    if unread := unread_format(path):
        return unread
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            return shape_problem(*im.size)
    except Image.DecompressionBombError:
        return "too large (decompression bomb guard)"
    except UnidentifiedImageError:  # its message repeats the path
        return "not a readable image (UnidentifiedImageError)"
    except (OSError, ValueError) as exc:  # "Truncated File Read" says what is wrong with the file
        return f"not a readable image ({type(exc).__name__}: {exc})"[:200]
