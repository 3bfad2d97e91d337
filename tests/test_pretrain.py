"""The pretrained tiny base: built from perception tasks only, cached by its settings, with a model card; and the
perception tasks themselves: seeded, the families they promise, disjoint from the RL tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepeyes_agent.policy.pretrain import PretrainSettings, pretrained_tiny_base
from deepeyes_envs.images import seen_size
from deepeyes_envs.perception import PERCEPTION_FAMILIES, perception_tasks
from deepeyes_envs.synthetic import SyntheticTaskSource

SEEN = lambda w, h: seen_size(w, h, 3136, 3136)  # noqa: E731 - the zoom run's budget: every image 56x56
SMALL = PretrainSettings(n_eyes=96, n_train=64, n_test=16, eyes_epochs=1, words_steps=3, batch_size=8)


def test_perception_tasks_are_seeded_one_turn_questions_of_every_family():
    tasks = perception_tasks(3, 16, SEEN)
    again = perception_tasks(3, 16, SEEN)
    assert [t.task_id for t in tasks] == [t.task_id for t in again]
    assert all(np.array_equal(a.load_images()[0], b.load_images()[0]) for a, b in zip(tasks, again, strict=True))
    kinds = {t.extra["kind"] for t in tasks}
    assert kinds == {f"perception_{f}" for f in PERCEPTION_FAMILIES}
    assert all(t.env_name == "" and len(t.images) == 1 for t in tasks)  # plain rows: no tool anywhere
    locate = next(t for t in tasks if t.extra["kind"] == "perception_locate")
    box = json.loads(locate.answer)  # a box in the 56x56 frame the model sees
    assert len(box) == 4 and all(0 <= v <= 56 for v in box) and box[0] < box[2] and box[1] < box[3]
    with pytest.raises(ValueError, match="family must be one of"):
        perception_tasks(3, 1, SEEN, ("zoom",))


def test_perception_images_are_disjoint_from_the_rl_tasks():
    rl = [SyntheticTaskSource(n=200, seed=seed, kind="toy_zoom", frame_layout="center", target_size=13)
          for seed in (0, 1_000_003)]  # the zoom run's training and held-out tasks
    rl_images = {t.load_images()[0].tobytes() for source in rl for t in source}
    pretraining = perception_tasks(PretrainSettings().data_seed, 400, SEEN)
    assert not rl_images & {t.load_images()[0].tobytes() for t in pretraining}
    # the marks family is the zoom layout made small enough to read: never the full 224 px view of the RL task
    marks = [t for t in pretraining if t.extra["kind"] == "perception_mark"]
    assert marks and all(t.load_images()[0].shape[0] <= 70 for t in marks)


@pytest.mark.slow
def test_a_second_build_is_a_cache_hit_and_the_card_says_what_it_learned(tmp_path):
    lines: list[str] = []
    first = pretrained_tiny_base(SMALL, cache_dir=tmp_path, progress=lines.append)
    assert first.name == f"tiny-qwen2_5_vl-base-{SMALL.key()}" and (first / "model.safetensors").is_file()
    report = json.loads((first / "pretraining.json").read_text())
    assert report["settings"]["n_train"] == 64 and set(report["answer_accuracy"]) == set(PERCEPTION_FAMILIES)
    card = (first / "README.md").read_text()
    assert "no tool call anywhere" in card and "| mark |" in card and "eyes" in card
    assert any(line.startswith("eyes epoch 1/1") for line in lines)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    assert pretrained_tiny_base(SMALL, cache_dir=tmp_path, progress=lines.append) == first
    assert lines == [f"pretrained tiny base: cache hit {first}"]
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert SMALL.model_copy(update={"seed": 1}).key() != SMALL.key()  # any setting changes the key
    assert not list(tmp_path.glob("tmp-*"))  # built beside, then renamed into place
