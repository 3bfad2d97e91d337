"""Observation and action spaces for chat-with-images envs.

Neither fits gymnasium's built-in spaces: images have any size, text any length. Both spaces here
are strict in ``contains`` (so ``check_env`` catches a malformed observation) and sample small
random values so generic tooling can exercise an env. ``ConversationSpace`` registers Gymnasium's
shared-memory hooks, so ``AsyncVectorEnv`` works with its defaults (see the end of this module).
"""

from __future__ import annotations

import copy
import multiprocessing
import pickle
import queue
import string
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import create_shared_memory, read_from_shared_memory, write_to_shared_memory

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


# -- AsyncVectorEnv's shared memory ------------------------------------------------------------
# AsyncVectorEnv (and gym.make_vec(..., vectorization_mode="async")) defaults to shared_memory=True and
# asks Gymnasium's create/read/write_to_shared_memory hooks for a buffer per observation space. A
# conversation has no fixed size, so no fixed buffer can hold it; the hooks registered below give each
# worker a queue instead, and the parent a live view of the latest observation of every env. That costs
# what shared_memory=False costs (the observation is pickled once and sent once) and makes the defaults
# work. Observations are pickled in the worker before the step returns, so nothing the env does later
# can change what the parent reads.

_DELIVERY_TIMEOUT_S = 600.0


class _ObservationChannel:
    """One queue per env, and how many observations each env's worker has written so far."""

    def __init__(self, n: int, ctx: Any):
        self.queues = [ctx.Queue() for _ in range(n)]
        self.written = ctx.RawArray("q", n)


class ConversationBatch(Sequence):
    """The observations of a vector env's sub-envs, as AsyncVectorEnv holds them with shared memory.

    Reading env ``i``'s entry collects the observations its worker has written since the last read and
    keeps the newest, so the view is live, as Gymnasium's shared-memory arrays are: with ``copy=False``
    an earlier result shows later observations. ``deepcopy`` (what ``copy=True``, the default, does)
    gives a plain tuple, the same value ``shared_memory=False`` returns.
    """

    def __init__(self, channel: _ObservationChannel):
        self._channel = channel
        self._latest: list[Any] = [None] * len(channel.queues)
        self._received = [0] * len(channel.queues)

    def __len__(self) -> int:
        return len(self._latest)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(len(self))[index])
        i = range(len(self))[index]  # negative indices, and IndexError past the end
        while self._received[i] < self._channel.written[i]:
            try:
                payload = self._channel.queues[i].get(timeout=_DELIVERY_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"vector env worker {i} wrote an observation that never arrived") from None
            self._latest[i] = pickle.loads(payload)
            self._received[i] += 1
        return self._latest[i]

    def __deepcopy__(self, memo: dict) -> tuple:
        return tuple(copy.deepcopy(self[i], memo) for i in range(len(self)))

    def __repr__(self) -> str:
        return f"ConversationBatch({len(self)} envs)"


@create_shared_memory.register(ConversationSpace)
def _create_conversation_memory(space: ConversationSpace, n: int = 1, ctx: Any = multiprocessing) -> Any:
    return _ObservationChannel(n, ctx)


@read_from_shared_memory.register(ConversationSpace)
def _read_conversation_memory(space: ConversationSpace, shared_memory: Any, n: int = 1) -> ConversationBatch:
    return ConversationBatch(shared_memory)


@write_to_shared_memory.register(ConversationSpace)
def _write_conversation_memory(space: ConversationSpace, index: int, value: Any, shared_memory: Any) -> None:
    out = shared_memory.queues[index]
    out.cancel_join_thread()  # a worker that exits with unread observations must not hang its close()
    out.put(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    shared_memory.written[index] += 1
