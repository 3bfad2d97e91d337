"""Observation and action spaces for chat-with-images envs.

Neither fits gymnasium's built-in spaces: images have any size, text any length. Both spaces here
are strict in ``contains`` (so ``check_env`` catches a malformed observation) and sample small
random values so generic tooling can exercise an env.
"""

from __future__ import annotations

import string
from typing import Any, Optional

import numpy as np
from gymnasium import spaces

ROLES = ("system", "user", "assistant", "tool")
_ALPHABET = string.ascii_letters + string.digits + " .,?!<>/{}[]\":\n"


class ConversationSpace(spaces.Space):
    """``{"messages": (message, ...)}`` where each message is ``{"role", "content": (part, ...)}``
    and each part is ``{"type": "text", "text": str}`` or ``{"type": "image", "image": uint8 HxWx3}``."""

    def __init__(self, seed: Optional[int] = None):
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> dict[str, tuple]:
        rng = self.np_random
        image = rng.integers(0, 256, size=(int(rng.integers(1, 64)), int(rng.integers(1, 64)), 3), dtype=np.uint8)
        text = "".join(rng.choice(list(_ALPHABET), size=int(rng.integers(0, 32))))
        content = ({"type": "image", "image": image}, {"type": "text", "text": text})
        return {"messages": ({"role": "user", "content": content},)}

    def contains(self, x: Any) -> bool:
        return isinstance(x, dict) and set(x) == {"messages"} and isinstance(x["messages"], tuple) and all(
            _is_message(m) for m in x["messages"]
        )

    def __repr__(self) -> str:
        return "ConversationSpace()"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ConversationSpace)


class AgentTurnSpace(spaces.Space):
    """One assistant turn: generated text (``str``), ``{"text": str, "finish_reason": str}`` when the
    engine reports why it stopped, or a structured call ``{"name": str, "arguments": dict}``."""

    def __init__(self, max_length: int = 200_000, seed: Optional[int] = None):
        self.max_length = max_length
        super().__init__(shape=None, dtype=None, seed=seed)

    @property
    def is_np_flattenable(self) -> bool:
        return False

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        rng = self.np_random
        return "".join(rng.choice(list(_ALPHABET), size=int(rng.integers(0, 64))))

    def contains(self, x: Any) -> bool:
        if isinstance(x, str):
            return len(x) <= self.max_length
        if isinstance(x, dict) and set(x) <= {"text", "finish_reason"} and "text" in x:
            return isinstance(x["text"], str) and len(x["text"]) <= self.max_length
        return isinstance(x, dict) and set(x) == {"name", "arguments"} and isinstance(x["name"], str) and isinstance(
            x["arguments"], dict
        )

    def __repr__(self) -> str:
        return f"AgentTurnSpace(max_length={self.max_length})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, AgentTurnSpace) and other.max_length == self.max_length


def _is_message(m: Any) -> bool:
    return (
        isinstance(m, dict)
        and m.get("role") in ROLES
        and isinstance(m.get("content"), tuple)
        and all(_is_part(p) for p in m["content"])
    )


def _is_part(p: Any) -> bool:
    if not isinstance(p, dict):
        return False
    if p.get("type") == "text":
        return isinstance(p.get("text"), str)
    if p.get("type") == "image":
        img = p.get("image")
        return isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    return False
