"""The tiny Qwen3-VL end to end: its processor, its mRoPE positions, and multi-turn zoom episodes in thousandths.

Qwen3-VL differs from Qwen2.5-VL where a reproduction can silently go wrong: 16-pixel patches (a 32-pixel
image factor, so other token counts and seen sizes), its own normalisation, deepstack visual features and
interleaved mRoPE, and boxes in thousandths of the image. Episodes are played by the transformers engine
with real env crops, and the recorded logprobs must equal a training forward's.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_chat_consistency import error_observation, first_messages, play, synthetic_image, zoom_observation

from deepeyes_agent.policy.__main__ import main as policy_cli
from deepeyes_agent.policy.chat import EpisodeContext, VisionTokenizer, collate
from deepeyes_agent.policy.loading import load_policy, load_processor
from deepeyes_agent.policy.logprobs import token_logprobs
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine
from deepeyes_agent.rollout.loop import env_kwargs_for, run_episodes
from deepeyes_agent.rollout.scripted import ScriptedActions, zoom_script
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.images import seen_size
from deepeyes_envs.messages import render_qwen
from deepeyes_envs.scripted import answer_turn

torch.set_num_threads(2)
TOL = 1e-4


def rope_index(model, ctx: EpisodeContext) -> torch.Tensor:
    """The model's own 3-D positions for the whole context."""
    inputs = ctx.to_model_inputs()
    positions, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              image_grid_thw=inputs["image_grid_thw"])
    return positions


def test_the_tiny_model_is_a_qwen3_vl(qwen3_policy) -> None:
    model, processor = qwen3_policy
    config = model.config
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration" and config.model_type == "qwen3_vl"
    assert (config.vision_config.patch_size, config.vision_config.spatial_merge_size) == (16, 2)
    assert config.vision_config.deepstack_visual_indexes == [0] and len(model.model.visual.deepstack_merger_list) == 1
    assert config.text_config.rope_parameters["mrope_section"] == [6, 5, 5]
    assert sum(config.text_config.rope_parameters["mrope_section"]) == config.text_config.head_dim // 2
    vision = VisionTokenizer(processor)
    assert vision.patch_size * vision.merge_size == 32 and (vision.min_pixels, vision.max_pixels) == (4096, 65536)
    assert 2 * 10**6 > sum(p.numel() for p in model.parameters()) > 10**6


def test_the_image_processor_is_qwen3s(qwen3_policy) -> None:
    """Patch 16 and mean = std = 0.5: white is 1.0 (CLIP's statistics, Qwen2.5-VL's, would give about 1.9)."""
    processor = qwen3_policy.processor
    out = processor.image_processor(images=[Image.new("RGB", (64, 96), "white")], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 4]]
    assert out["pixel_values"].shape == (24, 3 * 2 * 16 * 16)
    torch.testing.assert_close(out["pixel_values"], torch.ones_like(out["pixel_values"]))


@pytest.mark.parametrize("width, height", [(2111, 12), (57, 43), (480, 320), (90, 90), (1000, 40)])
def test_token_counts_follow_the_32_pixel_seen_frame(qwen3_policy, width, height) -> None:
    vision = VisionTokenizer(qwen3_policy.processor)
    image = np.zeros((height, width, 3), np.uint8)
    seen_w, seen_h = seen_size(width, height, vision.min_pixels, vision.max_pixels, factor=32)
    assert vision.image_grid(image) == (1, seen_h // 16, seen_w // 16)
    assert vision.encode(render_qwen(first_messages(image)), [image]).image_grid_thw == [(1, seen_h // 16, seen_w // 16)]


def test_a_released_qwen3_vl_preprocessor_config_loads_with_its_geometry(tiny_qwen3_vl_dir, tmp_path) -> None:
    """The layout Qwen3-VL checkpoints ship (budget only as ``size``, the fast class named): the env follows it."""
    local = tmp_path / "released-layout"
    shutil.copytree(tiny_qwen3_vl_dir, local)
    (local / "preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}))
    vision = VisionTokenizer(load_processor(local))
    assert env_kwargs_for(vision) == {"min_pixels": 65536, "max_pixels": 16777216, "image_factor": 32}
    assert list(vision.image_processor.image_mean) == [0.5, 0.5, 0.5]
    assert vision.image_grid(np.zeros((12, 2111, 3), np.uint8)) == (1, 2, 214)  # seen as 3424x32, as the env says


def test_the_command_line_builds_it(tmp_path, capsys) -> None:
    assert policy_cli(["build-tiny", "--family", "qwen3_vl", str(tmp_path / "q3")]) == 0
    assert "built tiny Qwen3-VL in" in capsys.readouterr().out
    model, processor = load_policy(tmp_path / "q3")
    assert model.config.model_type == "qwen3_vl" and processor.image_processor.patch_size == 16


@pytest.fixture(scope="module")
def played(qwen3_policy):
    """Two episodes played together by the re-encoding engine: crops of different sizes, an error turn."""
    big, tall = synthetic_image(320, 480, seed=0), synthetic_image(400, 260, seed=1)
    observations = [
        [zoom_observation(big[40:200, 60:300]), zoom_observation(big[100:160, 10:470]), zoom_observation(big[0:90, 0:90])],
        [error_observation(), zoom_observation(tall[0:350, 20:120]), zoom_observation(tall[200:260, 0:260])],
    ]
    engine = HFEngine(qwen3_policy.model, qwen3_policy.processor)
    return play(engine, qwen3_policy.processor, observations, SamplingParams(max_tokens=8, seed=7), [big, tall])[0]


@pytest.mark.slow
def test_positions_match_the_models_rope_index(qwen3_policy, played) -> None:
    for ctx in played:
        assert len({tuple(g) for g in ctx.image_grid_thw}) >= 3  # images of different sizes and shapes
        assert torch.equal(ctx.to_model_inputs()["position_ids"], rope_index(qwen3_policy.model, ctx))


@pytest.mark.slow
def test_engine_logprobs_match_the_training_forward(qwen3_policy, played) -> None:
    batch = collate(played)
    with torch.no_grad():
        recomputed = token_logprobs(qwen3_policy.model, batch, 1.0, played[0].vision.vision_token_ids)
    mask = batch["loss_mask"].bool()
    assert mask.sum() == 2 * 4 * 8
    assert (recomputed[mask] - batch["old_logprobs"][mask]).abs().max().item() < TOL
    assert batch["old_logprobs"][mask].std() > 1e-3


@pytest.mark.slow
def test_deepstack_features_reach_the_logits(qwen3_policy, played) -> None:
    """The deepstack layer is live: without its features the image tokens' successors score differently."""
    model = qwen3_policy.model
    inputs = played[0].to_model_inputs()
    with torch.no_grad():
        full = model(**inputs).logits
        merger = model.model.visual.deepstack_merger_list[0]
        saved = [p.detach().clone() for p in merger.linear_fc2.parameters()]
        for p in merger.linear_fc2.parameters():
            p.zero_()
        try:
            without = model(**inputs).logits
        finally:
            for p, value in zip(merger.linear_fc2.parameters(), saved, strict=True):
                p.copy_(value)
    assert (full - without).abs().max() > 1e-3


# ------------------------------------------------------------------ the rollout loop, boxes in thousandths
def zoom_call(box: list[int], image_index: int | None = None) -> str:
    arguments = {"bbox_2d": box, **({"image_index": image_index} if image_index is not None else {})}
    return f'<think>Closer.</think>\n<tool_call>\n{json.dumps({"name": "image_zoom_in_tool", "arguments": arguments})}' \
           "\n</tool_call>"


def crop_of_crop_script(task: Task, reset_info) -> list[str]:
    """zoom_script's first zoom (thousandths from the reset info), then two crops of that crop, then the answer."""
    first = zoom_script(task, reset_info, zooms=((0.0, 0.0, 0.75, 0.75),), answer="unused")[0]
    return [first, zoom_call([250, 400, 1000, 700], image_index=1), zoom_call([100, 0, 600, 1000], image_index=2),
            answer_turn(task.answer)]


@pytest.fixture(scope="module")
def rollout(qwen3_policy):
    tasks = [Task(question="What colour is the mark?", answer="red", images=(synthetic_image(300, 450, seed=s),),
                  task_id=f"t{s}") for s in (2, 3)]
    engine = HFEngine(qwen3_policy.model, qwen3_policy.processor, reuse_kv_cache=True)
    batch = run_episodes(tasks, engine, qwen3_policy.processor, env_id="visual_toolbox",
                         env_kwargs={"coordinate_frame": "relative_1000"}, sampling=SamplingParams(max_tokens=6, stop=()),
                         seed=11, env_wrapper=lambda env: ScriptedActions(env, crop_of_crop_script),
                         max_total_tokens=4096)
    return batch, engine


@pytest.mark.slow
def test_a_multi_turn_zoom_episode_in_thousandths(rollout) -> None:
    batch, engine = rollout
    for traj in batch:
        assert traj.env_kwargs["image_factor"] == 32 and traj.env_kwargs["coordinate_frame"] == "relative_1000"
        assert traj.n_turns == 4 and traj.end_reason == "answer" and traj.reward_parts["tool"] == 1.0
        calls = [c for t in traj.turns for c in t.tool_calls]
        assert [c["ok"] for c in calls] == [True] * 3, [c["error"] for c in calls]
        assert [c["bbox_given"] for c in calls] == [[0, 0, 750, 750], [250, 400, 1000, 700], [100, 0, 600, 1000]]
        # 450x300 original -> a 337.5x225 crop (pixels 0..338 x 0..225) -> thousandths of that crop, and so on.
        assert calls[0]["crop_pixels"] == [0, 0, 338, 225]
        assert calls[1]["bbox_image"] == [84.5, 90.0, 338.0, 157.5] and calls[1]["crop_pixels"] == [84, 90, 338, 158]
        assert calls[2]["bbox_image"] == [25.4, 0.0, 152.4, 68.0]
        assert traj.zoom_boxes == [[0.0, 0.0, 337.5, 225.0], [84.5, 90.0, 338.0, 157.5],
                                   pytest.approx([109.4, 90.0, 236.4, 158.0], abs=1e-9)]
        image = traj.task.load_images()[0]
        assert len(traj.images) == 4 and np.array_equal(traj.images[3], image[90:158, 109:236])
        assert len(set(traj.image_grid_thw)) == 3  # the first crop happens to be seen at the original's size
    assert engine.cached_tokens == 0  # every episode released its keys and values


@pytest.mark.slow
def test_rollout_logprobs_and_positions_equal_the_learners(qwen3_policy, rollout) -> None:
    batch, _ = rollout
    contexts = [t.context for t in batch]
    inputs = collate(contexts)
    with torch.no_grad():
        recomputed = token_logprobs(qwen3_policy.model, inputs, 1.0, contexts[0].vision.vision_token_ids)
    mask = inputs["loss_mask"].bool()
    assert mask.sum() == 2 * 4 * 6
    assert (recomputed[mask] - inputs["old_logprobs"][mask]).abs().max().item() < TOL
    for ctx in contexts:
        assert torch.equal(ctx.position_ids[:, None], rope_index(qwen3_policy.model, ctx))
