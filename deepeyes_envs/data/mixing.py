"""Hybrid batches: agentic rows (``env_name`` set) and plain rows (``env_name`` empty) at a fixed ratio.

DeepEyes trains on one stream in which tool rows (V*, charts) and one-turn rows (math) are mixed and told
apart only by ``env_name`` (docs/deepeyes.md, "Data"); the ratio then drifts with whatever the files
hold. :class:`MixedTaskSource` makes the ratio a setting: every :meth:`~MixedTaskSource.batch` holds
``agentic_fraction * size`` agentic tasks (exactly when that is a whole number), each task still routed
to its own env through :func:`deepeyes_envs.registry.env_id_for`.

Trainer wiring (config values -> source)::

    source = MixedTaskSource.from_config(data="train.parquet", agentic_fraction=0.5)
    tasks = source.batch(rng, 256)              # or: for tasks in source.iter_batches(256, seed=0)
    groups = route(tasks)                        # {"visual_toolbox_v2": [...], "plain": [...]}
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np

from .tasks import ConcatTaskSource, IndexedTaskSource, Task, TaskSource, as_task_source, env_name_of

PathLike = Union[str, os.PathLike]
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
    from .parquet import ParquetTaskSource

    if isinstance(source, ParquetTaskSource):
        import pyarrow.parquet as pq

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
    from ..registry import env_id_for

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
    """Agentic and plain tasks mixed at ``agentic_fraction`` per batch.

    Indexing is the concatenation (agentic rows first), so the source also works wherever a plain
    :class:`~deepeyes_envs.data.tasks.TaskSource` does; :meth:`sample` draws an agentic task with probability
    ``agentic_fraction``. A fraction of 1 (or 0) needs no plain (or agentic) rows at all.
    Tasks drawn from the agentic side must have an ``env_name`` and plain ones must not: a row in the
    wrong file would silently change the ratio, so it raises ``ValueError`` instead.
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

    # -- construction from config values ---------------------------------------------------------
    @classmethod
    def from_config(cls, agentic_fraction: float = 0.5, data: Optional[Paths] = None,
                    agentic_data: Optional[Paths] = None, plain_data: Optional[Paths] = None,
                    image_root: Optional[PathLike] = None) -> MixedTaskSource:
        """Build from file paths, as a trainer config states them.

        ``data``: DeepEyes parquet file(s) holding both kinds of rows, split by ``env_name``. Or
        ``agentic_data`` / ``plain_data``: files of one kind each (rows are still checked as drawn).
        Both forms may be combined; the rows found are pooled per kind.
        """
        from .parquet import load_deepeyes_parquet

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

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> MixedTaskSource:
        """``from_config(**config)`` for a config section such as ``{"data": ..., "agentic_fraction": 0.5}``."""
        return cls.from_config(**dict(config))

    # -- TaskSource protocol ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.agentic) + len(self.plain)

    def _get(self, index: int) -> Task:
        n = len(self.agentic)
        if index < n:
            return self._checked(self.agentic[index], agentic=True)
        return self._checked(self.plain[index - n], agentic=False)

    def sample(self, rng: np.random.Generator) -> Task:
        """One task: agentic with probability ``agentic_fraction``, uniform within its side."""
        agentic = rng.random() < self.agentic_fraction
        side = self.agentic if agentic else self.plain
        return self._checked(side[int(rng.integers(len(side)))], agentic=agentic)

    # -- batches ------------------------------------------------------------------------------------
    def batch(self, rng: np.random.Generator, size: int) -> list[Task]:
        """``size`` tasks with :func:`agentic_count` agentic ones, in a shuffled order.

        Within a batch no row repeats while its side has enough rows (drawn without replacement).
        """
        if size < 0:
            raise ValueError("size must be non-negative")
        n_agentic = agentic_count(size, self.agentic_fraction, rng)
        picks = [(True, i) for i in _draw(rng, len(self.agentic), n_agentic)]
        picks += [(False, i) for i in _draw(rng, len(self.plain), size - n_agentic)]
        order = rng.permutation(len(picks))
        return [self._pick(*picks[j]) for j in order]

    def iter_batches(self, size: int, seed: int = 0) -> Iterator[list[Task]]:
        """Endless batches of ``size`` that go through each side in epochs: every agentic (and every
        plain) row comes once before any comes again, each side reshuffled when it runs out.

        Deterministic given ``seed``; the two sides keep their own epochs, so a small plain file
        cycles more often than a large agentic one, and the ratio still holds per batch.
        """
        rng = np.random.default_rng(seed)
        cursors = {True: _EpochCursor(len(self.agentic), rng), False: _EpochCursor(len(self.plain), rng)}
        while True:
            n_agentic = agentic_count(size, self.agentic_fraction, rng)
            picks = [(True, cursors[True].next()) for _ in range(n_agentic)]
            picks += [(False, cursors[False].next()) for _ in range(size - n_agentic)]
            order = rng.permutation(len(picks))
            yield [self._pick(*picks[j]) for j in order]

    def _pick(self, agentic: bool, index: int) -> Task:
        side = self.agentic if agentic else self.plain
        return self._checked(side[index], agentic=agentic)

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


class _EpochCursor:
    """Walks a permutation of ``range(n)``, drawing a fresh one from ``rng`` at the end of each epoch."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n, self.rng = n, rng
        self.order: np.ndarray = np.empty(0, dtype=np.int64)
        self.pos = 0

    def next(self) -> int:
        if self.n == 0:
            raise ValueError("cannot draw from an empty side")
        if self.pos >= self.order.size:
            self.order, self.pos = self.rng.permutation(self.n), 0
        self.pos += 1
        return int(self.order[self.pos - 1])


def _draw(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """``k`` indices below ``n``: without replacement when ``k <= n``, else every row then random extras."""
    if k == 0:
        return []
    if n == 0:
        raise ValueError(f"need {k} tasks from a side with no rows")
    if k <= n:
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    return [int(i) for i in rng.permutation(n)] + [int(i) for i in rng.integers(n, size=k - n)]


def _paths(value: Paths) -> Union[PathLike, list[PathLike]]:
    return value if isinstance(value, (str, os.PathLike)) else list(value)
