"""Model-agnostic chat messages and their rendering to Qwen chat text.

A message is a plain dict ``{"role": str, "content": (part, ...)}`` where a part is
``{"type": "text", "text": str}`` or ``{"type": "image", "image": uint8 HxWx3 array}``: the same shape
Hugging Face chat templates accept, made of dicts and tuples so gymnasium can compare and batch it.
No model's special tokens appear in messages; :func:`render_qwen` adds them, and it is the one place
that knows the Qwen chat layout (``chat.py`` in the agent tokenizes its output).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Message = dict[str, Any]
Part = dict[str, Any]

IMAGE_PLACEHOLDER = "<image>"
# The control tokens of the Qwen chat format; the one place they are spelled (the agent imports them).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN_SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
QWEN_IMAGE = VISION_START + IMAGE_PAD + VISION_END


def text_part(text: str) -> Part:
    return {"type": "text", "text": text}


def image_part(image: np.ndarray) -> Part:
    return {"type": "image", "image": image}


def message(role: str, *parts: Part | str) -> Message:
    """Build a message; bare strings become text parts."""
    content = tuple(text_part(p) if isinstance(p, str) else p for p in parts)
    return {"role": role, "content": content}


def parts_from_placeholder_text(text: str, images: Sequence[np.ndarray]) -> tuple[Part, ...]:
    """Split DeepEyes-style text with ``<image>`` placeholders into parts, one image per placeholder."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        raise ValueError(
            f"text has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholders but {len(images)} images were given"
        )
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append(image_part(images[i - 1]))
        if piece:
            parts.append(text_part(piece))
    return tuple(parts)


def message_text(msg: Message, image_token: str = IMAGE_PLACEHOLDER) -> str:
    """The message's text with each image replaced by ``image_token``."""
    return "".join(p["text"] if p["type"] == "text" else image_token for p in msg["content"])


def message_images(messages: Iterable[Message]) -> list[np.ndarray]:
    """All images of the messages, in order of appearance."""
    return [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]


def render_qwen(messages: Iterable[Message], add_generation_prompt: bool = True) -> str:
    """Render a whole conversation as Qwen chat text (images as vision tokens)."""
    text = "".join(f"{IM_START}{m['role']}\n{message_text(m, QWEN_IMAGE)}{IM_END}\n" for m in messages)
    return text + f"{IM_START}assistant\n" if add_generation_prompt else text


def render_qwen_observation(messages: Sequence[Message]) -> str:
    """Render what follows a generated assistant turn (which stopped at ``<|im_end|>``).

    This is the text appended to the token context after each turn; for visual_toolbox_v2 it is
    character for character the observation string DeepEyes builds.
    """
    if not messages:
        return ""
    return "\n" + render_qwen(messages, add_generation_prompt=True)


_TRAILING_SPECIALS = re.compile(rf"(?:{re.escape(IM_END)}|{re.escape(END_OF_TEXT)})+\s*$")


def strip_end_of_turn(text: str) -> str:
    """Drop the end-of-turn tokens a generation stopped on; the renderer adds ``<|im_end|>`` back."""
    return _TRAILING_SPECIALS.sub("", text)
