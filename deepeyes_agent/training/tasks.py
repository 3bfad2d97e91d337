"""Tasks for training: the task sources a config names and the seeded order in which they are visited.

The driver owns the data position (:class:`TaskSchedule`: epoch and cursor into a seeded permutation), so
a resumed run continues with exactly the tasks it would have seen; env runners only receive task indices
and build the tasks themselves from the same config (cheap: synthetic tasks are a seed and an index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from deepeyes_agent.training.config import DataConfig
from deepeyes_envs.data.hf import load_hf_dataset
from deepeyes_envs.data.mixing import MixedTaskSource, SubsetTaskSource, agentic_count, split_by_env_name
from deepeyes_envs.data.parquet import load_deepeyes_parquet
from deepeyes_envs.data.tasks import ListTaskSource, TaskSource
from deepeyes_envs.synthetic import SyntheticTaskSource

HF_PREFIX = "hf:"  # data.source / data.eval_path: a Hugging Face dataset held in local files


def make_task_source(data: DataConfig, split: Literal["train", "eval"] = "train") -> TaskSource:
    """The training or held-out tasks a config names (held-out synthetic tasks use their own seed).

    Training rows of a file mixed by ``data.agentic_fraction`` come as a ``MixedTaskSource``: its agentic rows
    first, then its plain ones (:func:`make_schedule` draws from both sides at the set ratio).
    """
    if data.source == "synthetic":
        n, seed = (data.n_train, data.seed) if split == "train" else (data.n_eval, data.eval_seed)
        return SyntheticTaskSource(n=n, seed=seed, kind=data.kind, **data.options)
    path = data.source if split == "train" else data.eval_path
    if not path:
        return ListTaskSource([])
    if path.startswith(HF_PREFIX):
        source: TaskSource = load_hf_dataset(path[len(HF_PREFIX):], columns=data.columns or None)
    else:
        source = load_deepeyes_parquet(path)
    cap = data.n_train if split == "train" else data.n_eval
    if cap and cap < len(source):
        source = SubsetTaskSource(source, range(cap))
    if split == "train" and data.agentic_fraction is not None:
        return MixedTaskSource(*split_by_env_name(source), agentic_fraction=data.agentic_fraction)
    return source


def make_schedule(source: TaskSource, data: DataConfig) -> TaskSchedule | MixedSchedule:
    """The visiting order of a training source: one seeded permutation, or one per side of a mixed source."""
    if isinstance(source, MixedTaskSource):
        return MixedSchedule(len(source.agentic), len(source.plain), source.agentic_fraction, data.seed,
                             data.shuffle)
    return TaskSchedule(len(source), data.seed, data.shuffle)


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


class MixedSchedule:
    """Batches of a :class:`MixedTaskSource` with ``agentic_fraction`` of their tasks agentic (DeepEyes mixes
    tool rows and one-turn rows in one batch). Each side is walked in its own seeded epochs; indices are into
    the mixed source (agentic rows first). The split of an odd batch is drawn per batch from the seed, so a
    resumed run draws the same batches."""

    def __init__(self, n_agentic: int, n_plain: int, agentic_fraction: float, seed: int, shuffle: bool = True):
        self.n_agentic, self.fraction, self.seed = n_agentic, agentic_fraction, seed
        self.agentic = TaskSchedule(n_agentic, seed, shuffle) if n_agentic else None
        self.plain = TaskSchedule(n_plain, seed + 1, shuffle) if n_plain else None
        self.batches = 0

    def take(self, k: int) -> list[int]:
        rng = np.random.default_rng([self.seed, self.batches, 29])
        n_agentic = agentic_count(k, self.fraction, rng)
        picks = self.agentic.take(n_agentic) if n_agentic else []
        picks += [self.n_agentic + i for i in self.plain.take(k - n_agentic)] if k > n_agentic else []
        self.batches += 1
        return [picks[i] for i in rng.permutation(len(picks))]

    def agentic_share(self, indices: Sequence[int]) -> float:
        """The share of ``indices`` that are agentic rows (a logged metric: the ratio actually trained on)."""
        return sum(1 for i in indices if i < self.n_agentic) / max(1, len(indices))

    def get_state(self) -> dict[str, Any]:
        return {"batches": self.batches, "agentic": self.agentic.get_state() if self.agentic else None,
                "plain": self.plain.get_state() if self.plain else None}

    def set_state(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
        for side, saved in ((self.agentic, state["agentic"]), (self.plain, state["plain"])):
            if side is not None:
                side.set_state(saved)
