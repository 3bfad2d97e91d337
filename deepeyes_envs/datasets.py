"""Task files: DeepEyes parquet rows and Hugging Face ``datasets`` -> :class:`~deepeyes_envs.data.tasks.Task`.

Both loaders are lazy: a row becomes a ``Task`` only when a source is indexed, and its images
become :class:`~deepeyes_envs.images.LazyImage` (compressed bytes or a path), so thousands of 4K
images cost their compressed size until an env resets on one. Bad rows raise ``TaskError`` naming
the row and the field; bad pixels raise ``TaskImageError`` (both a ``TaskError`` and an ``ImageError``)
naming the task when the env loads them.

The Hugging Face ``datasets`` package is optional (the ``agent`` extra) and imported only inside
:func:`load_hf_dataset`, so ``import deepeyes_envs`` stays light.

Training must survive bad rows without losing any silently: :func:`validate_deepeyes_row` returns a
Task or a :class:`~deepeyes_envs.data.tasks.BadRow` saying why not, sources can skip bad rows and list them
(``on_bad_row="skip"``), and ``python -m deepeyes_envs.datasets check FILE`` reports every bad row of a
file before a run starts.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .data.tasks import (
    BadRow,
    Box,
    ConcatTaskSource,
    IndexedTaskSource,
    Task,
    TaskError,
    TaskSource,
    check_on_bad_row,
    format_multiple_choice,
)
from .images import MAX_DECODED_PIXELS, LazyImage, encode_png, to_rgb_array
from .messages import IMAGE_PLACEHOLDER
from .prompts import PLAIN_SYSTEM_PROMPT, PLAIN_USER_PROMPT, SYSTEM_PROMPT_V2, USER_PROMPT_V2
from .registry import PLAIN_ENV, registered_envs

PathLike = Union[str, os.PathLike]

# Columns every DeepEyes row must have (``env_name`` may be null: the plain env).
REQUIRED_FIELDS = ("data_source", "prompt", "images", "env_name", "reward_model")

# Instruction suffixes stripped when a question has to be recovered from the user text.
_INSTRUCTION_SUFFIXES = (USER_PROMPT_V2, PLAIN_USER_PROMPT)

DEEPEYES_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("ability", pa.string()),
        ("env_name", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("index", pa.int64()),
                    ("answer", pa.string()),
                    ("question", pa.string()),
                    # Our additions; DeepEyes readers ignore unknown struct fields.
                    ("task_id", pa.string()),
                    ("options", pa.list_(pa.string())),
                    ("gt_boxes", pa.list_(pa.list_(pa.float64()))),
                    ("tools", pa.list_(pa.string())),
                    ("prompt_generated", pa.bool_()),
                ]
            ),
        ),
    ]
)


# --- one DeepEyes row -> Task -------------------------------------------------------------------


def task_from_deepeyes_row(
    row: Mapping[str, Any],
    index: int,
    image_root: Optional[PathLike] = None,
    *,
    source: str = "",
    env_names: Optional[Collection[str]] = None,
) -> Task:
    """Turn one DeepEyes parquet row (docs/deepeyes.md, "Data") into a Task.

    The prompt is kept verbatim (a DeepEyes checkpoint was trained on it); the question comes from
    ``extra_info.question`` or, failing that, from the user text with ``<image>`` and the instruction
    suffix removed; the answer is ``reward_model.ground_truth``. Image paths are resolved against
    ``image_root``. With ``env_names``, an ``env_name`` outside it (an empty one means ``plain``) is
    refused. Any missing or malformed field raises ``TaskError`` naming ``index`` and the field, with
    ``field``, ``index`` and ``source`` set on the error. No image is decoded here.
    """
    try:
        task = _task_from_row(row, index, image_root, source)
        if env_names is not None and (task.env_name or PLAIN_ENV) not in env_names:
            raise TaskError(f"row {index}: env_name {task.env_name!r} is not a registered env; known: "
                            f"{sorted(env_names)}", field="env_name", task_id=task.task_id)
        return task
    except TaskError as exc:
        exc.index = index if exc.index is None else exc.index
        exc.source = exc.source or source
        raise


def _task_from_row(row: Mapping[str, Any], index: int, image_root: Optional[PathLike], source: str) -> Task:
    where = f"row {index}"
    if not isinstance(row, Mapping):
        raise TaskError(f"{where}: expected a mapping, got {type(row).__name__}", field="row")
    for name in REQUIRED_FIELDS:
        if name not in row or (row[name] is None and name != "env_name"):
            raise TaskError(f"{where}: missing field {name!r}", field=name)
    data_source = _text(row["data_source"], where, "data_source")
    env_name = "" if row["env_name"] is None else _text(row["env_name"], where, "env_name")
    prompt = _prompt(row["prompt"], where)
    reward_model = _mapping(row["reward_model"], where, "reward_model")
    if reward_model.get("ground_truth") is None:
        raise TaskError(f"{where}: missing field 'reward_model.ground_truth'", field="reward_model.ground_truth")
    answer = _scalar_text(reward_model["ground_truth"], where, "reward_model.ground_truth")
    extra_info = {} if row.get("extra_info") is None else _mapping(row["extra_info"], where, "extra_info")

    task_id = str(extra_info.get("task_id") or f"{data_source or 'row'}-{extra_info.get('index', index)}")
    images = _images(row["images"], where, f"{where} ({task_id})", image_root)
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in prompt)
    if n_placeholders != len(images):
        raise TaskError(f"{where}: prompt has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                        f"{len(images)} images", field="prompt", task_id=task_id)
    if not images:
        raise TaskError(f"{where}: no images; every env needs at least one", field="images", task_id=task_id)

    question = extra_info.get("question")
    if not isinstance(question, str) or not question.strip():
        question = question_from_prompt(prompt)
    return Task(
        question=question,
        answer=answer,
        images=images,
        data_source=data_source,
        env_name=env_name,
        task_id=task_id,
        options=_options(extra_info.get("options"), where, "extra_info.options"),
        gt_boxes=_boxes(extra_info.get("gt_boxes"), where, "extra_info.gt_boxes"),
        prompt=None if extra_info.get("prompt_generated") else prompt,
        tools=_str_tuple(extra_info.get("tools"), where, "extra_info.tools"),
        extra={
            "ability": row.get("ability") or "",
            "split": extra_info.get("split") or "",
            "reward_style": reward_model.get("style") or "",
            "row_index": index,
            "source": source,
        },
    )


def question_from_prompt(prompt: Sequence[Mapping[str, str]]) -> str:
    """The question inside the last user message: placeholders and instruction suffix removed."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    text = users[-1] if users else ""
    text = text.replace(IMAGE_PLACEHOLDER, "")
    for suffix in _INSTRUCTION_SUFFIXES:
        if suffix in text:
            text = text[: text.rindex(suffix)]
            break
    return text.strip()


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise TaskError(f"{where}: field {name!r} must be a string, got {type(value).__name__}", field=name)
    return value


def _scalar_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, np.integer, np.floating)):
        raise TaskError(f"{where}: field {name!r} must be a string or number, got {type(value).__name__}",
                        field=name)
    return value if isinstance(value, str) else str(value)


def _mapping(value: Any, where: str, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TaskError(f"{where}: field {name!r} must be a mapping, got {type(value).__name__}", field=name)
    return value


def _sequence(value: Any, where: str, name: str) -> list[Any]:
    if isinstance(value, np.ndarray):  # pandas hands list columns over as object arrays
        value = list(value)
    if not isinstance(value, (list, tuple)):
        raise TaskError(f"{where}: field {name!r} must be a list, got {type(value).__name__}", field=name)
    return list(value)


def _prompt(value: Any, where: str) -> tuple[dict[str, str], ...]:
    messages = _sequence(value, where, "prompt")
    if not messages:
        raise TaskError(f"{where}: field 'prompt' is empty", field="prompt")
    out = []
    for i, msg in enumerate(messages):
        if not (isinstance(msg, Mapping) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise TaskError(f"{where}: prompt[{i}] must be {{'role': str, 'content': str}}", field=f"prompt[{i}]")
        out.append({"role": msg["role"], "content": msg["content"]})
    return tuple(out)


def _images(value: Any, where: str, label: str, image_root: Optional[PathLike]) -> tuple[LazyImage, ...]:
    entries = _sequence(value, where, "images")
    images = []
    for j, entry in enumerate(entries):
        data, path = None, None
        if isinstance(entry, Mapping):
            data, path = entry.get("bytes"), entry.get("path")
        elif isinstance(entry, (bytes, bytearray)):
            data = entry
        elif isinstance(entry, (str, os.PathLike)):
            path = entry
        name = f"{label} image {j}"
        if data is not None and not isinstance(data, (bytes, bytearray)):
            raise TaskError(f"{where}: images[{j}].bytes must be bytes, got {type(data).__name__}",
                            field=f"images[{j}]")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TaskError(f"{where}: images[{j}].path must be a string, got {type(path).__name__}",
                            field=f"images[{j}]")
        if data:
            images.append(LazyImage(bytes(data), name=name))
        elif path:
            images.append(LazyImage(resolve_image_path(path, image_root), name=name))
        else:
            raise TaskError(f"{where}: images[{j}] has neither bytes nor a path", field=f"images[{j}]")
    return tuple(images)


def resolve_image_path(path: PathLike, image_root: Optional[PathLike]) -> str:
    """A relative image path is taken relative to ``image_root`` (when given)."""
    path = os.fspath(path)
    if image_root is not None and not os.path.isabs(path):
        return os.path.join(os.fspath(image_root), path)
    return path


def _str_tuple(value: Any, where: str, name: str) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    items = _sequence(value, where, name)
    if not all(isinstance(x, str) for x in items):
        raise TaskError(f"{where}: every item of {name!r} must be a string", field=name)
    return tuple(items)


def _options(value: Any, where: str, name: str) -> Optional[tuple[str, ...]]:
    if isinstance(value, Mapping):  # {"A": "red", "B": "blue"}: letter order
        value = [value[k] for k in sorted(value)]
    opts = _str_tuple(value, where, name)
    return opts or None


def _boxes(value: Any, where: str, name: str) -> tuple[Box, ...]:
    if value is None:
        return ()
    boxes = []
    for i, box in enumerate(_sequence(value, where, name)):
        nums = _sequence(box, where, f"{name}[{i}]")
        ok = len(nums) == 4 and all(isinstance(v, (int, float, np.number)) and math.isfinite(v) for v in nums)
        if not ok or not (nums[0] <= nums[2] and nums[1] <= nums[3]):
            raise TaskError(f"{where}: {name}[{i}] must be 4 finite numbers [x1, y1, x2, y2] with x1<=x2, y1<=y2",
                            field=f"{name}[{i}]")
        boxes.append(tuple(float(v) for v in nums))
    return tuple(boxes)


# --- Task -> DeepEyes row, and writing files ---------------------------------------------------


def deepeyes_prompt(task: Task) -> tuple[dict[str, str], ...]:
    """The prompt DeepEyes would have stored for this task: its own if set, else the v2 (tool) or
    plain style chosen by ``env_name``, one ``<image>`` line per image before the question."""
    if task.prompt is not None:
        return tuple(task.prompt)
    system, suffix = (SYSTEM_PROMPT_V2, USER_PROMPT_V2) if task.env_name else (PLAIN_SYSTEM_PROMPT, PLAIN_USER_PROMPT)
    user = f"{IMAGE_PLACEHOLDER}\n" * len(task.images) + task.question + suffix
    return ({"role": "system", "content": system}, {"role": "user", "content": user})


def task_to_deepeyes_row(task: Task, index: int, split: str = "train", embed_images: bool = True) -> dict[str, Any]:
    """One DeepEyes row for ``task``; images become ``{bytes, path}`` (PNG bytes for pixels).

    A task without its own prompt gets :func:`deepeyes_prompt` and ``extra_info.prompt_generated``,
    so our loaders give it back with ``prompt=None`` and the env keeps using its own prompt style.
    """
    return {
        "data_source": task.data_source,
        "prompt": list(deepeyes_prompt(task)),
        "images": [
            _image_entry(img, embed_images, f"task {task.task_id or index} image {j}")
            for j, img in enumerate(task.images)
        ],
        "ability": str(task.extra.get("ability", "")),
        "env_name": task.env_name or "",
        "reward_model": {"style": str(task.extra.get("reward_style") or "model"), "ground_truth": task.answer},
        "extra_info": {
            "split": split,
            "index": index,
            "answer": task.answer,
            "question": task.question,
            "task_id": task.task_id or None,
            "options": list(task.options) if task.options is not None else None,
            "gt_boxes": [list(map(float, b)) for b in task.gt_boxes] or None,
            "tools": list(task.tools) if task.tools is not None else None,
            "prompt_generated": task.prompt is None,
        },
    }


def _image_entry(image: Any, embed: bool, name: str) -> dict[str, Any]:
    if isinstance(image, LazyImage):
        if isinstance(image.source, (bytes, bytearray)):
            return {"bytes": image.to_bytes(), "path": None}
        if type(image) is LazyImage:  # a file: keep its path beside (or instead of) the bytes
            path = os.fspath(image.source)
            return {"bytes": image.to_bytes() if embed else None, "path": path}
        return {"bytes": image.to_bytes(), "path": None}  # subclasses (synthetic) render on demand
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    if isinstance(image, (str, os.PathLike)):
        return _image_entry(LazyImage(image, name=name), embed, name)
    return {"bytes": encode_png(to_rgb_array(image, name=name)), "path": None}


def write_deepeyes_parquet(
    tasks: Iterable[Task],
    path: PathLike,
    *,
    split: str = "train",
    row_group_size: int = 32,
    embed_images: bool = True,
) -> int:
    """Write tasks as a DeepEyes parquet file and return the number of rows.

    Rows are written ``row_group_size`` at a time, so neither the tasks nor their encoded images
    are all held in memory, and small row groups let :class:`ParquetTaskSource` read one row
    without the rest. The file appears atomically (written beside, then renamed).
    """
    if row_group_size < 1:
        raise ValueError("row_group_size must be at least 1")
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    count = 0
    try:
        with pq.ParquetWriter(tmp, DEEPEYES_SCHEMA, compression="zstd") as writer:
            batch: list[dict[str, Any]] = []
            for task in tasks:
                batch.append(task_to_deepeyes_row(task, count, split=split, embed_images=embed_images))
                count += 1
                if len(batch) == row_group_size:
                    writer.write_table(pa.Table.from_pylist(batch, schema=DEEPEYES_SCHEMA))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=DEEPEYES_SCHEMA))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count


# --- reading parquet lazily --------------------------------------------------------------------


class ParquetTaskSource(IndexedTaskSource):
    """A DeepEyes parquet file read one row group at a time.

    Random access reads the row's row group and keeps recently used ones up to ``cache_bytes``;
    a row group bigger than that (files written by pandas often hold everything in one) is
    streamed page by page up to the row instead, so memory stays bounded either way (with a
    warning: rewrite such files with :func:`write_deepeyes_parquet` for fast random access). Iteration
    streams the whole file in small batches. Pickling drops the open file and cache (for
    ``AsyncVectorEnv`` workers), which reopen on first use.

    Rows name an env: ``env_names`` (default: every env registered when the row is read) are the ones
    accepted. ``on_bad_row="skip"`` passes over rows that cannot become tasks when sampling and
    iterating, and lists them in :attr:`bad_rows` (see :class:`~deepeyes_envs.data.tasks.IndexedTaskSource`).
    """

    def __init__(
        self,
        path: PathLike,
        image_root: Optional[PathLike] = None,
        cache_bytes: int = 64 << 20,
        *,
        on_bad_row: str = "raise",
        env_names: Optional[Collection[str]] = None,
    ):
        self.path = os.fspath(path)
        self.image_root = None if image_root is None else os.fspath(image_root)
        self.cache_bytes = cache_bytes
        self.on_bad_row = check_on_bad_row(on_bad_row)
        self.env_names = None if env_names is None else frozenset(env_names)
        self._file: Optional[pq.ParquetFile] = None
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._warned = False
        pf = self._parquet()
        meta = pf.metadata
        missing = [c for c in REQUIRED_FIELDS if c not in pf.schema_arrow.names]
        if missing:
            raise TaskError(f"{self.path}: not a DeepEyes parquet file, missing column(s) {missing}")
        self._starts = [0]
        for rg in range(meta.num_row_groups):
            self._starts.append(self._starts[-1] + meta.row_group(rg).num_rows)

    def _parquet(self) -> pq.ParquetFile:
        if self._file is None:
            try:
                self._file = pq.ParquetFile(self.path)
            except (OSError, pa.ArrowInvalid) as exc:
                raise TaskError(f"{self.path}: cannot read parquet file ({exc})") from exc
        return self._file

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_cache"] = OrderedDict()
        return state

    def __len__(self) -> int:
        return self._starts[-1]

    def _get(self, index: int) -> Task:
        rg = int(np.searchsorted(self._starts, index, side="right")) - 1
        try:
            row = self._row(rg, index - self._starts[rg])
        except (OSError, pa.ArrowException) as exc:
            raise self._unreadable(index, rg, exc) from exc
        return self._task(row, index)

    def _unreadable(self, index: int, rg: int, exc: Exception) -> TaskError:
        reason = " ".join(str(exc).split())  # pyarrow's messages span lines; a report has one line per row
        return TaskError(f"row {index}: row group {rg} of the file cannot be read ({reason})", field="row",
                         index=index, source=self.path)

    def _task(self, row: dict[str, Any], index: int) -> Task:
        env_names = registered_env_names() if self.env_names is None else self.env_names
        return task_from_deepeyes_row(row, index, self.image_root, source=self.path, env_names=env_names)

    def _row(self, rg: int, offset: int) -> dict[str, Any]:
        table = self._cache.get(rg)
        if table is not None:
            self._cache.move_to_end(rg)
            return table.slice(offset, 1).to_pylist()[0]
        pf = self._parquet()
        if pf.metadata.row_group(rg).total_byte_size > self.cache_bytes:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"{self.path}: row group {rg} is larger than cache_bytes ({self.cache_bytes}); random access "
                    "streams it from the start each time. Rewrite the file with small row groups: "
                    "write_deepeyes_parquet(load_deepeyes_parquet(src), dst)",
                    stacklevel=3,
                )
            for batch in pf.iter_batches(batch_size=16, row_groups=[rg]):
                if offset < batch.num_rows:
                    return batch.slice(offset, 1).to_pylist()[0]
                offset -= batch.num_rows
            raise IndexError(f"{self.path}: row group {rg} ended early")
        table = pf.read_row_group(rg)
        self._cache[rg] = table
        while sum(t.nbytes for t in self._cache.values()) > self.cache_bytes and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return table.slice(offset, 1).to_pylist()[0]

    def rows(self) -> Iterator[tuple[int, dict[str, Any] | TaskError]]:
        """Every ``(index, raw row)`` of the file, streamed in small batches.

        A row group that cannot be read (corrupt pages) gives ``(index, TaskError)`` for each of its rows
        not yet read, and reading goes on with the next row group, so one damaged stretch of a file costs
        its own rows only.
        """
        pf = self._parquet()
        for rg in range(pf.metadata.num_row_groups):
            index = self._starts[rg]
            batches = pf.iter_batches(batch_size=16, row_groups=[rg])
            while True:
                try:
                    batch = next(batches, None)
                except (OSError, pa.ArrowException) as exc:
                    for i in range(index, self._starts[rg + 1]):
                        yield i, self._unreadable(i, rg, exc)
                    break
                if batch is None:
                    break
                for row in batch.to_pylist():
                    yield index, row
                    index += 1

    def __iter__(self) -> Iterator[Task]:
        for index, row in self.rows():
            try:
                if isinstance(row, TaskError):
                    raise row
                yield self._task(row, index)
            except TaskError as exc:
                if self.on_bad_row != "skip":
                    raise
                self._skipped()[index] = BadRow.from_error(exc, index=index, source=self.path)


def registered_env_names() -> frozenset[str]:
    """The env names a row may carry right now: the built-in ones and every registered plugin's."""
    return frozenset(registered_envs())


def load_deepeyes_parquet(
    path: PathLike | Sequence[PathLike],
    image_root: Optional[PathLike] = None,
    *,
    on_bad_row: str = "raise",
    env_names: Optional[Collection[str]] = None,
) -> TaskSource:
    """Open one DeepEyes parquet file (or several, concatenated in order) as a lazy task source.

    ``on_bad_row`` and ``env_names`` as in :class:`ParquetTaskSource`; with several files the
    concatenation skips (and lists) the bad rows of all of them.
    """
    if isinstance(path, (str, os.PathLike)):
        return ParquetTaskSource(path, image_root=image_root, on_bad_row=on_bad_row, env_names=env_names)
    return ConcatTaskSource([ParquetTaskSource(p, image_root=image_root, env_names=env_names) for p in path],
                            on_bad_row=on_bad_row)


# --- finding bad rows ------------------------------------------------------------------------------


def check_task_images(task: Task, max_pixels: int = MAX_DECODED_PIXELS) -> None:
    """Decode each image of ``task``, one at a time, dropping each before the next, as an env would load it.

    Raises ``TaskImageError`` for the first image that is corrupt, truncated, a missing file, larger than
    ``max_pixels`` (refused from its header, before any pixel is decoded) or of a size the processor refuses.
    """
    for i in range(len(task.images)):
        task.load_image(i, max_pixels)


def validate_deepeyes_row(
    row: Mapping[str, Any],
    index: int,
    *,
    image_root: Optional[PathLike] = None,
    source: str = "",
    env_names: Optional[Collection[str]] = None,
    decode_images: bool = True,
    max_image_pixels: int = MAX_DECODED_PIXELS,
) -> Task | BadRow:
    """One DeepEyes row checked as training would use it: the Task, or a :class:`BadRow` saying why not.

    Checks every field, the ``env_name`` (against ``env_names``, default: the registered envs), that
    the prompt's ``<image>`` count matches the images, and (``decode_images``) that every image decodes,
    one at a time, within ``max_image_pixels``.
    """
    try:
        task = task_from_deepeyes_row(row, index, image_root, source=source,
                                      env_names=registered_env_names() if env_names is None else env_names)
        if decode_images:
            check_task_images(task, max_image_pixels)
    except TaskError as exc:
        return BadRow.from_error(exc, index=index, source=source)
    return task


def check_deepeyes_parquet(
    path: PathLike,
    *,
    image_root: Optional[PathLike] = None,
    env_names: Optional[Collection[str]] = None,
    decode_images: bool = True,
    max_image_pixels: int = MAX_DECODED_PIXELS,
) -> Iterator[Task | BadRow]:
    """:func:`validate_deepeyes_row` over a whole file, streamed: one result per row, in file order.

    Only one batch of compressed rows and one decoded image are held at a time, so a 47k-row file of
    4K images is checked in bounded memory. The rows of a row group that cannot be read are bad rows
    (field ``"row"``); a file that cannot be opened, or is not a DeepEyes parquet file, raises TaskError.
    """
    source = ParquetTaskSource(path, image_root=image_root)
    for index, row in source.rows():
        if isinstance(row, TaskError):
            yield BadRow.from_error(row)
            continue
        yield validate_deepeyes_row(row, index, image_root=source.image_root, source=source.path,
                                    env_names=env_names, decode_images=decode_images,
                                    max_image_pixels=max_image_pixels)


# --- Hugging Face datasets ---------------------------------------------------------------------

# Task field -> dataset column; None switches a field off. Optional columns absent from the
# dataset are skipped; question, answer and image (unless None) must exist.
DEFAULT_COLUMNS: dict[str, Optional[str]] = {
    "question": "question",
    "answer": "answer",
    "image": "image",
    "options": "options",
    "gt_boxes": "gt_boxes",
    "data_source": "data_source",
    "env_name": "env_name",
    "task_id": "id",
}
_REQUIRED_COLUMNS = ("question", "answer", "image")


class HFTaskSource(IndexedTaskSource):
    """A Hugging Face dataset seen as tasks, one row converted per access.

    Image columns are cast to ``Image(decode=False)`` so rows carry ``{bytes, path}`` and nothing
    is decoded until the env loads the task; the arrow data itself is memory-mapped by ``datasets``.
    """

    def __init__(
        self,
        dataset: Any,
        columns: Mapping[str, Optional[str]],
        *,
        data_source: str = "",
        env_name: str = "visual_toolbox_v2",
        image_root: Optional[PathLike] = None,
        append_options: bool = True,
    ):
        self.columns = dict(columns)
        self.data_source = data_source
        self.env_name = env_name
        self.image_root = None if image_root is None else os.fspath(image_root)
        self.append_options = append_options
        names = set(dataset.column_names)
        for field in _REQUIRED_COLUMNS:
            col = self.columns.get(field)
            if col is not None and col not in names:
                raise TaskError(f"dataset has no column {col!r} for {field!r} (columns: {sorted(names)})")
        self.columns = {f: c for f, c in self.columns.items() if c is not None and c in names}
        image_col = self.columns.get("image")
        if image_col is not None:
            dataset = dataset.cast_column(image_col, _undecoded(dataset.features[image_col]))
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def _get(self, index: int) -> Task:
        row = self.dataset[index]
        where = f"row {index}"
        cols = self.columns

        def value(field: str) -> Any:
            return row.get(cols[field]) if field in cols else None

        for field in ("question", "answer"):
            if value(field) is None:
                raise TaskError(f"{where}: missing field {cols.get(field, field)!r}")
        question = _text(value("question"), where, cols["question"])
        answer = _scalar_text(value("answer"), where, cols["answer"])
        options = _options(value("options"), where, cols.get("options", "options"))
        if options and self.append_options and "(A)" not in question:
            question = format_multiple_choice(question, options)
        task_id = str(value("task_id") if value("task_id") is not None else f"{self.data_source or 'hf'}-{index}")
        images: tuple[LazyImage, ...] = ()
        if "image" in cols:
            raw = value("image")
            if raw is None:
                raise TaskError(f"{where}: missing field {cols['image']!r}")
            entries = raw if isinstance(raw, (list, tuple)) else [raw]
            images = _images(entries, where, f"{where} ({task_id})", self.image_root)
        env_name = value("env_name")
        return Task(
            question=question,
            answer=answer,
            images=images,
            data_source=value("data_source") or self.data_source,
            env_name=self.env_name if env_name is None else env_name,
            task_id=task_id,
            options=options,
            gt_boxes=_boxes(value("gt_boxes"), where, cols.get("gt_boxes", "gt_boxes")),
            extra={"row_index": index},
        )


def _undecoded(feature: Any) -> Any:
    """The same feature with every ``Image`` set to ``decode=False`` (lists of images included)."""
    from datasets import Image

    if isinstance(feature, Image):
        return Image(decode=False)
    if isinstance(feature, dict):
        return {k: _undecoded(v) for k, v in feature.items()}
    if hasattr(feature, "feature"):  # List / Sequence / LargeList
        out = copy.copy(feature)
        out.feature = _undecoded(feature.feature)
        return out
    return feature


def load_hf_dataset(
    data: Any,
    *,
    split: Optional[str] = None,
    columns: Optional[Mapping[str, Optional[str]]] = None,
    data_source: str = "",
    env_name: str = "visual_toolbox_v2",
    image_root: Optional[PathLike] = None,
    append_options: bool = True,
) -> HFTaskSource:
    """Tasks from a Hugging Face dataset held in local files.

    ``data`` is a ``datasets.Dataset`` / ``DatasetDict`` already loaded, or a local path: a
    directory written by ``save_to_disk``, a directory of images (``imagefolder``, with an optional
    ``metadata.jsonl``), or ``.parquet`` / ``.json`` / ``.jsonl`` / ``.csv`` file(s). ``columns``
    maps task fields (keys of ``DEFAULT_COLUMNS``) to column names, overriding the defaults.
    Relative image paths resolve against ``image_root``, else the data file's directory.
    ``split`` picks from a ``DatasetDict`` (default: ``"train"``, or its only split).
    """
    mapping = dict(DEFAULT_COLUMNS)
    for field, col in (columns or {}).items():
        if field not in DEFAULT_COLUMNS:
            raise ValueError(f"unknown task field {field!r} in columns; expected one of {sorted(DEFAULT_COLUMNS)}")
        mapping[field] = col
    if isinstance(data, (str, os.PathLike, list, tuple)):
        data, default_root = _load_local(data)
        if image_root is None:
            image_root = default_root
    dataset = _pick_split(data, split)
    return HFTaskSource(
        dataset,
        mapping,
        data_source=data_source,
        env_name=env_name,
        image_root=image_root,
        append_options=append_options,
    )


_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _load_local(data: PathLike | Sequence[PathLike]) -> tuple[Any, str]:
    """Load local files with ``datasets``; returns the dataset and the directory paths are relative to."""
    import datasets

    paths = [os.fspath(p) for p in data] if isinstance(data, (list, tuple)) else [os.fspath(data)]
    if not paths:
        raise ValueError("no data files given")
    first = paths[0]
    if len(paths) == 1 and os.path.isdir(first):
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if any(os.path.exists(os.path.join(first, m)) for m in markers):
            return datasets.load_from_disk(first), first
        return datasets.load_dataset("imagefolder", data_dir=first), first
    suffixes = {os.path.splitext(p)[1].lower() for p in paths}
    builders = {_BUILDERS.get(s) for s in suffixes}
    if len(builders) != 1 or None in builders:
        if suffixes <= _IMAGE_SUFFIXES:
            return datasets.load_dataset("imagefolder", data_files=paths), os.path.dirname(os.path.abspath(first))
        raise ValueError(f"cannot tell how to load {paths}: use one of {sorted(_BUILDERS)} files or a directory")
    return datasets.load_dataset(builders.pop(), data_files=paths), os.path.dirname(os.path.abspath(first))


def _pick_split(data: Any, split: Optional[str]) -> Any:
    import datasets

    if not isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return data
    names = list(data.keys())
    if split is None:
        split = "train" if "train" in names else (names[0] if len(names) == 1 else None)
        if split is None:
            raise ValueError(f"dataset has splits {names}; pass split=")
    if split not in names:
        raise ValueError(f"dataset has no split {split!r} (splits: {names})")
    return data[split]


# --- command line -------------------------------------------------------------------------------


def _check_command(args: argparse.Namespace) -> int:
    """Report every bad row of every file, then a summary per file; 1 when any row is bad, 2 when a file
    cannot be read at all."""
    status = 0
    for path in args.files:
        n_rows = n_bad = 0
        try:
            for result in check_deepeyes_parquet(path, image_root=args.image_root, decode_images=not args.no_decode,
                                                 max_image_pixels=args.max_image_pixels):
                n_rows += 1
                if isinstance(result, BadRow):
                    n_bad += 1
                    reason = result.reason.removeprefix(f"row {result.index}: ")
                    print(f"{path}: row {result.index} [{result.field or 'row'}]: {reason}")
        except TaskError as exc:
            print(f"{path}: cannot check: {exc}", file=sys.stderr)
            status = 2
            continue
        share = 100.0 * n_bad / n_rows if n_rows else 0.0
        print(f"{path}: {n_rows} rows, {n_bad} bad ({share:.2f}%)")
        if n_bad and status == 0:
            status = 1
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepeyes_envs.datasets",
                                     description="Tools for DeepEyes parquet task files.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="read whole files and report every row training would skip, and why",
                                description="Read every row as training would (fields, env_name, <image> count, "
                                "and each image decoded, one at a time) and print each bad row with its index "
                                "and reason, then a summary. Exit status: 0 clean, 1 bad rows, 2 unreadable file.")
    check.add_argument("files", nargs="+", help="DeepEyes parquet file(s)")
    check.add_argument("--image-root", help="directory that relative image paths are resolved against")
    check.add_argument("--max-image-pixels", type=int, default=MAX_DECODED_PIXELS,
                       help=f"refuse images with more pixels, as the env does (default {MAX_DECODED_PIXELS})")
    check.add_argument("--no-decode", action="store_true", help="check the fields only, decode no image")
    args = parser.parse_args(argv)
    return _check_command(args)


if __name__ == "__main__":
    sys.exit(main())
