"""Image loading, validation and Qwen-VL resize geometry.

Everything that turns bytes, paths or arrays into pixels goes through here, so that corrupt files,
decompression bombs and odd modes (grayscale, RGBA, 16-bit) fail or convert in one place with one
kind of error. Images stay compressed (``LazyImage``) until an env actually needs the pixels.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Union

import numpy as np
from PIL import Image

# Qwen2.5-VL defaults (docs/deepeyes.md, "The v2 env"): patch 14 x merge 2. Qwen3-VL: patch 16 x merge 2 = 32.
PATCH_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_ASPECT_RATIO = 200

# Refuse to decode anything larger than this many pixels (8K x 8K, above HR-Bench 8K's 7680x4320).
# It sits below PIL's own bomb threshold, so PIL never warns first; ours is an error naming the image.
MAX_DECODED_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """An image that cannot be used: corrupt, too large, empty or of an impossible shape."""


def check_pixel_budget(factor: int, min_pixels: int, max_pixels: int) -> None:
    """Refuse a resize budget no processor can meet, before any image is seen.

    Qwen-VL processors do not check their budget; with ``min_pixels < 1`` a small image would be
    resized to zero rows, and with ``max_pixels < min_pixels`` no size satisfies both bounds.
    """
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    if min_pixels < 1 or max_pixels < min_pixels:
        raise ValueError(f"need 1 <= min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")


def smart_resize(
    height: int,
    width: int,
    factor: int = PATCH_FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The (height, width) a Qwen-VL image processor resizes an image to.

    It must equal the processor's own arithmetic for every size the processor accepts (see
    tests/test_image_geometry.py), because the seen frame, the image's token count and the boxes read in
    that frame all follow from it. ``factor`` is the vision encoder's patch size times its merge size:
    28 for Qwen2-VL and Qwen2.5-VL, 32 for Qwen3-VL. Each side is first rounded to the nearest multiple
    of ``factor`` (Python's round: ties go to the even multiple; a side shorter than half a factor rounds
    to 0), then, when the area leaves [min_pixels, max_pixels], both sides are scaled by one common
    factor and rounded down (too large) or up (too small). Only the shrinking branch keeps each side at
    least ``factor``; the growing branch gets there by itself. Aspect ratios above 200 are refused, as
    the processor refuses them.
    """
    check_pixel_budget(factor, min_pixels, max_pixels)
    if height <= 0 or width <= 0:
        raise ImageError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(
            f"aspect ratio of a {width}x{height} image exceeds {MAX_ASPECT_RATIO}, "
            "which Qwen-VL processors reject"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        return (max(factor, math.floor(height / shrink / factor) * factor),
                max(factor, math.floor(width / shrink / factor) * factor))
    if h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        return math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return h, w


def box_to_original(
    box: tuple[float, float, float, float],
    seen_size: tuple[int, int],
    original_size: tuple[int, int],
) -> tuple[float, float, float, float]:
    """Map a box from the frame of the image the model saw to the original image's frame.

    Sizes are (width, height). The model reads pixel coordinates off the resized image, so a box
    in that frame must be scaled per axis before it can crop the original.
    """
    sx = original_size[0] / seen_size[0]
    sy = original_size[1] / seen_size[1]
    x1, y1, x2, y2 = box
    return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


def box_to_seen(
    box: tuple[float, float, float, float],
    seen_size: tuple[int, int],
    original_size: tuple[int, int],
) -> tuple[float, float, float, float]:
    """Inverse of :func:`box_to_original`."""
    return box_to_original(box, original_size, seen_size)


RELATIVE_SCALE = 1000  # Qwen3-VL grounds in thousandths of the image it saw: 0..1000 on each axis


def box_from_relative(
    box: tuple[float, float, float, float],
    size: tuple[int, int],
) -> tuple[float, float, float, float]:
    """Map a box in thousandths of an image (the ``relative_1000`` frame) to that image's pixels.

    ``size`` is the image's (width, height). The image a model sees is a resize of the whole image, so
    thousandths of the seen image are thousandths of the image itself and no seen size is needed. Each
    coordinate is ``v * side / 1000`` with the product first: for integer coordinates the product is
    exact, so a coordinate that lands on a whole or half pixel maps to it exactly and the crop's rounding
    never sees float noise.
    """
    width, height = size
    x1, y1, x2, y2 = box
    return (x1 * width / RELATIVE_SCALE, y1 * height / RELATIVE_SCALE,
            x2 * width / RELATIVE_SCALE, y2 * height / RELATIVE_SCALE)


def box_to_relative(
    box: tuple[float, float, float, float],
    size: tuple[int, int],
) -> tuple[float, float, float, float]:
    """Inverse of :func:`box_from_relative`: a box in pixels of an image of ``size`` as thousandths of it."""
    width, height = size
    x1, y1, x2, y2 = box
    return (x1 * RELATIVE_SCALE / width, y1 * RELATIVE_SCALE / height,
            x2 * RELATIVE_SCALE / width, y2 * RELATIVE_SCALE / height)


def seen_size(
    width: int,
    height: int,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    factor: int = PATCH_FACTOR,
) -> tuple[int, int]:
    """(width, height) of the image a Qwen-VL model sees for an original of this size."""
    h, w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return w, h


ImageLike = Union[np.ndarray, Image.Image, bytes, bytearray, str, os.PathLike, "LazyImage"]


def to_rgb_array(image: ImageLike, *, name: str = "image", max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
    """Decode anything image-like into a contiguous uint8 HxWx3 array, or raise ImageError naming it."""
    if isinstance(image, LazyImage):
        return image.load(max_pixels=max_pixels)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, name)
    if isinstance(image, Image.Image):
        _check_pixel_count(image.size, name, max_pixels)
        return _pil_to_rgb(image, name)
    if isinstance(image, (bytes, bytearray, str, os.PathLike)):
        return LazyImage(image, name=name).load(max_pixels=max_pixels)
    raise ImageError(f"{name}: unsupported image type {type(image).__name__}")


def _check_pixel_count(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} image has {w * h} pixels, above the limit of {max_pixels}")


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {array.shape}")
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise ImageError(f"{name}: float image contains NaN or infinity")
        if array.min() < 0 or array.max() > 255:
            raise ImageError(f"{name}: {array.dtype} pixel values outside 0..255")
        array = array.astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def _pil_to_rgb(image: Image.Image, name: str) -> np.ndarray:
    try:
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # PIL's convert("RGB") clips 16-bit values instead of scaling them.
            raw = np.asarray(image, dtype=np.int64)
            top = 65535 if image.mode.startswith("I;16") or raw.max() > 255 else 255
            raw = np.clip(raw * 255 // max(top, 1), 0, 255).astype(np.uint8)
            return _array_to_rgb(raw, name)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports truncated data in several ways
        raise ImageError(f"{name}: cannot decode image ({exc})") from exc


@dataclass
class LazyImage:
    """A compressed image (bytes or a file path) decoded only on :meth:`load`.

    ``size`` reads the header alone, so a dataset of thousands of 4K images costs only their
    compressed bytes until an env resets on one of them.
    """

    source: Union[bytes, bytearray, str, os.PathLike]
    name: str = "image"

    def _open(self) -> Image.Image:
        src = self.source
        try:
            if isinstance(src, (bytes, bytearray)):
                return Image.open(io.BytesIO(src))
            return Image.open(os.fspath(src))
        except FileNotFoundError as exc:
            raise ImageError(f"{self.name}: file not found: {src}") from exc
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageError(f"{self.name}: cannot read image ({exc})") from exc

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the header, without decoding pixels."""
        with self._open() as img:
            return img.size

    def load(self, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
        """Decode to uint8 HxWx3, refusing images above ``max_pixels`` before any decoding."""
        with self._open() as img:
            _check_pixel_count(img.size, self.name, max_pixels)
            try:
                img.load()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise ImageError(f"{self.name}: cannot decode image ({exc})") from exc
            return _pil_to_rgb(img, self.name)

    def to_bytes(self) -> bytes:
        """The compressed bytes (reading the file when the source is a path)."""
        if isinstance(self.source, (bytes, bytearray)):
            return bytes(self.source)
        with open(os.fspath(self.source), "rb") as fh:
            return fh.read()


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """PNG bytes of a uint8 HxWx3 array (used to store images in datasets and trajectories).

    ``compress_level`` trades size for speed (1 is several times faster on large images).
    """
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
