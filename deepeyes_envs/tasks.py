"""Task records: one question over one or more images, with what is needed to judge the answer."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from .images import ImageLike, to_rgb_array

Box = tuple[float, float, float, float]


class TaskError(ValueError):
    """A dataset row that cannot become a task; the message names the row and the problem."""


@dataclass
class Task:
    """One sample for an env.

    ``images`` stay as given (``LazyImage``, bytes, path, PIL or array) until :meth:`load_images`, so
    holding many tasks costs only their compressed bytes. ``prompt`` is a DeepEyes-style list of
    ``{"role", "content"}`` dicts whose text holds ``<image>`` placeholders; when it is ``None`` the
    env builds the prompt from ``question`` in its own style. ``env_name`` routes the task to an env
    (empty: the plain one-turn env). ``tools`` overrides the env's tool list for this task alone.
    """

    question: str
    answer: str
    images: tuple[ImageLike, ...] = ()
    data_source: str = ""
    env_name: str = "visual_toolbox_v2"
    task_id: str = ""
    options: Optional[tuple[str, ...]] = None
    gt_boxes: tuple[Box, ...] = ()
    prompt: Optional[tuple[dict[str, str], ...]] = None
    tools: Optional[tuple[str, ...]] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def load_images(self) -> list[np.ndarray]:
        """Decode every image to uint8 HxWx3; errors name the task."""
        label = self.task_id or self.question[:40]
        return [to_rgb_array(img, name=f"task {label!r} image {i}") for i, img in enumerate(self.images)]


# --- multiple-choice text ---------------------------------------------------------------------

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def option_letter(i: int) -> str:
    """The letter of the ``i``-th option (0 -> "A"); more than 26 options is a caller bug."""
    if not 0 <= i < 26:
        raise ValueError(f"option index {i} outside A..Z")
    return chr(ord("A") + i)


def format_multiple_choice(question: str, options: Sequence[str], instruction: str = MC_INSTRUCTION) -> str:
    """A question with its options listed V*-style, ``(A) text`` per line.

    The model only sees ``Task.question``, so a multiple-choice task carries its options in the
    text as well as in ``Task.options`` (which judges use to map letters to texts).
    """
    lines = [question.rstrip()]
    lines += [f"({option_letter(i)}) {opt}" for i, opt in enumerate(options)]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


# --- task sources ------------------------------------------------------------------------------


@runtime_checkable
class TaskSource(Protocol):
    """Where an env draws tasks from: indexable, sized, and sampled with the env's own RNG.

    Sampling takes the caller's ``np.random.Generator`` so that ``env.reset(seed=...)`` alone decides
    which task comes next, whatever the source.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Task: ...

    def sample(self, rng: np.random.Generator) -> Task: ...


class IndexedTaskSource:
    """Base class giving ``sample``, ``__iter__`` and index checks to any source with ``_get``.

    Subclasses implement ``__len__`` and ``_get(i)`` for ``0 <= i < len(self)``; negative indices
    and range errors are handled here once.
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, index: int) -> Task:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Task:
        return self._get(self._check_index(index))

    def __iter__(self) -> Iterator[Task]:
        for i in range(len(self)):
            yield self._get(i)

    def sample(self, rng: np.random.Generator) -> Task:
        """One task drawn uniformly with ``rng``."""
        n = len(self)
        if n == 0:
            raise IndexError(f"cannot sample from an empty {type(self).__name__}")
        return self._get(int(rng.integers(n)))

    def _check_index(self, index: int) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"task index must be an integer, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"task index {index} out of range for {n} tasks")
        return i


class ListTaskSource(IndexedTaskSource):
    """Tasks held in memory (their images stay compressed until an env loads them)."""

    def __init__(self, tasks: Iterable[Task]):
        self._tasks = list(tasks)
        for i, task in enumerate(self._tasks):
            if not isinstance(task, Task):
                raise TypeError(f"item {i} is a {type(task).__name__}, not a Task")

    def __len__(self) -> int:
        return len(self._tasks)

    def _get(self, index: int) -> Task:
        return self._tasks[index]


class ConcatTaskSource(IndexedTaskSource):
    """Several sources seen as one, e.g. the DeepEyes mix of V*, chart and math parquet files.

    Sampling is uniform over rows (not over sources), as when the files are concatenated.
    """

    def __init__(self, sources: Sequence[TaskSource]):
        self.sources = list(sources)
        self._offsets = [0]
        for src in self.sources:
            self._offsets.append(self._offsets[-1] + len(src))

    def __len__(self) -> int:
        return self._offsets[-1]

    def _get(self, index: int) -> Task:
        k = bisect.bisect_right(self._offsets, index) - 1
        return self.sources[k][index - self._offsets[k]]


def as_task_source(tasks: TaskSource | Iterable[Task]) -> TaskSource:
    """Accept a source as is, or wrap a list/iterable of tasks."""
    if isinstance(tasks, TaskSource):
        return tasks
    return ListTaskSource(tasks)


def env_name_of(task: Task) -> str:
    """The env a task is routed to; ``None`` or empty means the plain one-turn env (``""``).

    Agentic and non-agentic rows are mixed in one DeepEyes batch and told apart by this alone.
    """
    return task.env_name or ""
