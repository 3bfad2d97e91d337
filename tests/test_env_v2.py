"""visual_toolbox_v2 must reproduce DeepEyes exactly (REFERENCE.md section 2)."""

import gymnasium as gym
import numpy as np
import pytest

import deepeyes_envs  # noqa: F401  (registers the envs)
from deepeyes_envs.messages import render_qwen, render_qwen_observation
from deepeyes_envs.prompts import SYSTEM_PROMPT_V2, USER_PROMPT_V2

VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def gradient_image(width=640, height=480):
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs % 256, ys % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)


@pytest.fixture
def env():
    e = gym.make("visual_toolbox_v2")
    yield e
    e.close()


@pytest.fixture
def image():
    return gradient_image()


def reset(env, image, question="What colour is the cup?", answer="red"):
    return env.reset(seed=0, options={"image": image, "question": question, "answer": answer})


def zoom(box):
    return f'<think>look closer</think><tool_call>{{"name": "image_zoom_in_tool", "arguments": {{"bbox_2d": {box}}}}}</tool_call>'


def test_prompt_renders_exactly_as_deepeyes(env, image):
    obs, _ = reset(env, image)
    expected = (
        f"<|im_start|>system\n{SYSTEM_PROMPT_V2}<|im_end|>\n"
        f"<|im_start|>user\n{VISION}\nWhat colour is the cup?{USER_PROMPT_V2}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_qwen(obs["messages"]) == expected


def test_success_observation_is_deepeyes_string(env, image):
    reset(env, image)
    obs, reward, terminated, truncated, info = env.step(zoom([100, 50, 300, 250]) + "<|im_end|>")
    expected = f"\n<|im_start|>user\n<tool_response>{VISION}{USER_PROMPT_V2}</tool_response><|im_end|>\n<|im_start|>assistant\n"
    assert render_qwen_observation(obs["messages"]) == expected
    assert (reward, terminated, truncated) == (0.0, False, False)
    crop = [p["image"] for p in obs["messages"][0]["content"] if p["type"] == "image"]
    assert len(crop) == 1
    np.testing.assert_array_equal(crop[0], image[50:250, 100:300])
    call = info["tool_calls"][0]
    assert call["ok"] and call["bbox_original"] == [100, 50, 300, 250]


@pytest.mark.parametrize(
    "action, message",
    [
        (zoom([0, 0, 20, 20]), "ZOOM IN ARGUMENTS ARE INVALID"),  # 20 px sides are not > 30
        (zoom([700, 10, 900, 200]), "ZOOM IN ARGUMENTS ARE INVALID"),  # off the image
        (zoom([300, 200, 100, 50]), "ZOOM IN ARGUMENTS ARE INVALID"),  # inverted
        ('<tool_call>{"name": "magnifier", "arguments": {}}</tool_call>', "Unknown tool name: magnifier"),
    ],
)
def test_error_observations_are_deepeyes_strings(env, image, action, message):
    reset(env, image)
    obs, reward, terminated, truncated, info = env.step(action)
    assert render_qwen_observation(obs["messages"]) == f"\n<|im_start|>user\nError: {message}<|im_end|>\n<|im_start|>assistant\n"
    assert not terminated and not truncated  # error turns continue
    assert info["error"] == message


def test_boxes_are_clamped_to_the_image(env, image):
    reset(env, image)
    _, _, _, _, info = env.step(zoom([-50, -20, 5000, 100]))
    call = info["tool_calls"][0]
    assert call["crop_pixels"] == [0, 0, 640, 100]


def test_crops_always_come_from_the_original(env, image):
    reset(env, image)
    env.step(zoom([100, 100, 400, 400]))
    obs, *_ = env.step(zoom([0, 0, 100, 100]))
    crop = obs["messages"][0]["content"][1]["image"]
    np.testing.assert_array_equal(crop, image[0:100, 0:100])


def test_rotate_is_available_but_not_advertised(env, image):
    obs, _ = reset(env, image)
    assert "image_rotate_tool" not in render_qwen(obs["messages"])
    obs, _, _, _, info = env.step('<tool_call>{"name": "image_rotate_tool", "arguments": {"angle": 90}}</tool_call>')
    assert info["tool_calls"][0]["ok"]
    rotated = obs["messages"][0]["content"][1]["image"]
    assert rotated.shape == (640, 480, 3)


def test_last_tool_call_of_a_turn_is_used(env, image):
    reset(env, image)
    _, _, _, _, info = env.step(zoom([0, 0, 100, 100]) + zoom([200, 200, 300, 300]))
    assert len(info["tool_calls"]) == 1
    assert info["tool_calls"][0]["crop_pixels"] == [200, 200, 300, 300]


def test_answer_ends_episode_before_any_tool_runs(env, image):
    reset(env, image)
    _, reward, terminated, truncated, info = env.step(zoom([0, 0, 100, 100]) + "<answer>red</answer>")
    assert terminated and not truncated
    assert info["tool_calls"] == [] and info["end_reason"] == "answer"
    assert info["reward_parts"]["acc"] == 1.0


def test_empty_answer_falls_through_to_the_tool_call(env, image):
    reset(env, image)
    _, _, terminated, _, info = env.step("<answer></answer>" + zoom([0, 0, 100, 100]))
    assert not terminated and info["tool_calls"][0]["ok"]


@pytest.mark.parametrize("text, reason", [("I think it is red.", "no_tool_call"), ("", "empty_turn"), ("   ", "empty_turn")])
def test_turn_without_tool_call_ends_episode(env, image, text, reason):
    reset(env, image)
    _, _, terminated, truncated, info = env.step(text)
    assert terminated and not truncated and info["end_reason"] == reason


def test_length_cut_reply_ends_episode_without_running_the_tool(env, image):
    reset(env, image)
    _, _, terminated, truncated, info = env.step({"text": zoom([0, 0, 100, 100]), "finish_reason": "length"})
    assert truncated and not terminated and info["tool_calls"] == [] and info["end_reason"] == "length"


def test_max_turns_is_five_generations(env, image):
    reset(env, image)
    for turn in range(1, 5):
        _, _, terminated, truncated, _ = env.step(zoom([0, 0, 100 + turn, 100]))
        assert not (terminated or truncated)
    _, _, terminated, truncated, info = env.step(zoom([0, 0, 200, 200]))
    assert truncated and not terminated and info["end_reason"] == "max_turns"
    assert info["tool_calls"] == []  # the fifth generation's call is not run
    assert info["episode"]["image_observations"] == 4


def test_reward_parts_follow_the_deepeyes_formula(env, image):
    reset(env, image)
    env.step(zoom([100, 100, 400, 400]))
    _, reward, _, _, info = env.step("<think>it is red</think><answer>red</answer>")
    parts = info["reward_parts"]
    assert parts["acc"] == 1.0 and parts["tool"] == 1.0 and not parts["format_error"]
    assert reward == pytest.approx(0.8 + 1.2)


def test_step_after_the_end_is_an_error(env, image):
    reset(env, image)
    env.step("<answer>blue</answer>")
    with pytest.raises(RuntimeError, match="reset"):
        env.step("<answer>blue</answer>")
