"""Checked reads of one row's fields, shared by the DeepEyes and Hugging Face readers.

Each reader returns the field in the type a Task holds, or raises ``TaskError`` naming the row (``where``) and
the field (``field`` set on the error), so that a bad row is skipped and reported precisely rather than
failing later, inside an env, with a message nobody can trace back to the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np

from ..images import LazyImage
from .tasks import Box, PathLike, TaskError


def text(value: Any, where: str, name: str) -> str:
    """A string field, as is."""
    if not isinstance(value, str):
        raise TaskError(f"{where}: field {name!r} must be a string, got {type(value).__name__}", field=name)
    return value


def scalar_text(value: Any, where: str, name: str) -> str:
    """A string, or a number as its text: ground truths such as ``84`` are often stored as numbers."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise TaskError(f"{where}: field {name!r} must be a string or number, got {type(value).__name__}",
                        field=name)
    return value if isinstance(value, str) else str(value)


def mapping(value: Any, where: str, name: str) -> Mapping[str, Any]:
    """A struct field (``reward_model``, ``extra_info``)."""
    if not isinstance(value, Mapping):
        raise TaskError(f"{where}: field {name!r} must be a mapping, got {type(value).__name__}", field=name)
    return value


def sequence(value: Any, where: str, name: str) -> list[Any]:
    """A list field, from a list, a tuple or the object array pandas hands a list column over as."""
    if isinstance(value, np.ndarray):  # pandas hands list columns over as object arrays
        value = list(value)
    if not isinstance(value, (list, tuple)):
        raise TaskError(f"{where}: field {name!r} must be a list, got {type(value).__name__}", field=name)
    return list(value)


def prompt(value: Any, where: str) -> tuple[dict[str, str], ...]:
    """A non-empty list of ``{"role", "content"}`` messages, copied so the row can be dropped."""
    messages = sequence(value, where, "prompt")
    if not messages:
        raise TaskError(f"{where}: field 'prompt' is empty", field="prompt")
    out = []
    for i, msg in enumerate(messages):
        if not (isinstance(msg, Mapping) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise TaskError(f"{where}: prompt[{i}] must be {{'role': str, 'content': str}}", field=f"prompt[{i}]")
        out.append({"role": msg["role"], "content": msg["content"]})
    return tuple(out)


def images(value: Any, where: str, label: str, image_root: Optional[PathLike]) -> tuple[LazyImage, ...]:
    """Each entry (``{bytes, path}``, bytes or a path) as a LazyImage named ``label image j``; nothing decoded."""
    entries = sequence(value, where, "images")
    out = []
    for j, entry in enumerate(entries):
        data, path = None, None
        if isinstance(entry, Mapping):
            data, path = entry.get("bytes"), entry.get("path")
        elif isinstance(entry, (bytes, bytearray)):
            data = entry
        elif isinstance(entry, (str, os.PathLike)):
            path = entry
        name = f"{label} image {j}"
        if data is not None and not isinstance(data, (bytes, bytearray)):
            raise TaskError(f"{where}: images[{j}].bytes must be bytes, got {type(data).__name__}",
                            field=f"images[{j}]")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TaskError(f"{where}: images[{j}].path must be a string, got {type(path).__name__}",
                            field=f"images[{j}]")
        if data:
            out.append(LazyImage(bytes(data), name=name))
        elif path:
            out.append(LazyImage(resolve_image_path(path, image_root), name=name))
        else:
            raise TaskError(f"{where}: images[{j}] has neither bytes nor a path", field=f"images[{j}]")
    return tuple(out)


def resolve_image_path(path: PathLike, image_root: Optional[PathLike]) -> str:
    """A relative image path is taken relative to ``image_root`` (when given)."""
    path = os.fspath(path)
    if image_root is not None and not os.path.isabs(path):
        return os.path.join(os.fspath(image_root), path)
    return path


def str_tuple(value: Any, where: str, name: str) -> Optional[tuple[str, ...]]:
    """A list of strings as a tuple; None stays None (the field is optional)."""
    if value is None:
        return None
    items = sequence(value, where, name)
    if not all(isinstance(x, str) for x in items):
        raise TaskError(f"{where}: every item of {name!r} must be a string", field=name)
    return tuple(items)


def options(value: Any, where: str, name: str) -> Optional[tuple[str, ...]]:
    """Multiple-choice option texts, from a list or a ``{letter: text}`` mapping; none (or empty) is None."""
    if isinstance(value, Mapping):  # {"A": "red", "B": "blue"}: letter order
        value = [value[k] for k in sorted(value)]
    opts = str_tuple(value, where, name)
    return opts or None


def boxes(value: Any, where: str, name: str) -> tuple[Box, ...]:
    """Ground-truth boxes ``[x1, y1, x2, y2]``, finite and ordered: a judge or a reward measures against them."""
    if value is None:
        return ()
    out = []
    for i, box in enumerate(sequence(value, where, name)):
        nums = sequence(box, where, f"{name}[{i}]")
        ok = len(nums) == 4 and all(isinstance(v, (int, float, np.number)) and math.isfinite(v) for v in nums)
        if not ok or not (nums[0] <= nums[2] and nums[1] <= nums[3]):
            raise TaskError(f"{where}: {name}[{i}] must be 4 finite numbers [x1, y1, x2, y2] with x1<=x2, y1<=y2",
                            field=f"{name}[{i}]")
        out.append(tuple(float(v) for v in nums))
    return tuple(out)
