"""Odd images inside dataset rows: every mode loads as uint8 HxWx3, bombs are refused undecoded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from deepeyes_envs.data.deepeyes_rows import task_from_deepeyes_row
from deepeyes_envs.images import MAX_DECODED_PIXELS, ImageError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def handmade_png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written byte by byte, for headers PIL would not produce (16-bit RGB, lying sizes)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw_rows))
        + _chunk(b"IEND", b"")
    )


def _pil_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _row(image_bytes: bytes) -> dict:
    return {
        "data_source": "vstar",
        "prompt": [{"role": "user", "content": "<image>\nWhat is it?"}],
        "images": [{"bytes": image_bytes, "path": None}],
        "env_name": "visual_toolbox_v2",
        "reward_model": {"style": "model", "ground_truth": "a cat"},
        "extra_info": {"index": 5},
    }


def _load(image_bytes: bytes) -> np.ndarray:
    (array,) = task_from_deepeyes_row(_row(image_bytes), 5).load_images()
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    return array


def test_one_pixel_image():
    array = _load(_pil_png(Image.new("RGB", (1, 1), (10, 20, 30))))
    assert array.shape == (1, 1, 3) and tuple(array[0, 0]) == (10, 20, 30)


def test_grayscale_becomes_three_equal_channels():
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    array = _load(_pil_png(Image.fromarray(gray, mode="L")))
    assert array.shape == (6, 8, 3) and np.array_equal(array[..., 1], gray) and np.array_equal(array[..., 2], gray)


def test_rgba_drops_alpha():
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[...] = (200, 100, 50, 7)
    array = _load(_pil_png(Image.fromarray(rgba, mode="RGBA")))
    assert array.shape == (4, 5, 3) and tuple(array[2, 2]) == (200, 100, 50)


def test_palette_image():
    array = _load(_pil_png(Image.new("RGB", (3, 3), (0, 255, 0)).convert("P")))
    assert tuple(array[1, 1]) == (0, 255, 0)


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    array = _load(_pil_png(Image.fromarray(values)))
    assert array[0, :, 0].tolist() == [0, 0, 127, 255]


def test_16_bit_rgb():
    pixels = np.array([[[65535, 0, 32768], [256, 512, 1024]]], dtype=">u2")
    png = handmade_png(2, 1, 16, 2, b"\x00" + pixels.tobytes())
    array = _load(png)
    assert array.shape == (1, 2, 3) and tuple(array[0, 0]) == (255, 0, 128)


@pytest.mark.parametrize("side", [9_000, 40_000])  # above our limit only; above PIL's bomb limit too
def test_decompression_bomb_is_refused_before_decoding(side):
    assert side * side > MAX_DECODED_PIXELS
    # The header claims side x side RGB pixels; the data holds one row. Decoding would need GBs.
    png = handmade_png(side, side, 8, 2, b"\x00" + b"\x00" * 3 * side)
    assert len(png) < 1_000
    with pytest.raises(ImageError, match=r"row 5 \(vstar-5\) image 0"):
        _load(png)
