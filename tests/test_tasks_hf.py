"""Hugging Face ``datasets`` from local parquet / json / save_to_disk / imagefolder files -> tasks."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from deepeyes_envs.data.hf import load_hf_dataset
from deepeyes_envs.data.tasks import TaskError, TaskSource
from deepeyes_envs.images import LazyImage

datasets = pytest.importorskip("datasets")


def _pil(value: int) -> Image.Image:
    array = np.zeros((10, 14, 3), np.uint8)
    array[..., 1] = value
    return Image.fromarray(array)


def _png_file(path, value: int) -> None:
    _pil(value).save(path)


def test_parquet_with_an_image_feature_stays_compressed(tmp_path):
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
            "options": datasets.List(datasets.Value("string")),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "question": ["Colour of the car?", "Colour of the hat?"],
            "answer": ["A", "B"],
            "image": [_pil(10), _pil(200)],
            "options": [["red", "blue"], ["green", "pink"]],
        },
        features=features,
    )
    path = tmp_path / "data.parquet"
    ds.to_parquet(str(path))
    src = load_hf_dataset(path, data_source="mybench")
    assert isinstance(src, TaskSource) and len(src) == 2
    task = src[1]
    assert isinstance(task.images[0], LazyImage) and isinstance(task.images[0].source, bytes)
    assert task.options == ("green", "pink") and "(B) pink" in task.question and task.answer == "B"
    assert task.data_source == "mybench" and task.env_name == "visual_toolbox_v2"
    assert task.load_images()[0][3, 3, 1] == 200
    # An already loaded dataset works the same, and its decoding image column is switched off.
    again = load_hf_dataset(datasets.load_dataset("parquet", data_files=str(path)), split="train")
    assert again[0].load_images()[0][0, 0, 1] == 10


def test_json_with_relative_paths_and_a_column_mapping(tmp_path):
    (tmp_path / "pics").mkdir()
    _png_file(tmp_path / "pics" / "0.png", 33)
    rows = [
        {"q": "Is it green?", "label": "yes", "img": "pics/0.png", "uid": "x-0", "route": ""},
        {"q": None, "label": "no", "img": "pics/0.png", "uid": "x-1", "route": ""},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    columns = {"question": "q", "answer": "label", "image": "img", "task_id": "uid", "env_name": "route"}
    src = load_hf_dataset(path, columns=columns)
    task = src[0]
    assert (task.question, task.answer, task.task_id, task.env_name) == ("Is it green?", "yes", "x-0", "")
    assert task.load_images()[0][0, 0, 1] == 33
    with pytest.raises(TaskError, match="row 1: missing field 'q'"):
        src[1]
    with pytest.raises(TaskError, match="no column 'question'"):
        load_hf_dataset(path)
    with pytest.raises(ValueError, match="unknown task field"):
        load_hf_dataset(path, columns={"colour": "q"})


def test_save_to_disk_directory_with_a_list_of_images(tmp_path):
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.List(datasets.Image()),
            "gt_boxes": datasets.List(datasets.List(datasets.Value("float64"))),
        }
    )
    ds = datasets.Dataset.from_dict(
        {"question": ["Which is brighter?"], "answer": ["second"], "image": [[_pil(1), _pil(2)]],
         "gt_boxes": [[[0, 0, 5, 5]]]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    task = load_hf_dataset(tmp_path / "saved")[0]
    assert len(task.images) == 2 and all(isinstance(i, LazyImage) for i in task.images)
    assert [a[0, 0, 1] for a in task.load_images()] == [1, 2]
    assert task.gt_boxes == ((0.0, 0.0, 5.0, 5.0),)


def test_imagefolder_keeps_paths_and_reads_metadata(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(2):
        buf = io.BytesIO()
        _pil(50 + i).save(buf, format="PNG")
        (folder / f"{i}.png").write_bytes(buf.getvalue())
    meta = [{"file_name": f"{i}.png", "question": f"q{i}", "answer": f"a{i}"} for i in range(2)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    src = load_hf_dataset(folder)
    by_question = {src[i].question: src[i] for i in range(len(src))}
    assert by_question["q1"].answer == "a1"
    assert by_question["q1"].load_images()[0][0, 0, 1] == 51
