"""visual_toolbox_v2 must reproduce DeepEyes exactly (docs/deepeyes.md, "The v2 env")."""

import json

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image

import deepeyes_envs  # noqa: F401  (registers the envs)
from deepeyes_envs.messages import message_images, render_qwen, render_qwen_observation
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
    assert render_qwen_observation(obs["messages"]).startswith(f"\n<|im_start|>user\n<tool_response>{VISION}")


@pytest.mark.parametrize("angle", [90, -90, 270, 180, 45, 12.5, -30, 0, 360, 725, True, 1e308, float("nan")])
def test_rotate_is_pil_rotate_of_the_original_image(env, image, angle):
    """Image.rotate(angle) as DeepEyes calls it: same size, counter-clockwise, nearest, corners black."""
    reset(env, image)
    env.step(zoom([100, 100, 400, 400]))  # an earlier crop does not change what is rotated
    obs, _, _, _, info = env.step(tool_call("image_rotate_tool", {"angle": angle}))
    assert info["error"] is None
    (rotated,) = message_images(obs["messages"])
    np.testing.assert_array_equal(rotated, np.asarray(Image.fromarray(image).rotate(angle)))


def tool_call(name, arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def error_observation(message):
    return f"\n<|im_start|>user\nError: {message}<|im_end|>\n<|im_start|>assistant\n"


def raised(fn) -> str:
    """The text of the exception ``fn`` raises: expected strings come from Python itself."""
    try:
        fn()
    except Exception as exc:
        return str(exc)
    raise AssertionError("expected an exception")


@pytest.mark.parametrize("inner", [
    "{not json}",
    '\n{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200]}\n',  # a brace short
    " \n ",  # whitespace is not empty: it is parsed, and fails
    "[1, 2",
    '{"name": "image_zoom_in_tool", "arguments": {}} and more',
    "1" * 5000,  # an integer over Python's 4300-digit limit
    "[" * 5000,  # nested past the recursion limit
])
def test_json_that_does_not_parse_reads_as_deepeyes_error(env, image, inner):
    reset(env, image)
    obs, _, terminated, _, info = env.step(f"<think>zoom</think><tool_call>{inner}</tool_call>")
    stripped = inner.strip()
    message = f"Invalid tool call format: {stripped}. Error: {raised(lambda: json.loads(stripped))}"
    assert render_qwen_observation(obs["messages"]) == error_observation(message)
    assert info["error"] == message and not terminated


@pytest.mark.parametrize("text", [
    "<tool_call></tool_call>",
    zoom([0, 0, 100, 100]) + "<tool_call></tool_call>",  # the last block is the one read
    "<answer></answer><tool_call></tool_call>",
])
def test_an_empty_tool_call_is_no_tool_call(env, image, text):
    reset(env, image)
    _, _, terminated, truncated, info = env.step(text)
    assert terminated and not truncated and info["end_reason"] == "no_tool_call" and info["tool_calls"] == []


def test_the_last_tool_call_is_read_even_after_an_empty_one(env, image):
    reset(env, image)
    _, _, terminated, _, info = env.step("<tool_call></tool_call>" + zoom([0, 0, 100, 100]))
    assert not terminated and info["tool_calls"][0]["ok"]


def test_a_whitespace_answer_is_an_answer_and_the_last_answer_counts(env, image):
    reset(env, image)
    _, _, terminated, _, info = env.step("<answer> </answer>" + zoom([0, 0, 100, 100]))
    assert terminated and info["end_reason"] == "answer" and info["tool_calls"] == []
    reset(env, image)
    _, _, terminated, _, info = env.step("<answer>red</answer> then <answer></answer>" + zoom([0, 0, 100, 100]))
    assert not terminated and info["tool_calls"][0]["ok"]  # the last answer is empty: it falls through


ZOOM = "image_zoom_in_tool"
# (the tool call's JSON value, what DeepEyes subscripts, the key): the error is the lookup's own text
LOOKUP_FAILURES = [
    ({"arguments": {}}, {"arguments": {}}, "name"),
    ({"name": ZOOM}, {"name": ZOOM}, "arguments"),
    ({"name": "no_such_tool"}, {"name": "no_such_tool"}, "arguments"),  # read before the name is checked
    ({"name": ZOOM, "arguments": {"bbox": [1, 2, 3, 4]}}, {"bbox": [1, 2, 3, 4]}, "bbox_2d"),
    ({"name": "image_rotate_tool", "arguments": {"degrees": 90}}, {"degrees": 90}, "angle"),
    ([1, 2, 3], [1, 2, 3], "name"),
    ("zoom", "zoom", "name"),
    (7, 7, "name"),
    (None, None, "name"),
    ({"name": ZOOM, "arguments": [1, 2]}, [1, 2], "bbox_2d"),
    ({"name": ZOOM, "arguments": None}, None, "bbox_2d"),
    ({"name": "image_rotate_tool", "arguments": "90"}, "90", "angle"),
]


@pytest.mark.parametrize("payload, container, key", LOOKUP_FAILURES)
def test_a_missing_key_or_wrong_type_reads_as_the_lookups_exception(env, image, payload, container, key):
    reset(env, image)
    obs, _, terminated, _, info = env.step("<tool_call>" + json.dumps(payload) + "</tool_call>")
    expected = raised(lambda: container[key])
    assert render_qwen_observation(obs["messages"]) == error_observation(expected)
    assert info["error"] == expected and not terminated
    if payload == {"name": ZOOM}:
        assert expected == str(KeyError("arguments")) == "'arguments'"


@pytest.mark.parametrize("name", [5, None, [ZOOM], "nope", {"a": 1}])
def test_any_other_name_is_an_unknown_tool(env, image, name):
    reset(env, image)
    obs, *_ = env.step(tool_call(name, [1, 2]))  # the arguments are never read for an unknown name
    assert render_qwen_observation(obs["messages"]) == error_observation(f"Unknown tool name: {name}")


def deepeyes_crop(image, box):
    """docs/deepeyes.md, "The v2 env", step 4, computed with Python and PIL as the original computes it."""
    height, width = image.shape[:2]
    x1, y1, x2, y2 = max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3])
    if not (x1 < x2 and y1 < y2):
        return None
    w, h = x2 - x1, y2 - y1
    if max(w, h) / min(w, h) > 100 or min(w, h) <= 30:
        return None
    return np.asarray(Image.fromarray(image).crop((x1, y1, x2, y2)))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("box", [
    [0, 0, NAN, 100], [NAN, NAN, 200, 200], [0, 0, INF, 100], [-INF, -INF, 100, 100], [INF, 0, 100, 100],
    [0, 0, 100, -INF], [True, 0, 100, 100], [0, 0, True, 100], [10**400, 0, 100, 100], [-10**400, 0, 100, 100],
    [0, 0, 10**400, 100], [10.5, 20.5, 100.5, 200.5], [11.5, 21.5, 101.5, 201.5], [1e308, 0, INF, 100],
    [0, 0, 640, 6], [0, 0, 3500, 40],
])
def test_boxes_deepeyes_computes_with_give_its_crop(env, image, box):
    """NaN, infinities, booleans and huge integers: the original computes with them without failing."""
    reset(env, image)
    obs, _, _, _, info = env.step(tool_call(ZOOM, {"bbox_2d": box}))
    expected = deepeyes_crop(image, box)
    if expected is None:
        assert render_qwen_observation(obs["messages"]) == error_observation("ZOOM IN ARGUMENTS ARE INVALID")
    else:
        assert info["error"] is None
        (crop,) = message_images(obs["messages"])
        np.testing.assert_array_equal(crop, expected)


def test_malformed_optional_arguments_are_ignored_as_deepeyes_never_reads_them(env, image):
    reset(env, image)
    obs, _, _, _, info = env.step(tool_call(ZOOM, {"bbox_2d": [0, 0, 100, 100], "label": 5, "image_index": "x"}))
    assert info["error"] is None
    np.testing.assert_array_equal(message_images(obs["messages"])[0], image[0:100, 0:100])


@pytest.mark.parametrize("arguments, message", [
    ({"bbox_2d": [1, 2, 3]}, "image_zoom_in_tool argument 'bbox_2d' must have exactly 4 items, got 3"),
    ({"bbox_2d": ["0", "0", "100", "100"]}, "image_zoom_in_tool argument 'bbox_2d'[0] must be a number, got string"),
    ({"bbox_2d": "0,0,100,100"}, "image_zoom_in_tool argument 'bbox_2d' must be an array, got string"),
    ({"bbox_2d": {"x1": 0}}, "image_zoom_in_tool argument 'bbox_2d' must be an array, got object"),
])
def test_values_deepeyes_crashes_on_get_our_clear_message(env, image, arguments, message):
    """Where the original's exception text names its own internals, v2 says what is wrong instead
    (docs/env.md lists these differences)."""
    reset(env, image)
    obs, *_ = env.step(tool_call(ZOOM, arguments))
    assert render_qwen_observation(obs["messages"]) == error_observation(message)
    obs, *_ = env.step(tool_call("image_rotate_tool", {"angle": "90"}))
    assert render_qwen_observation(obs["messages"]) == error_observation(
        "image_rotate_tool argument 'angle' must be a number, got string")
    obs, *_ = env.step(tool_call("image_rotate_tool", {"angle": 10**400}))
    assert render_qwen_observation(obs["messages"]) == error_observation(raised(lambda: 10**400 % 360.0))


def test_visual_toolbox_rotates_without_losing_the_corners(image):
    env = gym.make("visual_toolbox")
    env.reset(options={"image": image, "question": "q", "answer": "a"})
    obs, *_ = env.step(tool_call("image_rotate_tool", {"angle": 90}))
    np.testing.assert_array_equal(message_images(obs["messages"])[0], np.rot90(image))
    obs, *_ = env.step(tool_call("image_rotate_tool", {"angle": 45}))
    expected = Image.fromarray(image).rotate(45, expand=True, resample=Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(message_images(obs["messages"])[0], np.asarray(expected))


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
    assert info["episode_summary"]["image_observations"] == 4


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
