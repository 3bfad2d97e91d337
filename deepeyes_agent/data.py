"""Tasks for training: task sources from the config, the seeded visiting order, and SFT demonstrations.

The driver owns the data position (:class:`TaskSchedule`: epoch and cursor into a seeded permutation), so
a resumed run continues with exactly the tasks it would have seen; env runners only receive task indices
and build the tasks themselves from the same config (cheap: synthetic tasks are a seed and an index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

import deepeyes_envs  # noqa: F401 - registers the envs
from deepeyes_agent.chat import EpisodeContext
from deepeyes_agent.train_config import DataConfig, EnvConfig
from deepeyes_envs.registry import env_id_for
from deepeyes_envs.scripted import answer_turn, scripted_turns
from deepeyes_envs.tasks import Task, TaskSource


def make_task_source(data: DataConfig, split: str = "train") -> TaskSource:
    """The training or held-out tasks a config names (held-out synthetic tasks use their own seed)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if data.source == "synthetic":
        from deepeyes_envs.synthetic import SyntheticTaskSource

        n, seed = (data.n_train, data.seed) if split == "train" else (data.n_eval, data.eval_seed)
        return SyntheticTaskSource(n=n, seed=seed, kind=data.kind, **data.options)
    from deepeyes_envs.datasets import load_deepeyes_parquet

    path = data.source if split == "train" else data.eval_path
    if not path:
        from deepeyes_envs.tasks import ListTaskSource

        return ListTaskSource([])
    source = load_deepeyes_parquet(path)
    if split == "train" and data.n_train and data.n_train < len(source):
        from deepeyes_envs.tasks import ListTaskSource

        return ListTaskSource([source[i] for i in range(data.n_train)])
    if split == "eval" and data.n_eval and data.n_eval < len(source):
        from deepeyes_envs.tasks import ListTaskSource

        return ListTaskSource([source[i] for i in range(data.n_eval)])
    return source


class TaskSchedule:
    """Which task indices come next: a seeded permutation per epoch, walked by a cursor."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n < 1:
            raise ValueError("no training tasks")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        """The next ``k`` task indices (crossing into the next epoch as needed)."""
        out: list[int] = []
        while len(out) < k:
            order = self._order(self.epoch)
            step = min(k - len(out), self.n - self.cursor)
            out.extend(int(i) for i in order[self.cursor:self.cursor + step])
            self.cursor += step
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def make_env(task: Task, env: EnvConfig, **extra: Any) -> gym.Env:
    """The env a task plays in: the configured one, or the one its ``env_name`` routes to."""
    return gym.make(env.env_id or env_id_for(task), disable_env_checker=True, **{**env.kwargs, **extra})


def demonstration(task: Task, env_cfg: EnvConfig, processor: Any, *, include_zoom: bool = True,
                  max_total_tokens: int = 28672) -> EpisodeContext:
    """A scripted agent's episode on ``task`` as a token context (loss mask 1 on its turns).

    Turns are tokenized as an engine would have produced them: a tool-call turn ends at ``</tool_call>``
    (where generation stops), the final answer turn ends with ``<|im_end|>``.
    """
    env = make_env(task, env_cfg)
    try:
        obs, _ = env.reset(options={"task": task})
        ctx = EpisodeContext(processor, obs["messages"], max_total_tokens=max_total_tokens, max_prompt_tokens=None)
        turns = scripted_turns(env.unwrapped) if include_zoom else [answer_turn(task.answer, "I can see it.")]
        tokenizer = processor.tokenizer
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        for text in turns:
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            obs, _, terminated, truncated, _ = env.step(text)
            if terminated or truncated:
                ids.append(im_end)
            ctx.append_generated(ids, [0.0] * len(ids))
            if terminated or truncated:
                break
            if not ctx.append_observation(obs["messages"]):
                break
        return ctx
    finally:
        env.close()


def demonstrations(tasks: Sequence[Task], env_cfg: EnvConfig, processor: Any, *, include_zoom: bool = True,
                   max_total_tokens: int = 28672, zoom_fraction: float = 1.0, seed: int = 0) -> list[EpisodeContext]:
    """Demonstrations of ``tasks``. With ``include_zoom``, a seeded ``zoom_fraction`` of them zoom then answer
    and the rest answer directly (a mix that leaves RL a low starting tool-call rate to raise)."""
    if not 0.0 <= zoom_fraction <= 1.0:
        raise ValueError(f"zoom_fraction must be within [0, 1], got {zoom_fraction}")
    n_zoom = round(zoom_fraction * len(tasks)) if include_zoom else 0
    zooms = set(np.random.default_rng([seed, 23]).permutation(len(tasks))[:n_zoom].tolist())
    return [demonstration(t, env_cfg, processor, include_zoom=i in zooms, max_total_tokens=max_total_tokens)
            for i, t in enumerate(tasks)]
