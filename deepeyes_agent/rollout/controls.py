"""Controls for a trained zoom policy: change where it looks and nothing else, to show that where is what matters.

- ``fixed_box``: every zoom call's box is replaced by one box (the policy's most common one, or the image
  centre): if the policy is right because it looks at the target, it falls to chance;
- ``oracle_zoom``: the first turn is a zoom on the ground-truth box (padded as the demonstrations zoom), then
  the policy goes on: the ceiling of its eyes on the task.

:class:`ControlledActions` wraps an env so that it plays the replaced turn; ``info["played_action"]`` carries
it and the rollout loop records that text in the episode's context in place of the sampled tokens, so the
policy's later turns read what the env really did (``rollout.scripted.ScriptedActions``, by contrast, keeps the
model's own tokens: it only drives envs for tests).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from deepeyes_envs.scripted import scripted_turns

CONTROL_KINDS = ("fixed_box", "oracle_zoom")
_BOX = re.compile(r'("bbox_2d"\s*:\s*)\[[^\]]*\]')


@dataclass(frozen=True)
class Control:
    """One control: ``kind`` in ``CONTROL_KINDS``; ``box`` (for ``fixed_box``) in the frame the policy writes;
    ``margin`` (for ``oracle_zoom``) grows the true box as the demonstrations did (``sft.zoom_margin``)."""

    kind: str
    box: tuple[float, ...] | None = None
    margin: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in CONTROL_KINDS:
            raise ValueError(f"control kind must be one of {CONTROL_KINDS}, got {self.kind!r}")
        if self.kind == "fixed_box" and (self.box is None or len(self.box) != 4):
            raise ValueError(f"a fixed_box control needs a box of 4 numbers, got {self.box!r}")

    def wrapper(self) -> Callable[[gym.Env], gym.Env]:
        return lambda env: ControlledActions(env, self)


def centre_box(seen_size: Sequence[int], side: float) -> tuple[int, int, int, int]:
    """A ``side``-wide box at the centre of an image seen at ``seen_size`` (whole pixels)."""
    w, h = seen_size
    x1, y1 = round((w - side) / 2), round((h - side) / 2)
    return (x1, y1, x1 + round(side), y1 + round(side))


class ControlledActions(gym.Wrapper):
    """Play the control's turn in place of the agent's (see the module docstring)."""

    def __init__(self, env: gym.Env, control: Control) -> None:
        super().__init__(env)
        self.control = control
        self._oracle: str | None = None
        self._turn = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        self._turn = 0
        task = (kwargs.get("options") or {}).get("task")
        self._oracle = None
        if self.control.kind == "oracle_zoom":
            if task is None or not task.gt_boxes:
                raise ValueError("the oracle_zoom control needs a task with a ground-truth box: "
                                 "reset(options={'task': ...})")
            self._oracle = scripted_turns(task, info, thoughts=False, margin=self.control.margin)[0]
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        text = action["text"] if isinstance(action, dict) else str(action)
        played = self._oracle if self._turn == 0 and self._oracle is not None else self._replace_box(text)
        self._turn += 1
        if played != text:
            action = {"text": played, "finish_reason": "stop"}
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["played_action"] = played if played != text else None
        return obs, reward, terminated, truncated, info

    def _replace_box(self, text: str) -> str:
        if self.control.kind != "fixed_box":
            return text
        box = json.dumps([round(v) if float(v).is_integer() else v for v in self.control.box])
        return _BOX.sub(lambda m: m.group(1) + box, text)
