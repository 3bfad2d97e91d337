"""DeepEyes parquet files: the writer, and the lazy source that reads one row group at a time.

A row becomes a ``Task`` only when the source is indexed, and its images become
:class:`~deepeyes_envs.images.LazyImage` (compressed bytes or a path), so thousands of 4K images cost their
compressed size until an env resets on one.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..registry import registered_env_names
from .deepeyes_rows import REQUIRED_FIELDS, task_from_deepeyes_row, task_to_deepeyes_row
from .tasks import BadRow, ConcatTaskSource, IndexedTaskSource, PathLike, Task, TaskError, TaskSource, check_on_bad_row

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
