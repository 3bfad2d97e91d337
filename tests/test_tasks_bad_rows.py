"""Bad rows never stop a run silently or by a traceback: each is found, skipped when asked, and reported
with its index and reason (the row validator, skipping sources, typed errors at decode time, the
``python -m deepeyes_envs.data.check`` command)."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import weakref

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_env_bad_input import png_header_only
from test_tasks_parquet import deepeyes_row

import deepeyes_envs  # noqa: F401  (registers the envs)
from deepeyes_envs.data import check
from deepeyes_envs.data.check import check_deepeyes_parquet
from deepeyes_envs.data.deepeyes_rows import validate_deepeyes_row
from deepeyes_envs.data.parquet import load_deepeyes_parquet
from deepeyes_envs.data.tasks import BadRow, Task, TaskError, TaskImageError
from deepeyes_envs.images import ImageError, LazyImage, encode_png


def png(h: int = 40, w: int = 50, value: int = 9) -> bytes:
    return encode_png(np.full((h, w, 3), value, np.uint8))


CORRUPT = b"\x89PNG\r\n\x1a\n this is not a png"
TRUNCATED = png(200, 300, 1)[:300]


def with_image(image: bytes, i: int = 0) -> dict:
    row = deepeyes_row(i, env_name="visual_toolbox_v2")
    row["images"] = [{"bytes": image, "path": None}]
    return row


def mutated(change, i: int = 0) -> dict:
    row = copy.deepcopy(deepeyes_row(i, env_name="visual_toolbox_v2"))
    change(row)
    return row


def two_placeholders(row: dict) -> None:
    row["prompt"][1]["content"] = "<image><image>\n" + row["prompt"][1]["content"]


# (row, the field at fault, words of the reason): one of each kind of bad row the issue lists
BAD_ROWS = [
    (with_image(CORRUPT), "images[0]", "cannot read image"),
    (with_image(TRUNCATED), "images[0]", "cannot decode image"),
    (with_image(png_header_only(9000, 8000)), "images[0]", "above the limit"),  # a bomb past our cap
    (with_image(png_header_only(30000, 30000)), "images[0]", "cannot read image"),  # past PIL's own cap
    (with_image(png(1, 201)), "images[0]", "aspect ratio of a 201x1 image exceeds 200"),
    (mutated(lambda r: r.update(images=[{"bytes": None, "path": "/nowhere/missing.png"}])), "images[0]", "file not found"),
    (mutated(lambda r: r.update(reward_model=None)), "reward_model", "missing field 'reward_model'"),
    (mutated(lambda r: r.pop("data_source")), "data_source", "missing field 'data_source'"),
    (mutated(lambda r: r["reward_model"].pop("ground_truth")), "reward_model.ground_truth", "missing field"),
    (mutated(lambda r: r.update(data_source=5)), "data_source", "must be a string, got int"),
    (mutated(lambda r: r.update(prompt="<image> what?")), "prompt", "must be a list, got str"),
    (mutated(lambda r: r.update(reward_model="red")), "reward_model", "must be a mapping, got str"),
    (mutated(lambda r: r.update(images=[{"bytes": 5, "path": None}])), "images[0]", "bytes must be bytes, got int"),
    (mutated(lambda r: r["extra_info"].update(options=[1, 2])), "extra_info.options", "must be a string"),
    (mutated(lambda r: r.update(env_name="visual_toolbox_v9")), "env_name", "'visual_toolbox_v9' is not a registered env"),
    (mutated(two_placeholders), "prompt", "prompt has 3 <image> placeholders but 1 images"),
    (mutated(lambda r: r.update(images=[])), "prompt", "1 <image> placeholders but 0 images"),
]


@pytest.mark.parametrize("row, field, words", BAD_ROWS)
def test_the_validator_names_the_field_and_the_reason(row, field, words):
    bad = validate_deepeyes_row(row, 17, source="train.parquet")
    assert isinstance(bad, BadRow), bad
    assert (bad.index, bad.field, bad.source) == (17, field, "train.parquet")
    assert words in bad.reason, bad.reason
    assert json.loads(json.dumps(bad.to_json())) == {"source": "train.parquet", "index": 17, "field": field,
                                                     "task_id": bad.task_id, "reason": bad.reason}


def test_a_good_row_validates_to_its_task_and_plain_rows_are_good():
    task = validate_deepeyes_row(deepeyes_row(3, env_name=None), 3)
    assert isinstance(task, Task) and task.answer == "red 3" and task.env_name == ""
    unknown = mutated(lambda r: r.update(env_name="my_plugin_env"))
    assert isinstance(validate_deepeyes_row(unknown, 0, env_names={"my_plugin_env"}), Task)
    undecoded = validate_deepeyes_row(with_image(CORRUPT), 0, decode_images=False)
    assert isinstance(undecoded, Task)  # the fields are fine; only decoding finds the corrupt bytes


def write(path, rows) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)


def write_sixteen_rows(directory):
    """The case from the issue: three corrupt PNGs in 16 rows, plus a row without reward_model."""
    rows = [deepeyes_row(i, env_name="visual_toolbox_v2") for i in range(16)]
    for i in (2, 7, 11):
        rows[i]["images"] = [{"bytes": CORRUPT, "path": None}]
    rows[13]["reward_model"] = None
    path = directory / "train.parquet"
    write(path, rows)
    return path


@pytest.fixture
def sixteen_rows(tmp_path):
    return write_sixteen_rows(tmp_path)


def test_check_reports_every_bad_row(sixteen_rows):
    results = list(check_deepeyes_parquet(sixteen_rows))
    bad = [r for r in results if isinstance(r, BadRow)]
    assert len(results) == 16 and [b.index for b in bad] == [2, 7, 11, 13]
    assert [b.field for b in bad] == ["images[0]", "images[0]", "images[0]", "reward_model"]
    assert all(b.source == str(sixteen_rows) for b in bad)


def test_check_decodes_one_image_at_a_time(tmp_path, monkeypatch):
    rows = [mutated(lambda r: (r.update(images=[{"bytes": png(value=k), "path": None} for k in range(3)]),
                               r["prompt"][1].update(content="<image><image><image>\nq?")), i) for i in range(4)]
    path = tmp_path / "three_per_row.parquet"
    write(path, rows)
    alive: list[weakref.ref] = []
    load = LazyImage.load

    def tracked(self, max_pixels):
        assert all(ref() is None for ref in alive), "an earlier decoded image is still held"
        image = load(self, max_pixels)
        alive.append(weakref.ref(image))
        return image

    monkeypatch.setattr(LazyImage, "load", tracked)
    assert all(isinstance(r, Task) for r in check_deepeyes_parquet(path))
    assert len(alive) == 12


def test_the_check_command_prints_each_bad_row_and_a_summary(sixteen_rows, tmp_path, capsys):
    assert check.main([str(sixteen_rows)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5
    assert out[0].startswith(f"{sixteen_rows}: row 2 [images[0]]: row 2 (vstar-2) image 0: cannot read image")
    assert out[3] == f"{sixteen_rows}: row 13 [reward_model]: missing field 'reward_model'"
    assert out[4] == f"{sixteen_rows}: 16 rows, 4 bad (25.00%)"
    clean = tmp_path / "clean.parquet"
    write(clean, [deepeyes_row(i, env_name="visual_toolbox_v2") for i in range(3)])
    assert check.main([str(clean)]) == 0
    assert capsys.readouterr().out == f"{clean}: 3 rows, 0 bad (0.00%)\n"
    assert check.main(["--no-decode", str(sixteen_rows)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("16 rows, 1 bad (6.25%)")  # fields only
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("not parquet")
    assert check.main([str(not_parquet), str(clean)]) == 2
    captured = capsys.readouterr()
    assert "cannot read parquet file" in captured.err and "3 rows, 0 bad" in captured.out


def test_the_check_command_runs_as_a_module(sixteen_rows):
    out = subprocess.run([sys.executable, "-m", "deepeyes_envs.data.check", str(sixteen_rows)],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert out.stdout.splitlines()[-1] == f"{sixteen_rows}: 16 rows, 4 bad (25.00%)"


def test_a_skipping_source_passes_over_bad_rows_and_lists_them(sixteen_rows):
    src = load_deepeyes_parquet(sixteen_rows, on_bad_row="skip")
    tasks = list(src)
    assert len(tasks) == 15 and "red 13" not in [t.answer for t in tasks]
    rng = np.random.default_rng(0)
    assert all(src.sample(rng).answer != "red 13" for _ in range(60))
    (bad,) = src.bad_rows  # once, however often it was met
    assert (bad.index, bad.field, bad.source) == (13, "reward_model", str(sixteen_rows))
    with pytest.raises(TaskError, match="row 13: missing field 'reward_model'") as info:
        src[13]  # asking for the row itself still raises
    assert BadRow.from_error(info.value) == bad


def test_the_default_source_raises_at_the_bad_row(sixteen_rows):
    src = load_deepeyes_parquet(sixteen_rows)
    with pytest.raises(TaskError, match="row 13"):
        list(src)
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        load_deepeyes_parquet(sixteen_rows, on_bad_row="ignore")


def test_several_files_skip_and_list_the_bad_rows_of_each(tmp_path):
    paths = []
    for k in range(2):
        rows = [deepeyes_row(i, env_name="visual_toolbox_v2") for i in range(5)]
        rows[k + 1]["env_name"] = "gone_env"
        paths.append(tmp_path / f"part{k}.parquet")
        write(paths[-1], rows)
    src = load_deepeyes_parquet(paths, on_bad_row="skip")
    assert len(list(src)) == 8
    assert [(b.source, b.index, b.field) for b in src.bad_rows] == [
        (str(paths[0]), 1, "env_name"), (str(paths[1]), 2, "env_name")]


def test_a_corrupt_row_group_costs_only_its_own_rows(tmp_path):
    path = tmp_path / "damaged.parquet"
    write(path, [deepeyes_row(i, env_name="visual_toolbox_v2") for i in range(16)])  # row groups of 4
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    data = bytearray(path.read_bytes())
    start = column.data_page_offset
    data[start:start + column.total_compressed_size] = bytes(column.total_compressed_size)  # zeroed pages
    path.write_bytes(bytes(data))
    bad = [r for r in check_deepeyes_parquet(path) if isinstance(r, BadRow)]
    assert [(b.index, b.field) for b in bad] == [(i, "row") for i in range(8, 12)]
    assert "row group 2 of the file cannot be read" in bad[0].reason and "\n" not in bad[0].reason
    src = load_deepeyes_parquet(path, on_bad_row="skip")
    assert [t.answer for t in src] == [f"red {i}" for i in range(16) if not 8 <= i < 12]
    with pytest.raises(TaskError, match="row 9: row group 2") as info:
        src[9]
    assert info.value.field == "row" and info.value.index == 9
    assert src[12].answer == "red 12"


def test_an_image_that_fails_at_reset_is_a_typed_error_a_trainer_can_count(sixteen_rows):
    src = load_deepeyes_parquet(sixteen_rows, on_bad_row="skip")
    task = src[7]  # the row reads fine: nothing is decoded before the env needs the pixels
    env = gym.make("visual_toolbox_v2")
    with pytest.raises(TaskError) as info:
        env.reset(options={"task": task})
    error = info.value
    assert isinstance(error, TaskImageError) and isinstance(error, ImageError)
    bad = BadRow.from_error(error)
    assert (bad.index, bad.field, bad.source, bad.task_id) == (7, "images[0]", str(sixteen_rows), "vstar-7")
    clone = pickle.loads(pickle.dumps(error))  # crosses Ray's process boundaries intact
    assert (clone.index, clone.field, clone.source, str(clone)) == (7, "images[0]", str(sixteen_rows), str(error))
    obs, _ = env.reset(options={"task": src[8]})  # the env keeps working
    assert obs["messages"]


def test_the_envs_pixel_cap_applies_to_task_images():
    env = gym.make("visual_toolbox_v2", max_image_pixels=40 * 50)
    env.reset(options={"task": Task(question="q", answer="a", images=(png(40, 50),))})
    with pytest.raises(TaskImageError, match="above the limit of 2000"):
        env.reset(options={"task": Task(question="q", answer="a", images=(png(41, 50),), task_id="big")})
