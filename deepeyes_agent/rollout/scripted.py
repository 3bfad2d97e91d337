"""Drive an env with scripted turns while the policy still samples: multi-turn rollouts from any model.

A randomly initialised model (the tiny test model) never writes a valid ``<tool_call>``, so its episodes
end after one turn and nothing multi-turn gets exercised: KV-cache reuse across turns, new images
mid-episode, truncation on the token budget. :class:`ScriptedActions` wraps an env so that ``step``
plays the script's turn instead of the model's text (the model's tokens, logprobs and text are still
recorded by the rollout loop, untouched). The env therefore answers with real zoom crops of different
sizes, and the episode lasts as long as the script. Tests, the debugging notebook and the rollout
benchmark use it; its trajectories are honest about it (``info["scripted_action"]`` on each step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym

from deepeyes_envs.data.tasks import Task
from deepeyes_envs.scripted import answer_turn, box_in_frame, zoom_turn

# Zoom boxes as fractions of the original image: three crops of clearly different sizes and shapes.
DEFAULT_ZOOMS = ((0.0, 0.0, 0.75, 0.75), (0.25, 0.4, 1.0, 0.7), (0.5, 0.1, 0.8, 0.9))

# A script: turn texts, or a function of the episode's task and the env's reset info that returns them.
Script = Sequence[str] | Callable[[Task, Mapping[str, Any]], Sequence[str]]


def zoom_script(task: Task, reset_info: Mapping[str, Any],
                zooms: Sequence[tuple[float, float, float, float]] = DEFAULT_ZOOMS,
                answer: str | None = None) -> list[str]:
    """Zoom turns on fractional boxes of the first image (in the frame the env reads, from its reset info),
    then an answer turn (the task's ground truth unless ``answer`` is given)."""
    width, height = reset_info["image_size"]
    turns = []
    for fx1, fy1, fx2, fy2 in zooms:
        turns.append(zoom_turn(box_in_frame((fx1 * width, fy1 * height, fx2 * width, fy2 * height), reset_info)))
    turns.append(answer_turn(task.answer if answer is None else answer))
    return turns


class ScriptedActions(gym.Wrapper):
    """Step the wrapped env with scripted turn texts instead of the agent's; past the script, the agent's
    own action goes through. ``script`` is a list of turn texts or a function of (task, reset info); the task
    is the one ``reset(options={"task": ...})`` was given."""

    def __init__(self, env: gym.Env, script: Script = zoom_script) -> None:
        super().__init__(env)
        self.script = script
        self._turns: list[str] = []
        self._turn = 0

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(**kwargs)
        if callable(self.script):
            task = (kwargs.get("options") or {}).get("task")
            if task is None:
                raise ValueError("a scripted function needs the task: reset(options={'task': ...})")
            self._turns = list(self.script(task, info))
        else:
            self._turns = list(self.script)
        self._turn = 0
        return obs, info
    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        scripted = self._turns[self._turn] if self._turn < len(self._turns) else None
        self._turn += 1
        if scripted is not None:
            action = {"text": scripted, "finish_reason": "stop"}
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["scripted_action"] = scripted
        return obs, reward, terminated, truncated, info


def scripted_env(env_id: str = "visual_toolbox_v2", script: Script = zoom_script, **kwargs: Any) -> ScriptedActions:
    """``gym.make(env_id, defer_reward=True, **kwargs)`` wrapped in :class:`ScriptedActions`."""
    kwargs.setdefault("defer_reward", True)
    return ScriptedActions(gym.make(env_id, disable_env_checker=True, **kwargs), script)
