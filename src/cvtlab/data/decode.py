"""Decode one image file, of any common format and mode, to RGB uint8 at a square size."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CvtLabError

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

# How an image becomes a square: the centre fraction of its shorter side (1.0: the whole shorter
# side, what cvtlab trains and tests on), or "squash": the whole image resized to the square.
Crop = float | str


def parse_crop(value: float | str, flag: str = "--crop") -> Crop:
    """A crop fraction in (0, 1] or ``"squash"``; anything else is a one-line error."""
    if isinstance(value, str) and value.strip().lower() == "squash":
        return "squash"
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0 < fraction <= 1:
        raise CvtLabError(
            f"{flag} must be a fraction in (0, 1] (0.875: the centre 7/8 of the shorter side) or"
            f" squash (the whole image resized to a square), not {value!r}"
        )
    return fraction


def crop_label(crop: Crop, size: int) -> str:
    """How ``crop`` turns an image into ``size``×``size``, in words."""
    if crop == "squash":
        return f"whole image resized to {size}x{size}"
    if crop == 1.0:
        return f"shorter side to {size}, centre {size}x{size}"
    return f"shorter side to {resized_side(size, crop)}, centre {size}x{size} (crop {crop:g})"


def resized_side(size: int, crop: float) -> int:
    # Rounded down, as the official CvT evaluation and Hugging Face's processor do
    # (224 / 0.875 = 256); the rounding to 6 places keeps 64 / 0.8 from landing on 79.
    return int(round(size / crop, 6))


def decode_image(
    data: bytes, size: int, crop: Crop = 1.0
) -> tuple[np.ndarray, str, tuple[int, int]]:
    """Bytes → (size, size, 3) uint8 RGB, the file's own mode and its (width, height).

    An image that is not ``size``×``size`` is resized (antialiased) and centre-cropped: its
    shorter side to ``size / crop``, then the centre ``size``×``size`` (``crop`` 1.0: the whole
    shorter side; ImageNet models are evaluated at 0.875), or with ``crop="squash"`` resized to
    ``size``×``size`` whole. A photo's EXIF orientation is applied first, so it is seen upright
    as viewers show it. Raises :class:`DecodeError` with a short reason for an empty, truncated,
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
            side = size if crop == "squash" else resized_side(size, crop)
            img.draft(mode, (side, side))
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
    img = resize_and_center_crop(rgb, size, crop)
    return np.asarray(img, dtype=np.uint8), mode, original_size


def resize_and_center_crop(img: Image.Image, size: int, crop: Crop = 1.0) -> Image.Image:
    """Shorter side to ``size / crop`` (antialiased), then the centre ``size``×``size`` square;
    ``crop="squash"``: the whole image resized to ``size``×``size``."""
    if img.size == (size, size) and crop in (1.0, "squash"):
        return img
    if crop == "squash":
        return img.resize((size, size), Image.BILINEAR, reducing_gap=3.0)
    w, h = img.size
    side = resized_side(size, crop)
    scale = side / min(w, h)
    nw, nh = max(side, round(w * scale)), max(side, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
