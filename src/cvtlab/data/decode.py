"""Decode one image file, of any common format and mode, to RGB uint8 at a square size."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# GIFs give their first frame, multi-page TIFFs their first page.
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"
)  # fmt: skip


class DecodeError(Exception):
    """Why one image could not be used; the caller skips it and counts it."""


def is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def skip_reason_for_name(path: str) -> str:
    """Why a file whose name is not an image's is skipped."""
    name = path.rsplit("/", 1)[-1]
    kind = f"'.{name.rpartition('.')[2]}'" if "." in name else "a name without a suffix"
    return f"not an image file ({kind})"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float images: scale the full range to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "RGBA", "PA"):
        # Transparent pixels go on white, as image viewers show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


GRAY_MODES = ("L", "LA", "1", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def decode_image(data: bytes, size: int) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Bytes → (size, size, 3) uint8 RGB, the file's own mode and its (width, height).

    An image that is not ``size``×``size`` is resized (shorter side to ``size``, antialiased)
    and centre-cropped; a photo's EXIF orientation is applied first, so it is seen upright as
    viewers show it. Raises :class:`DecodeError` with a short reason for an empty, truncated,
    corrupt or non-image file.
    """
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            mode, original_size = img.mode, img.size
            # A JPEG at least twice the target size is decoded at 1/2, 1/4 or 1/8 scale (never
            # below ``size``): a 12-MP photo to 224 px 1.9x faster, 0.4 grey levels from the
            # full decode on average (benchmarks/data.py (d), RESULTS.md).
            img.draft(mode, (size, size))
            img.load()
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised content)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses images of more pixels than it is set to trust (89 MP by default).
        raise DecodeError(f"too large to decode ({str(e).split(',')[0]})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"corrupt or truncated image ({e})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # unreadable EXIF is metadata only: the pixels are still good
        pass
    try:
        rgb = _to_rgb(img)
    except (OSError, ValueError) as e:
        raise DecodeError(f"pixel mode {mode} cannot be read as RGB ({e})") from None
    img = resize_and_center_crop(rgb, size)
    return np.asarray(img, dtype=np.uint8), mode, original_size


def resize_and_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (antialiased), then the centre ``size``×``size`` square."""
    if img.size == (size, size):
        return img
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
