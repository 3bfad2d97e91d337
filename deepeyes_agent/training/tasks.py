"""Tasks for training: the task sources a config names and the seeded order in which they are visited.

The driver owns the data position (:class:`TaskSchedule`: epoch and cursor into a seeded permutation), so
a resumed run continues with exactly the tasks it would have seen; env runners only receive task indices
and build the tasks themselves from the same config (cheap: synthetic tasks are a seed and an index).
"""

from __future__ import annotations

import numpy as np

from deepeyes_agent.training.config import DataConfig
from deepeyes_envs.tasks import TaskSource


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
