"""DeepEyes parquet rows -> tasks: round trips, verbatim prompts, routing, bad rows, lazy reading."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deepeyes_envs.data.deepeyes_rows import REQUIRED_FIELDS, task_from_deepeyes_row
from deepeyes_envs.data.parquet import ParquetTaskSource, load_deepeyes_parquet, write_deepeyes_parquet
from deepeyes_envs.data.tasks import ConcatTaskSource, Task, TaskError, TaskSource, env_name_of
from deepeyes_envs.images import ImageError, LazyImage, encode_png
from deepeyes_envs.prompts import SYSTEM_PROMPT_V2, USER_PROMPT_V2
from deepeyes_envs.synthetic import SyntheticTaskSource


def _png(h: int = 12, w: int = 16, value: int = 0) -> bytes:
    array = np.zeros((h, w, 3), np.uint8)
    array[..., 0] = value
    array[0, 0] = (1, 2, 3)
    return encode_png(array)


def deepeyes_row(i: int = 0, env_name=None, image=None) -> dict:
    """A row shaped like the DeepEyes training files (docs/deepeyes.md, "Data")."""
    question = f"What is the colour of the mug number {i}?"
    return {
        "data_source": "vstar",
        "prompt": [
            {"role": "system", "content": SYSTEM_PROMPT_V2},
            {"role": "user", "content": "<image>\n" + question + USER_PROMPT_V2},
        ],
        "images": [{"bytes": image if image is not None else _png(value=i % 256), "path": None}],
        "ability": "vqa",
        "env_name": env_name,
        "reward_model": {"style": "model", "ground_truth": f"red {i}"},
        "extra_info": {"split": "train", "index": i, "answer": f"red {i}", "question": question},
    }


def _write_rows(path, rows) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_deepeyes_row_keeps_prompt_verbatim_and_routes_by_env_name(tmp_path):
    rows = [deepeyes_row(0, env_name="visual_toolbox_v2"), deepeyes_row(1, env_name=None), deepeyes_row(2, "")]
    path = tmp_path / "vstar.parquet"
    _write_rows(path, rows)
    src = load_deepeyes_parquet(path)
    assert isinstance(src, TaskSource) and len(src) == 3
    task = src[0]
    assert task.prompt == tuple(rows[0]["prompt"])
    assert task.question == rows[0]["extra_info"]["question"] and task.answer == "red 0"
    assert task.data_source == "vstar" and task.extra["ability"] == "vqa"
    assert [env_name_of(t) for t in src] == ["visual_toolbox_v2", "", ""]
    assert isinstance(task.images[0], LazyImage) and isinstance(task.images[0].source, bytes)
    image = task.load_images()[0]
    assert image.shape == (12, 16, 3) and tuple(image[0, 0]) == (1, 2, 3)


def test_question_is_parsed_from_the_user_text_when_extra_info_lacks_it():
    row = deepeyes_row(3)
    row["extra_info"] = {"split": "train", "index": 3}
    task = task_from_deepeyes_row(row, 3)
    assert task.question == "What is the colour of the mug number 3?"
    row["extra_info"] = None
    assert task_from_deepeyes_row(row, 3).question == task.question


def test_image_paths_resolve_against_the_image_root(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png(value=77))
    row = deepeyes_row(0)
    row["images"] = [{"bytes": None, "path": "imgs/a.png"}]
    task = task_from_deepeyes_row(row, 0, image_root=tmp_path)
    assert task.load_images()[0][5, 5, 0] == 77
    with pytest.raises(ImageError, match="not found"):
        task_from_deepeyes_row(row, 0, image_root=tmp_path / "elsewhere").load_images()


@pytest.mark.parametrize("field", [*REQUIRED_FIELDS, "reward_model.ground_truth"])
def test_a_missing_field_raises_task_error_naming_row_and_field(field):
    row = deepeyes_row(0)
    if field == "reward_model.ground_truth":
        del row["reward_model"]["ground_truth"]
    else:
        del row[field]
    with pytest.raises(TaskError, match=rf"row 41: missing field '{field}'"):
        task_from_deepeyes_row(row, 41)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.update(prompt=[]), "'prompt' is empty"),
        (lambda r: r.update(prompt=[{"role": "user"}]), r"prompt\[0\]"),
        (lambda r: r.update(images=[{"bytes": None, "path": None}]), r"images\[0\] has neither"),
        (lambda r: r.update(images=[]), "1 <image> placeholders but 0 images"),
        (lambda r: r.update(images="x.png"), "'images' must be a list"),
        (lambda r: r["reward_model"].update(ground_truth=["a", "b"]), "ground_truth"),
        (lambda r: r.update(env_name=3), "'env_name' must be a string"),
        (lambda r: r["extra_info"].update(gt_boxes=[[0, 0, 1]]), r"gt_boxes\[0\]"),
        (lambda r: r["extra_info"].update(gt_boxes=[[0, 0, float("nan"), 2]]), r"gt_boxes\[0\]"),
    ],
)
def test_malformed_fields_raise_task_error_naming_the_row(change, message):
    row = copy.deepcopy(deepeyes_row(0))
    change(row)
    with pytest.raises(TaskError, match=message) as info:
        task_from_deepeyes_row(row, 9)
    assert "row 9" in str(info.value)


def test_bad_rows_in_a_file_fail_only_when_read_and_name_their_index(tmp_path):
    rows = [deepeyes_row(i) for i in range(4)]
    rows[2]["reward_model"] = None
    path = tmp_path / "bad.parquet"
    _write_rows(path, rows)
    src = load_deepeyes_parquet(path)
    assert src[3].answer == "red 3"
    with pytest.raises(TaskError, match="row 2: missing field 'reward_model'"):
        src[2]


def test_a_file_without_deepeyes_columns_is_refused_at_open(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), path)
    with pytest.raises(TaskError, match="missing column"):
        load_deepeyes_parquet(path)


def test_corrupt_image_bytes_raise_image_error_naming_the_task_at_load_time(tmp_path):
    path = tmp_path / "corrupt.parquet"
    _write_rows(path, [deepeyes_row(0), deepeyes_row(1, image=b"\x89PNG\r\n\x1a\n not a png at all")])
    task = load_deepeyes_parquet(path)[1]  # reading the row is fine: nothing is decoded yet
    with pytest.raises(ImageError, match=r"row 1 \(vstar-1\) image 0"):
        task.load_images()


def test_round_trip_of_our_own_tasks(tmp_path):
    synthetic = list(SyntheticTaskSource(5, seed=2, width=320, height=200))
    verbatim = Task(
        question="q?",
        answer="yes",
        images=(np.full((40, 30, 3), 9, np.uint8),),
        data_source="chart",
        env_name="",
        task_id="own-prompt",
        prompt=({"role": "user", "content": "<image>\nq? Answer briefly."},),
        tools=("image_zoom_in_tool",),
    )
    tasks = [*synthetic, verbatim]
    path = tmp_path / "mine.parquet"
    assert write_deepeyes_parquet(tasks, path, row_group_size=2) == 6
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    back = load_deepeyes_parquet(path)
    for before, after in zip(tasks, back, strict=True):
        for name in ("question", "answer", "data_source", "env_name", "task_id", "options", "gt_boxes", "tools"):
            assert getattr(after, name) == getattr(before, name), name
        assert np.array_equal(after.load_images()[0], before.load_images()[0])
    assert back[0].prompt is None  # generated prompts come back as "use the env's own style"
    assert back[5].prompt == verbatim.prompt
    stored = pq.read_table(path).to_pylist()
    assert stored[0]["prompt"][0]["content"] == SYSTEM_PROMPT_V2  # still a valid DeepEyes row
    assert stored[0]["prompt"][1]["content"].startswith("<image>\n") and stored[0]["prompt"][1]["content"].endswith(
        USER_PROMPT_V2
    )


def test_huge_row_groups_are_streamed_instead_of_cached(tmp_path):
    path = tmp_path / "one_group.parquet"
    _write_rows(path, [deepeyes_row(i) for i in range(40)])  # pyarrow puts all 40 in one row group
    src = ParquetTaskSource(path, cache_bytes=1)
    with pytest.warns(UserWarning, match="row group 0 is larger than cache_bytes"):
        assert [src[i].answer for i in (39, 0, 17)] == ["red 39", "red 0", "red 17"]
    assert not src._cache
    repacked = tmp_path / "repacked.parquet"
    assert write_deepeyes_parquet(load_deepeyes_parquet(path), repacked, row_group_size=8) == 40
    fast = ParquetTaskSource(repacked, cache_bytes=1 << 20)
    assert fast[39].answer == "red 39" and fast[39].prompt == src[39].prompt and fast._cache


def test_random_access_iteration_pickling_and_concatenation(tmp_path):
    paths = []
    for k in range(2):
        paths.append(tmp_path / f"part{k}.parquet")
        write_deepeyes_parquet([Task(question=f"q{k}{i}", answer=str(i), images=(_png(),)) for i in range(5)], paths[-1])
    src = load_deepeyes_parquet(paths)
    assert isinstance(src, ConcatTaskSource) and len(src) == 10
    assert [t.question for t in src] == [f"q{k}{i}" for k in range(2) for i in range(5)]
    assert src[-1].question == "q14" and src[5].question == "q10"
    single = load_deepeyes_parquet(paths[0])
    assert [t.question for t in single] == [single[i].question for i in range(5)]
    clone = pickle.loads(pickle.dumps(single))
    assert clone[4].question == "q04"
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert [src.sample(rng_a).question for _ in range(4)] == [src.sample(rng_b).question for _ in range(4)]
    with pytest.raises(IndexError):
        single[5]


def test_a_failed_write_leaves_no_file(tmp_path):
    def tasks():
        yield Task(question="q", answer="a", images=(_png(),))
        raise RuntimeError("generator broke")

    path = tmp_path / "partial.parquet"
    with pytest.raises(RuntimeError):
        write_deepeyes_parquet(tasks(), path)
    assert list(tmp_path.iterdir()) == []
