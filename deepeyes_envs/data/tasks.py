"""Task records: one question over one or more images, with what is needed to judge the answer."""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Union, runtime_checkable

import numpy as np

from ..images import MAX_DECODED_PIXELS, ImageError, ImageLike, seen_size, to_rgb_array

Box = tuple[float, float, float, float]
PathLike = Union[str, os.PathLike]  # a file name, as every loader of this package takes one


class TaskError(ValueError):
    """A dataset row that cannot become a task, or a task that cannot be played.

    The message names the row and the problem. ``field`` is the part at fault (``"reward_model"``,
    ``"images[1]"``), ``index`` the row in its file, ``source`` the file and ``task_id`` the task, where
    known, so that a trainer can skip the row and log it (:meth:`BadRow.from_error`).
    """

    def __init__(self, message: str, *, field: Optional[str] = None, index: Optional[int] = None,
                 source: str = "", task_id: str = ""):
        super().__init__(message)
        self.field, self.index, self.source, self.task_id = field, index, source, task_id


class TaskImageError(TaskError, ImageError):
    """A task's image cannot be used: corrupt or truncated bytes, a missing file, too many pixels, a size
    the processor refuses. Both a ``TaskError`` (a bad row, to skip) and an ``ImageError`` (a bad image)."""


@dataclass(frozen=True)
class BadRow:
    """A row that cannot be trained on, and why: one line of a trainer's ``skipped_rows.jsonl``."""

    index: Optional[int]
    reason: str
    field: Optional[str] = None
    source: str = ""
    task_id: str = ""

    @classmethod
    def from_error(cls, error: TaskError, index: Optional[int] = None, source: str = "") -> BadRow:
        """The bad row a ``TaskError`` describes; ``index``/``source`` fill in what the error does not know."""
        return cls(index=error.index if error.index is not None else index, reason=str(error),
                   field=error.field, source=error.source or source, task_id=error.task_id)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (one line of ``skipped_rows.jsonl``)."""
        return {"source": self.source, "index": self.index, "field": self.field, "task_id": self.task_id,
                "reason": self.reason}


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

    def load_images(self, max_pixels: int = MAX_DECODED_PIXELS) -> list[np.ndarray]:
        """Decode every image to uint8 HxWx3; a failure raises ``TaskImageError`` naming the task and image."""
        return [self.load_image(i, max_pixels) for i in range(len(self.images))]

    def load_image(self, index: int, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
        """Decode image ``index``, refusing one with more than ``max_pixels`` before decoding it.

        An image whose aspect ratio Qwen-VL processors refuse (above 200) is refused here too: every env
        resizes its images the processor's way, so such an image is as unusable as a corrupt one.
        """
        name = f"task {self.task_id or self.question[:40]!r} image {index}"
        try:
            image = to_rgb_array(self.images[index], name=name, max_pixels=max_pixels)
        except ImageError as exc:  # the message names the image already
            raise self.error(str(exc), field=f"images[{index}]", kind=TaskImageError) from exc
        try:
            seen_size(image.shape[1], image.shape[0])
        except ImageError as exc:
            raise self.error(f"{name}: {exc}", field=f"images[{index}]", kind=TaskImageError) from exc
        return image

    def error(self, message: str, field: Optional[str] = None, kind: type[TaskError] = TaskError) -> TaskError:
        """A ``TaskError`` about this task, carrying its row, file and id (from ``extra``) for a bad-row log."""
        return kind(message, field=field, index=self.extra.get("row_index"), source=self.extra.get("source", ""),
                    task_id=self.task_id)


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


ON_BAD_ROW = ("raise", "skip")
MAX_BAD_DRAWS = 100  # sample() gives up after this many bad rows in a row: the file is mostly bad


class IndexedTaskSource:
    """Base class giving ``sample``, ``__iter__`` and index checks to any source with ``_get``.

    Subclasses implement ``__len__`` and ``_get(i)`` for ``0 <= i < len(self)``; negative indices
    and range errors are handled here once.

    ``on_bad_row`` says what a row that raises ``TaskError`` does: ``"raise"`` (the default) stops the
    caller; ``"skip"`` makes :meth:`sample` draw again and iteration pass over it, and records it in
    :attr:`bad_rows`, so that one corrupt row cannot end a long run and none is lost silently. Indexing
    (``source[i]``) always raises: the caller asked for that row. Images are decoded later, when a task
    is played; a failure there raises ``TaskImageError``, for the caller to skip and count.
    """

    on_bad_row: str = "raise"

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, index: int) -> Task:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Task:
        return self._get(self._check_index(index))

    def __iter__(self) -> Iterator[Task]:
        for i in range(len(self)):
            task = self._get_or_skip(i)
            if task is not None:
                yield task

    def sample(self, rng: np.random.Generator) -> Task:
        """One task drawn uniformly with ``rng`` (skipping bad rows when ``on_bad_row == "skip"``)."""
        n = len(self)
        if n == 0:
            raise IndexError(f"cannot sample from an empty {type(self).__name__}")
        for _ in range(MAX_BAD_DRAWS):
            task = self._get_or_skip(int(rng.integers(n)))
            if task is not None:
                return task
        raise TaskError(f"{type(self).__name__}: {MAX_BAD_DRAWS} draws in a row were bad rows "
                        f"({len(self.bad_rows)} bad rows of {n} found so far)")

    @property
    def bad_rows(self) -> list[BadRow]:
        """The rows skipped so far, each once, in the order they were found."""
        return list(self._skipped().values())

    def _skipped(self) -> dict[int, BadRow]:
        """Skipped rows by index, made on first use (so subclasses need not call a base ``__init__``)."""
        return self.__dict__.setdefault("_skipped_rows", {})

    def _get_or_skip(self, index: int) -> Optional[Task]:
        """Row ``index`` as a task, or None when it is bad and bad rows are skipped."""
        skipping = self.on_bad_row == "skip"
        if skipping and index in self._skipped():
            return None
        try:
            return self._get(index)
        except TaskError as exc:
            if not skipping:
                raise
            self._skipped()[index] = BadRow.from_error(exc, index=index)
            return None

    def _check_index(self, index: int) -> int:
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"task index must be an integer, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"task index {index} out of range for {n} tasks")
        return i


def check_on_bad_row(value: str) -> str:
    """``value`` when it is a known ``on_bad_row`` policy, else a ValueError listing them."""
    if value not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {value!r}")
    return value


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

    def __init__(self, sources: Sequence[TaskSource], on_bad_row: str = "raise"):
        self.sources = list(sources)
        self.on_bad_row = check_on_bad_row(on_bad_row)
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
