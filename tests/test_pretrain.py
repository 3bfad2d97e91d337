"""The pretrained tiny base: built from perception tasks only, cached by its settings, with a model card; and the
perception tasks themselves: seeded, the families they promise, disjoint from the RL tasks."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from deepeyes_agent.policy.pretrain import PretrainSettings, pretrained_tiny_base
from deepeyes_envs.images import seen_size
from deepeyes_envs.perception import (
    MARK_CROP_SIDES,
    MARK_SIDE,
    PERCEPTION_FAMILIES,
    ZOOM_TASKS,
    locate_task,
    perception_task,
    perception_tasks,
)
from deepeyes_envs.synthetic import TOY_COLORS, SyntheticTaskSource, toy_task

SEEN = lambda w, h: seen_size(w, h, 3136, 3136)  # noqa: E731 - the zoom run's budget: every image 56x56
SMALL = PretrainSettings(n_eyes=96, n_train=64, n_test=16, eyes_epochs=1, eyes_locate_epochs=1, words_steps=3,
                         batch_size=8)


def test_perception_tasks_are_seeded_one_turn_questions_of_every_family():
    tasks = perception_tasks(3, 16, SEEN)
    again = perception_tasks(3, 16, SEEN)
    assert [t.task_id for t in tasks] == [t.task_id for t in again]
    assert all(np.array_equal(a.load_images()[0], b.load_images()[0]) for a, b in zip(tasks, again, strict=True))
    kinds = {t.extra["kind"] for t in tasks}
    assert kinds == {f"perception_{f}" for f in PERCEPTION_FAMILIES}
    assert all(t.env_name == "" and len(t.images) == 1 for t in tasks)  # plain rows: no tool anywhere
    locate = next(t for t in tasks if t.extra["kind"] == "perception_locate")
    box = json.loads(locate.answer)["bbox_2d"]  # Qwen2.5-VL's grounding form, in the 56x56 frame the model sees
    assert len(box) == 4 and all(0 <= v <= 56 for v in box) and box[0] < box[2] and box[1] < box[3]
    with pytest.raises(ValueError, match="family must be one of"):
        perception_tasks(3, 1, SEEN, ("zoom",))


def test_perception_images_are_disjoint_from_the_rl_tasks():
    geometry = {"frame_layout": "random", "target_size": 13, "frame_size": 60, "frame_margin": 8}
    rl = [SyntheticTaskSource(n=200, seed=seed, kind="toy_zoom", **geometry)
          for seed in (0, 1_000_003)]  # the zoom run's training and held-out tasks
    rl_images = {t.load_images()[0].tobytes() for source in rl for t in source}
    pretraining = perception_tasks(PretrainSettings().data_seed, 400, SEEN)
    assert not rl_images & {t.load_images()[0].tobytes() for t in pretraining}
    # the marks family is a crop around the frame, as a zoom shows it, or a whole image drawn large enough to read:
    # never the full 224 px view of a task whose marks need the zoom
    marks = [t for t in pretraining if t.extra["kind"] == "perception_mark"]
    assert marks and all(t.load_images()[0].shape[0] <= MARK_CROP_SIDES[1] or t.extra["needs_zoom"] is False
                         for t in marks)


def test_a_mark_question_is_a_crop_of_a_zoom_image_that_holds_the_plus_or_a_readable_whole_image():
    tasks = [perception_task(9, i, "mark", SEEN) for i in range(80)]
    whole = [t for t in tasks if "crop" not in t.extra]
    assert 10 <= len(whole) <= 30  # MARK_READABLE_SHARE of them
    for task in whole:
        x1, y1, x2, y2 = task.extra["target_box"]
        assert task.load_images()[0].shape[:2] == (224, 224) and task.extra["needs_zoom"] is False
        assert x2 - x1 == 3 * MARK_SIDE and not task.gt_boxes  # marks three times the zoom tasks'
    for task in tasks:
        if "crop" not in task.extra:
            continue
        x0, y0, x1, y1 = task.extra["crop"]
        assert x1 - x0 == y1 - y0 and MARK_CROP_SIDES[0] <= x1 - x0 <= MARK_CROP_SIDES[1]  # square: seen at 56x56
        px1, py1, px2, py2 = task.extra["target_box"]
        assert x0 <= px1 and y0 <= py1 and px2 <= x1 and py2 <= y1
        assert task.answer in TOY_COLORS and not task.gt_boxes


def test_locate_questions_place_the_frame_as_asked():
    for layout in ("center", "quadrants", "random"):
        task = locate_task(4, 0, SEEN, layout)
        (x1, y1, x2, y2), = toy_task(4, 0, dataclasses.replace(ZOOM_TASKS, frame_layout=layout)).gt_boxes
        assert task.extra["layout"] == layout and json.loads(task.answer) == {"bbox_2d": task.extra["seen_box"]}
        assert task.extra["frame_center"] == pytest.approx(((x1 + x2) / 448, (y1 + y2) / 448))
    centres = {locate_task(4, i, SEEN, "random").answer for i in range(20)}
    assert len(centres) >= 15  # anywhere: the boxes differ


@pytest.mark.slow
def test_a_second_build_is_a_cache_hit_and_the_card_says_what_it_learned(tmp_path):
    lines: list[str] = []
    first = pretrained_tiny_base(SMALL, cache_dir=tmp_path, progress=lines.append)
    assert first.name == f"tiny-qwen2_5_vl-base-{SMALL.key()}" and (first / "model.safetensors").is_file()
    report = json.loads((first / "pretraining.json").read_text())
    assert report["settings"]["n_train"] == 64 and set(report["answer_accuracy"]) == set(PERCEPTION_FAMILIES)
    card = (first / "README.md").read_text()
    assert "no tool call anywhere" in card and "| mark |" in card and "eyes" in card
    assert set(report["locate"]) == {"centre", "quadrants", "anywhere"} and "| anywhere |" in card
    assert any(line.startswith("eyes epoch 2/2") for line in lines)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert pretrained_tiny_base(SMALL, cache_dir=tmp_path, progress=lines.append) == first
    assert lines == [f"pretrained tiny base: cache hit {first}"]
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert SMALL.model_copy(update={"seed": 1}).key() != SMALL.key()  # any setting changes the key
    assert not list(tmp_path.glob("tmp-*"))  # built beside, then renamed into place


def test_a_zoom_on_the_frame_itself_writes_the_numbers_of_the_locate_answer():
    """The cold start's zoom demonstrations (``sft.zoom_margin: 0``) write the very tokens a base that locates
    answers with: the same box, after the same ``"bbox_2d": [``."""
    import gymnasium as gym

    import deepeyes_envs  # noqa: F401 - registers the envs
    from deepeyes_envs.scripted import scripted_turns

    env = gym.make("visual_toolbox", disable_env_checker=True, max_pixels=3136, min_pixels=3136)
    for i in range(5):
        task = toy_task(4, i, ZOOM_TASKS)
        _, info = env.reset(options={"task": task})
        zoom = scripted_turns(task, info, thoughts=False, margin=0.0)[0]
        located = locate_task(4, i, SEEN)
        assert json.loads(located.answer)["bbox_2d"] == json.loads(zoom.split("\n")[1])["arguments"]["bbox_2d"]
        assert located.answer.removeprefix("{") in zoom  # token for token, from "bbox_2d" on
        padded = scripted_turns(task, info, thoughts=False)[0]
        assert padded != zoom  # the default margin grows the box
    env.close()
