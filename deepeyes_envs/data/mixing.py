"""One training mix of agentic rows (``env_name`` set) and plain rows (``env_name`` empty), kept apart by kind.

DeepEyes trains on one stream in which tool rows (V*, charts) and one-turn rows (math) are mixed and told
apart only by ``env_name`` (docs/deepeyes.md, "Data"); the ratio then drifts with whatever the files
hold. :class:`MixedTaskSource` holds the two kinds side by side so that the ratio becomes a setting: the
trainer's schedule (``deepeyes_agent.training.tasks.MixedSchedule``) draws :func:`agentic_count` agentic
rows per batch from it, and :func:`route` sends each task to its own env.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import pyarrow.parquet as pq

from ..registry import env_id_for
from .parquet import ParquetTaskSource, load_deepeyes_parquet
from .tasks import ConcatTaskSource, IndexedTaskSource, PathLike, Task, TaskSource, as_task_source, env_name_of

Paths = Union[PathLike, Sequence[PathLike]]


class SubsetTaskSource(IndexedTaskSource):
    """The rows ``indices`` of another source, in that order (e.g. its agentic rows only)."""

    def __init__(self, source: TaskSource, indices: Sequence[int]):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.indices.size)

    def _get(self, index: int) -> Task:
        return self.source[int(self.indices[index])]


def env_names(source: TaskSource) -> list[str]:
    """Every row's ``env_name`` ("" for plain rows), reading only that column where possible.

    A DeepEyes parquet file is read column-wise (no images decoded, no rows converted), so splitting
    a 47k-row training file costs a fraction of a second; other sources are walked task by task.
    """
    if isinstance(source, ParquetTaskSource):
        column = pq.read_table(source.path, columns=["env_name"]).column("env_name").to_pylist()
        return [name or "" for name in column]
    if isinstance(source, ConcatTaskSource):
        return [name for sub in source.sources for name in env_names(sub)]
    if isinstance(source, SubsetTaskSource):
        names = env_names(source.source)
        return [names[i] for i in source.indices]
    return [env_name_of(source[i]) for i in range(len(source))]


def split_by_env_name(source: TaskSource) -> tuple[SubsetTaskSource, SubsetTaskSource]:
    """(agentic rows, plain rows) of one source, each in file order."""
    names = env_names(source)
    agentic = [i for i, name in enumerate(names) if name]
    plain = [i for i, name in enumerate(names) if not name]
    return SubsetTaskSource(source, agentic), SubsetTaskSource(source, plain)


def route(tasks: Sequence[Task]) -> dict[str, list[Task]]:
    """Tasks grouped by the env they run in (``env_id_for``: empty ``env_name`` -> "plain"), order kept."""
    out: dict[str, list[Task]] = {}
    for task in tasks:
        out.setdefault(env_id_for(task), []).append(task)
    return out


def agentic_count(size: int, fraction: float, rng: np.random.Generator) -> int:
    """How many of ``size`` tasks are agentic: ``fraction * size`` when whole, else its floor or ceiling
    drawn so that the expected count is exact (a batch of 3 at 0.5 holds 1 or 2, half the time each)."""
    exact = fraction * size
    low = math.floor(exact + 1e-9)
    rest = exact - low
    return low + (1 if rest > 1e-9 and rng.random() < rest else 0)


class MixedTaskSource(IndexedTaskSource):
    """Agentic and plain tasks, and the share of each batch that is agentic (``agentic_fraction``).

    Indexing is the concatenation (agentic rows first), the index space the trainer's ``MixedSchedule``
    draws from. A fraction of 1 (or 0) needs no plain (or agentic) rows at all. A row read from the
    agentic side must have an ``env_name`` and one from the plain side must not: a row in the wrong file
    would silently change the ratio, so it raises ``ValueError`` instead.
    """

    def __init__(self, agentic: TaskSource | Sequence[Task], plain: TaskSource | Sequence[Task],
                 agentic_fraction: float = 0.5):
        if not 0.0 <= agentic_fraction <= 1.0:
            raise ValueError(f"agentic_fraction must be within [0, 1], got {agentic_fraction}")
        self.agentic = as_task_source(agentic)
        self.plain = as_task_source(plain)
        self.agentic_fraction = float(agentic_fraction)
        if agentic_fraction > 0 and len(self.agentic) == 0:
            raise ValueError(f"agentic_fraction is {agentic_fraction} but there are no agentic rows")
        if agentic_fraction < 1 and len(self.plain) == 0:
            raise ValueError(f"agentic_fraction is {agentic_fraction} but there are no plain rows")

    @classmethod
    def from_config(cls, agentic_fraction: float = 0.5, data: Optional[Paths] = None,
                    agentic_data: Optional[Paths] = None, plain_data: Optional[Paths] = None,
                    image_root: Optional[PathLike] = None) -> MixedTaskSource:
        """Build from DeepEyes parquet paths, where the kinds may come in files of their own.

        ``data``: file(s) holding both kinds of rows, split by ``env_name``. Or ``agentic_data`` /
        ``plain_data``: files of one kind each (rows are still checked as read). Both forms may be
        combined; the rows found are pooled per kind. (The trainer's ``data.source`` with
        ``data.agentic_fraction`` is the ``data`` form.)
        """
        agentic: list[TaskSource] = []
        plain: list[TaskSource] = []
        if data is not None:
            a, p = split_by_env_name(load_deepeyes_parquet(_paths(data), image_root=image_root))
            agentic.append(a)
            plain.append(p)
        if agentic_data is not None:
            agentic.append(load_deepeyes_parquet(_paths(agentic_data), image_root=image_root))
        if plain_data is not None:
            plain.append(load_deepeyes_parquet(_paths(plain_data), image_root=image_root))
        if not agentic and not plain:
            raise ValueError("give data, or agentic_data and/or plain_data")
        return cls(ConcatTaskSource(agentic), ConcatTaskSource(plain), agentic_fraction)

    def __len__(self) -> int:
        return len(self.agentic) + len(self.plain)

    def _get(self, index: int) -> Task:
        n = len(self.agentic)
        if index < n:
            return self._checked(self.agentic[index], agentic=True)
        return self._checked(self.plain[index - n], agentic=False)

    @staticmethod
    def _checked(task: Task, agentic: bool) -> Task:
        if agentic and not env_name_of(task):
            raise ValueError(f"task {task.task_id!r} came from the agentic rows but has an empty env_name")
        if not agentic and env_name_of(task):
            raise ValueError(f"task {task.task_id!r} came from the plain rows but has env_name "
                             f"{task.env_name!r}")
        return task

    def __repr__(self) -> str:
        return (f"MixedTaskSource({len(self.agentic)} agentic, {len(self.plain)} plain, "
                f"agentic_fraction={self.agentic_fraction})")


def _paths(value: Paths) -> Union[PathLike, list[PathLike]]:
    return value if isinstance(value, (str, os.PathLike)) else list(value)
