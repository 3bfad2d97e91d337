"""The relative_1000 coordinate frame (Qwen3-VL): boxes in thousandths of the image, mapped back to pixels.

A box on image k is thousandths of image k (the seen image is a resize of the whole image, so its thousandths
are the image's own), crops of crops place themselves in the original, and boxes off the 0..1000 range,
inverted or too small once in pixels are refused with a reason.
"""

import json
from fractions import Fraction

import gymnasium as gym
import numpy as np
import pytest
from test_env_v2 import gradient_image

import deepeyes_envs  # noqa: F401  (registers the envs)
from deepeyes_envs.images import box_from_relative, box_to_relative
from deepeyes_envs.messages import message_images, render_qwen
from deepeyes_envs.scripted import box_in_frame, scripted_turns
from deepeyes_envs.synthetic import SyntheticTaskSource
from deepeyes_envs.tools.zoom import INVALID_ZOOM


def call(**arguments) -> str:
    return "<tool_call>" + json.dumps({"name": "image_zoom_in_tool", "arguments": arguments}) + "</tool_call>"


def make_env(**kwargs) -> gym.Env:
    return gym.make("visual_toolbox", coordinate_frame="relative_1000", disable_env_checker=True, **kwargs)


def reset(env: gym.Env, image: np.ndarray) -> dict:
    return env.reset(options={"image": image, "question": "q", "answer": "a"})[1]


@pytest.mark.parametrize("factor, budget", [(28, (3136, 12845056)), (32, (65536, 16777216)), (32, (4096, 65536))])
def test_a_box_is_thousandths_of_the_image_whatever_the_model_saw(factor, budget):
    image = gradient_image(4000, 3000)
    env = make_env(image_factor=factor, min_pixels=budget[0], max_pixels=budget[1])
    info = reset(env, image)
    assert info["coordinate_frame"] == "relative_1000" and info["seen_size"] != (4000, 3000)
    obs, _, _, _, info = env.step(call(bbox_2d=[250, 250, 500, 500]))
    record = info["tool_calls"][0]
    assert record["ok"], record["error"]
    assert record["bbox_given"] == [250, 250, 500, 500]
    assert record["bbox_image"] == record["bbox_original"] == [1000.0, 750.0, 2000.0, 1500.0]
    (crop,) = message_images(obs["messages"])
    np.testing.assert_array_equal(crop, image[750:1500, 1000:2000])


def test_mapping_is_exact_and_crops_round_as_the_pixel_frames_do():
    for side in (333, 500, 641, 1080, 1920, 4001, 8192):
        for v in range(1001):
            x, _, _, _ = box_from_relative((v, 0, 1000, 1000), (side, side))
            assert x == float(Fraction(v * side, 1000))  # correctly rounded: no float noise before the crop rounds
    env = make_env()
    reset(env, gradient_image(500, 500))
    # 1/1000 of 500 px is half a pixel: edges at 40.5 and 450.5 round to the even pixel (PIL's crop rounding).
    *_, info = env.step(call(bbox_2d=[81, 3, 901, 997]))
    record = info["tool_calls"][0]
    assert record["bbox_image"] == [40.5, 1.5, 450.5, 498.5]
    assert record["crop_pixels"] == [40, 2, 450, 498]


def test_box_to_relative_inverts_box_from_relative():
    box = (123.5, 7.0, 1999.0, 1080.0)
    back = box_from_relative(box_to_relative(box, (1999, 1080)), (1999, 1080))
    np.testing.assert_allclose(back, box, rtol=0, atol=1e-9)


def test_crop_of_crop_is_relative_to_the_image_it_crops():
    image = gradient_image(1200, 900)
    env = make_env()
    reset(env, image)
    *_, info = env.step(call(bbox_2d=[100, 200, 600, 700]))
    assert info["tool_calls"][0]["crop_pixels"] == [120, 180, 720, 630]
    # Thousandths of image 1 (600x450 pixels), not of the original.
    obs, _, _, _, info = env.step(call(bbox_2d=[500, 0, 1000, 1000], image_index=1))
    record = info["tool_calls"][0]
    assert record["ok"], record["error"]
    assert record["image_index"] == 1 and record["bbox_image"] == [300.0, 0.0, 600.0, 450.0]
    assert record["bbox_original"] == [420.0, 180.0, 720.0, 630.0]
    (crop,) = message_images(obs["messages"])
    np.testing.assert_array_equal(crop, image[180:630, 420:720])
    assert env.unwrapped.episode_summary()["zoom_boxes"] == [[120.0, 180.0, 720.0, 630.0], [420.0, 180.0, 720.0, 630.0]]


@pytest.mark.parametrize("box, reason", [
    ([0, 0, 1001, 500], "[0, 0, 1001, 500] has coordinates outside 0..1000; boxes here are thousandths of the "
                        "image's width and height, from 0 to 1000"),
    ([-1, 0, 500, 500], "[-1, 0, 500, 500] has coordinates outside 0..1000"),
    ([120, 340, 1920, 1080], "[120, 340, 1920, 1080] has coordinates outside 0..1000"),  # pixels, not thousandths
    ([600, 100, 200, 500], "[600, 100, 200, 500] is inverted or empty; it needs x1 < x2 and y1 < y2"),
    ([100, 500, 600, 500], "[100, 500, 600, 500] is inverted or empty"),
    # The DeepEyes rules, applied to the box in the image's pixels (a 1000x800 image: 1 thousandth is 1 x 0.8 px).
    ([0, 0, 30, 900], "[0, 0, 30, 900] in thousandths of the 1000x800 image is 30x720 pixels; both sides must "
                      "exceed 30 pixels"),
    ([0, 0, 1000, 12], "[0, 0, 1000, 12] in thousandths of the 1000x800 image is 1000x9.6 pixels, thinner than "
                       "the allowed aspect ratio of 100"),
])
def test_bad_boxes_are_refused_with_the_reason(box, reason):
    env = make_env()
    reset(env, gradient_image(1000, 800))
    obs, reward, terminated, truncated, info = env.step(call(bbox_2d=box))
    record = info["tool_calls"][0]
    assert not record["ok"] and not (terminated or truncated)
    assert record["error"].startswith(f"{INVALID_ZOOM}: {reason}")
    assert "bbox_original" not in record and len(env.unwrapped.images) == 1
    assert f"Error: {INVALID_ZOOM}: {box}" in render_qwen(obs["messages"])
    *_, info = env.step(call(bbox_2d=[100, 100, 600, 600]))  # the episode goes on
    assert info["tool_calls"][0]["ok"]


def test_the_size_rule_counts_pixels_of_the_image_cropped():
    """The same 20-thousandths box is 80x60 pixels of a 4000x3000 image but 20x20 of a 1000x1000 one."""
    env = make_env()
    reset(env, gradient_image(4000, 3000))
    *_, info = env.step(call(bbox_2d=[0, 0, 20, 20]))
    assert info["tool_calls"][0]["ok"] and info["tool_calls"][0]["crop_pixels"] == [0, 0, 80, 60]
    reset(env, gradient_image(1000, 1000))
    *_, info = env.step(call(bbox_2d=[0, 0, 20, 20]))
    assert "20x20 pixels; both sides must exceed 30 pixels" in info["tool_calls"][0]["error"]


def test_deepeyes_reading_refuses_nan_and_says_only_deepeyes_words():
    env = gym.make("visual_toolbox_v2", coordinate_frame="relative_1000", disable_env_checker=True)
    reset(env, gradient_image(1000, 800))
    *_, info = env.step('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [NaN, 0, 500, 500]}}'
                        '</tool_call>')
    assert info["tool_calls"][0]["error"] == INVALID_ZOOM
    *_, info = env.step('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, 1200, 500]}}'
                        '</tool_call>')
    assert info["tool_calls"][0]["error"] == INVALID_ZOOM


def bbox_description(system_prompt: str) -> str:
    """The zoom tool's ``bbox_2d`` description as the prompt's tool list advertises it."""
    listing = system_prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    (zoom,) = [s for s in map(json.loads, listing.splitlines()) if s["function"]["name"] == "image_zoom_in_tool"]
    return zoom["function"]["parameters"]["properties"]["bbox_2d"]["description"]


def test_the_prompt_says_thousandths_only_in_the_relative_frame():
    options = {"image": gradient_image(), "question": "q", "answer": "a"}
    relative = render_qwen(make_env().reset(options=options)[0]["messages"])
    assert "Box coordinates are thousandths of the image's width and height: 0 to 1000" in relative
    assert bbox_description(relative).startswith("Region to crop as [x1, y1, x2, y2] in thousandths of the image's")
    assert "pixel" not in bbox_description(relative).lower() and "Pixel coordinates" not in relative
    seen = render_qwen(gym.make("visual_toolbox").reset(options=options)[0]["messages"])
    assert "Pixel coordinates refer to the image as you see it." in seen and "thousandths" not in seen
    assert bbox_description(seen).endswith("in pixels: top-left, then bottom-right corner.")


def test_an_unknown_frame_is_refused():
    with pytest.raises(ValueError, match=r"coordinate_frame must be one of \('original', 'seen', 'relative_1000'\)"):
        gym.make("visual_toolbox", coordinate_frame="relative")


def test_scripted_boxes_are_whole_thousandths_rounded_outwards():
    info = {"coordinate_frame": "relative_1000", "image_size": (1920, 1080), "seen_size": (1932, 1092)}
    assert box_in_frame((0.0, 0.0, 0.75 * 1920, 0.75 * 1080), info) == (0, 0, 750, 750)
    x1, y1, x2, y2 = box_in_frame((100.0, 50.0, 333.0, 77.0), info)
    assert (x1, y1, x2, y2) == (52, 46, 174, 72)  # 52.08 -> 52, 46.3 -> 46, 173.4 -> 174, 71.3 -> 72
    assert all(isinstance(v, int) for v in (x1, y1, x2, y2))


def test_the_scripted_agent_solves_episodes_in_the_relative_frame():
    source = SyntheticTaskSource(n=6, seed=0)
    env = make_env(task_source=source)
    for i in range(len(source)):
        task = source[i]
        _, info = env.reset(options={"task": task})
        turns = scripted_turns(task, info)
        assert '"bbox_2d": [' in turns[0] and "." not in turns[0].split('"bbox_2d": [')[1].split("]")[0]
        for turn in turns:
            *_, reward, terminated, truncated, step_info = env.step(turn)
            assert all(c["ok"] for c in step_info["tool_calls"]), step_info["tool_calls"]
        assert terminated and step_info["reward_parts"]["acc"] == 1.0 and step_info["reward_parts"]["tool"] == 1.0
        zooms = step_info["episode_summary"]["zoom_boxes"]
        assert len(zooms) == min(len(task.gt_boxes), 4) > 0
        for (zx1, zy1, zx2, zy2), (gx1, gy1, gx2, gy2) in zip(zooms, task.gt_boxes[:4], strict=True):  # outward rounding: each holds its target
            assert zx1 <= gx1 and zy1 <= gy1 and zx2 >= gx2 and zy2 >= gy2
