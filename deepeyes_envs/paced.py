"""PacedEnv: episodes whose length is drawn from a long-tailed distribution, for testing schedulers.

What makes a DeepEyes training step slow is not the average episode but the longest one: a batch waits for
the rollout that zooms five times. A randomly initialised policy never calls a tool, so every one of its
episodes lasts one turn and a trainer's scheduling (asynchronous sampling, ``algorithm.max_staleness``)
cannot be measured with it. This env takes the length out of the policy's hands: at reset it draws how many
turns the episode will last (``turn_weights``: the chance of 1, 2, ... turns), answers every turn before the
last with a short "go on" observation whatever the model wrote, and ends the episode at the drawn turn,
scored as ``ToolEnv`` scores it. ``turn_latency_s`` makes every turn last at least that long, from the
observation (or the prompt) to the step that answers it, standing in for a generation served by an
accelerator elsewhere: a CPU-only benchmark can then model rollouts that mostly wait. The wait is a deadline,
not a sleep per step, so the episodes a runner plays together wait at the same time, as they would for one
batched generation. Everything else (prompt, images, judge) is ``ToolEnv``'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .env import ToolEnv
from .messages import Message, message, text_part
from .parsing import ParsedTurn

GO_ON = "Go on: check your reasoning once more before you answer."
# 1 to 5 turns, most episodes short, a few long: the shape of DeepEyes' zoom counts.
LONG_TAIL = (0.4, 0.25, 0.15, 0.12, 0.08)


class PacedEnv(ToolEnv):
    """A ``ToolEnv`` whose episodes last a drawn number of turns; see the module docstring."""

    def __init__(self, *, turn_weights: Sequence[float] = LONG_TAIL, turn_latency_s: float = 0.0, **kwargs: Any):
        weights = np.asarray(turn_weights, dtype=float)
        if weights.ndim != 1 or not len(weights) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"turn_weights must be non-negative chances of 1, 2, ... turns, got {list(turn_weights)}")
        if turn_latency_s < 0:
            raise ValueError(f"turn_latency_s must be >= 0, got {turn_latency_s}")
        super().__init__(**{**kwargs, "max_turns": len(weights)})
        self.turn_weights = weights / weights.sum()
        self.turn_latency_s = float(turn_latency_s)
        self.target_turns = 1
        self._turn_due = 0.0  # time.monotonic() before which the current turn cannot be answered

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict[str, Any]] = None):
        obs, info = super().reset(seed=seed, options=options)
        self.target_turns = 1 + int(self.np_random.choice(len(self.turn_weights), p=self.turn_weights))
        self._turn_due = time.monotonic() + self.turn_latency_s
        return obs, {**info, "target_turns": self.target_turns}

    def step(self, action: Any):
        time.sleep(max(0.0, self._turn_due - time.monotonic()))
        result = super().step(action)
        self._turn_due = time.monotonic() + self.turn_latency_s
        return result

    def _end_reason(self, text: str, finish_reason: Optional[str],
                    info: dict[str, Any]) -> tuple[Optional[tuple], Optional[ParsedTurn]]:
        end, parsed = super()._end_reason(text, finish_reason, info)
        if self.turn < self.target_turns:
            return None, None  # whatever the turn said, the episode goes on
        if end is None:  # a tool call on the last turn: the episode is cut off there
            return (False, True, "max_turns"), parsed
        return end, parsed

    def _run_tools(self, parsed: Optional[ParsedTurn], info: dict[str, Any]) -> list[Message]:
        if parsed is None:
            return [message("user", text_part(GO_ON))]
        return super()._run_tools(parsed, info)
