"""Hugging Face ``datasets`` held in local files, seen as tasks.

The ``datasets`` package is optional (the ``agent`` extra) and imported only when a dataset is loaded, so
``import deepeyes_envs`` stays light.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from ..images import LazyImage
from . import fields
from .tasks import IndexedTaskSource, PathLike, Task, TaskError, format_multiple_choice

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
        question = fields.text(value("question"), where, cols["question"])
        answer = fields.scalar_text(value("answer"), where, cols["answer"])
        options = fields.options(value("options"), where, cols.get("options", "options"))
        if options and self.append_options and "(A)" not in question:
            question = format_multiple_choice(question, options)
        task_id = str(value("task_id") if value("task_id") is not None else f"{self.data_source or 'hf'}-{index}")
        images: tuple[LazyImage, ...] = ()
        if "image" in cols:
            raw = value("image")
            if raw is None:
                raise TaskError(f"{where}: missing field {cols['image']!r}")
            entries = raw if isinstance(raw, (list, tuple)) else [raw]
            images = fields.images(entries, where, f"{where} ({task_id})", self.image_root)
        env_name = value("env_name")
        return Task(
            question=question,
            answer=answer,
            images=images,
            data_source=value("data_source") or self.data_source,
            env_name=self.env_name if env_name is None else env_name,
            task_id=task_id,
            options=options,
            gt_boxes=fields.boxes(value("gt_boxes"), where, cols.get("gt_boxes", "gt_boxes")),
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
