"""visual_toolbox: boxes in the seen frame, generated tool prompt, crop of crop, several calls per turn."""

import json

import gymnasium as gym
import numpy as np
import pytest
from test_env_v2 import gradient_image

import deepeyes_envs  # noqa: F401
from deepeyes_envs.images import seen_size
from deepeyes_envs.messages import message_images, render_qwen


def call(name="image_zoom_in_tool", **arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.fixture
def env():
    e = gym.make("visual_toolbox")
    yield e
    e.close()


def test_boxes_are_read_in_the_frame_the_model_saw():
    # A 4000x3000 image is larger than max_pixels, so the model sees a smaller one.
    image = gradient_image(4000, 3000)
    env = gym.make("visual_toolbox", max_pixels=1000 * 28 * 28)
    _, info = env.reset(options={"image": image, "question": "q", "answer": "a"})
    sw, sh = info["seen_size"]
    assert (sw, sh) == seen_size(4000, 3000, max_pixels=1000 * 28 * 28) and sw < 4000
    box_seen = [sw / 4, sh / 4, sw / 2, sh / 2]
    obs, _, _, _, info = env.step(call(bbox_2d=box_seen))
    record = info["tool_calls"][0]
    assert record["bbox_given"] == box_seen
    np.testing.assert_allclose(record["bbox_original"], [1000, 750, 2000, 1500], atol=1e-6)
    (crop,) = message_images(obs["messages"])
    np.testing.assert_array_equal(crop, image[750:1500, 1000:2000])


def test_tool_list_is_generated_from_registered_schemas(env):
    obs, _ = env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    system = render_qwen(obs["messages"])
    assert '"name":"image_zoom_in_tool"' in system and '"name":"image_rotate_tool"' in system
    assert '"required":["bbox_2d"]' in system


def test_crop_of_crop_with_an_explicit_image_index(env):
    image = gradient_image(1200, 900)
    env.reset(options={"image": image, "question": "q", "answer": "a"})
    frame = env.unwrapped.seen_sizes[0]
    scale = 1200 / frame[0]
    env.step(call(bbox_2d=[200 / scale, 100 / scale, 800 / scale, 700 / scale]))
    first = env.unwrapped.images[1]
    seen = env.unwrapped.seen_sizes[1]
    s2 = first.shape[1] / seen[0]
    obs, _, _, _, info = env.step(call(bbox_2d=[100 / s2, 100 / s2, 300 / s2, 300 / s2], image_index=1))
    record = info["tool_calls"][0]
    assert record["ok"], record["error"]
    left, top = record["crop_pixels"][:2]
    (crop,) = message_images(obs["messages"])
    np.testing.assert_array_equal(crop, first[top:record["crop_pixels"][3], left:record["crop_pixels"][2]])
    # the box of the second crop, placed in the original image: offset by the first crop's corner
    assert record["bbox_original"][0] == pytest.approx(200 + record["bbox_image"][0])


def test_several_calls_in_one_turn_all_run(env):
    env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    obs, _, _, _, info = env.step(call(bbox_2d=[0, 0, 200, 200]) + call(bbox_2d=[100, 100, 300, 300]))
    assert [c["ok"] for c in info["tool_calls"]] == [True, True]
    assert len(message_images(obs["messages"])) == 2
    assert render_qwen(obs["messages"]).count("<tool_response>") == 2


def test_unknown_image_index_is_a_clear_error(env):
    env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    _, _, terminated, _, info = env.step(call(bbox_2d=[0, 0, 200, 200], image_index=3))
    assert not terminated
    assert "image_index 3 does not exist" in info["error"]


def test_per_task_tool_list_and_override_of_max_turns():
    from deepeyes_envs.data.tasks import Task

    env = gym.make("visual_toolbox", max_turns=2)
    task = Task(question="q", answer="a", images=(gradient_image(),), tools=("image_rotate_tool",))
    obs, _ = env.reset(options={"task": task})
    assert "image_zoom_in_tool" not in render_qwen(obs["messages"])
    _, _, _, _, info = env.step(call(bbox_2d=[0, 0, 200, 200]))
    assert info["error"] == "Unknown tool name: image_zoom_in_tool"
    _, _, _, truncated, info = env.step(call("image_rotate_tool", angle=90))
    assert truncated and info["end_reason"] == "max_turns"


def test_plain_env_is_one_turn_without_tools():
    env = gym.make("plain")
    obs, info = env.reset(options={"image": gradient_image(), "question": "2+2?", "answer": "4"})
    assert info["tools"] == ()
    assert "<tools>" not in render_qwen(obs["messages"])
    _, reward, terminated, _, info = env.step("<think>easy</think><answer>4</answer>")
    assert terminated and info["reward_parts"]["acc"] == 1.0 and reward == pytest.approx(0.8)
