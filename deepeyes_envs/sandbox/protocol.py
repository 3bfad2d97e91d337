"""The sandbox's wire format: one JSON header, then raw byte blobs, every size bounded by the reader.

A message is a 4-byte big-endian length, that many bytes of UTF-8 JSON (an object), then the blobs
whose sizes the header lists under ``"blobs"``. Images travel as blobs of raw uint8 pixels, their
shapes in the header, so nothing is pickled: a reader never runs code chosen by the other side, and
it refuses a header or a blob total above its limits before reading them.

This module is imported by the env process (as ``deepeyes_envs.sandbox.protocol``) and inside the
sandbox (as the top-level ``protocol``), so it depends on the standard library only.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from typing import Any

LENGTH = struct.Struct("!I")


class ProtocolError(Exception):
    """A message broke the format or its size limits; the connection cannot be trusted any more."""


def encode(header: dict[str, Any], blobs: Sequence[bytes | memoryview] = ()) -> list[bytes | memoryview]:
    """The parts of one message, in order (write them all, or join them)."""
    head = json.dumps({**header, "blobs": [memoryview(b).nbytes for b in blobs]}).encode("utf-8")
    return [LENGTH.pack(len(head)), head, *blobs]


def decode(read_exact: Callable[[int], bytearray], max_header: int,
           max_blob_bytes: int) -> tuple[dict, list[bytearray]]:
    """Read one message with ``read_exact(n)`` (exactly n bytes, or EOFError): (header, blobs)."""
    (size,) = LENGTH.unpack(read_exact(LENGTH.size))
    if size > max_header:
        raise ProtocolError(f"message header of {size} bytes exceeds the limit of {max_header}")
    try:
        header = json.loads(read_exact(size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"message header is not JSON: {exc}") from None
    sizes = header.get("blobs") if isinstance(header, dict) else None
    if not isinstance(sizes, list) or not all(isinstance(n, int) and n >= 0 for n in sizes):
        raise ProtocolError("message header must be an object with a list of blob sizes")
    if sum(sizes) > max_blob_bytes:
        raise ProtocolError(f"message carries {sum(sizes)} bytes of data, above the limit of {max_blob_bytes}")
    return header, [read_exact(n) for n in sizes]


def reader(recv_into: Callable[[memoryview], int]) -> Callable[[int], bytearray]:
    """``read_exact`` over a ``recv_into``-like function (``socket.recv_into``, ``BytesIO.readinto``) that
    fills part of a buffer and returns the count (0 at EOF). Each result is a new ``bytearray`` that was
    written in place, so its owner can zero it later and no stray copy of the data is left behind."""

    def read_exact(n: int) -> bytearray:
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            count = recv_into(view[got:])
            if not count:
                raise EOFError(f"connection closed with {n - got} of {n} bytes unread")
            got += count
        return buffer

    return read_exact


def image_header(shape: Sequence[int]) -> list[int]:
    """An image's entry in a header: [height, width] of an H x W x 3 uint8 blob."""
    return [int(shape[0]), int(shape[1])]


def check_images(entries: Any, blobs: Sequence[bytes], max_pixels: int) -> list[tuple[int, int]]:
    """Validate the header's image shapes against their blobs; return (height, width) pairs."""
    if not isinstance(entries, list) or len(entries) != len(blobs):
        raise ProtocolError("image entries do not match the blobs")
    shapes = []
    for entry, blob in zip(entries, blobs, strict=True):
        ok = isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, int) and v > 0 for v in entry)
        if not ok or entry[0] * entry[1] > max_pixels or len(blob) != entry[0] * entry[1] * 3:
            raise ProtocolError(f"image entry {entry!r} does not describe its {len(blob)}-byte blob within limits")
        shapes.append((entry[0], entry[1]))
    return shapes
