"""Bad input gets a clear error (to the model as an observation, or to the caller naming the row),
and the env keeps working afterwards."""

import io
import json
import struct
import zlib

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image
from test_env_v2 import gradient_image

import deepeyes_envs  # noqa: F401
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.images import ImageError


def zoom_args(arguments):
    return "<tool_call>" + json.dumps({"name": "image_zoom_in_tool", "arguments": arguments}) + "</tool_call>"


SAME = object()  # visual_toolbox_v2 gives the same message as visual_toolbox
# (turn, what visual_toolbox says, what visual_toolbox_v2 says: DeepEyes' text, see test_env_v2.py)
BAD_TURNS = [
    ("<tool_call>{not json}</tool_call>", "not valid JSON", "Invalid tool call format: {not json}. Error: Expecting"),
    ("<tool_call>[1, 2, 3]</tool_call>", "must be a JSON object", "list indices must be integers"),
    ('<tool_call>"zoom"</tool_call>', "must be a JSON object", "string indices must be integers"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'no "name"', "'name'"),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": [1, 2]}</tool_call>', '"arguments" of image_zoom_in_tool must',
     "list indices must be integers"),
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', "Unknown tool name: nope", SAME),
    (zoom_args({}), "missing the required argument 'bbox_2d'", "'bbox_2d'"),
    (zoom_args({"bbox_2d": [1, 2, 3]}), "exactly 4 items, got 3", SAME),
    (zoom_args({"bbox_2d": [1, 2, 3, 4, 5]}), "exactly 4 items, got 5", SAME),
    (zoom_args({"bbox_2d": ["0", "0", "100", "100"]}), "must be a number, got string", SAME),
    (zoom_args({"bbox_2d": [0, 0, True, 100]}), "must be a number, got boolean", "ZOOM IN ARGUMENTS ARE INVALID"),
    (zoom_args({"bbox_2d": "0,0,100,100"}), "must be an array, got string", SAME),
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, NaN, 100]}}</tool_call>', "must be finite",
     None),  # DeepEyes clamps NaN to the image's edge
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0, 0, Infinity, 100]}}</tool_call>',
     "must be finite", None),
    (zoom_args({"bbox_2d": [-500, -500, -100, -100]}), "ZOOM IN ARGUMENTS ARE INVALID", SAME),
    (zoom_args({"bbox_2d": [900, 900, 1000, 1000]}), "ZOOM IN ARGUMENTS ARE INVALID", SAME),
    (zoom_args({"bbox_2d": [300, 300, 100, 100]}), "ZOOM IN ARGUMENTS ARE INVALID", SAME),
    (zoom_args({"bbox_2d": [1e308, 0, 1e309, 100]}), "must be finite", "ZOOM IN ARGUMENTS ARE INVALID"),
    (zoom_args({"bbox_2d": [0, 0, 10**400, 100]}), "must be finite", None),
    (zoom_args({"bbox_2d": [10, 10, 1e300, 1e300]}), None, SAME),  # huge but finite: clamped, accepted
    ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [0,0,100,100]}', None, SAME),  # unclosed
]


@pytest.mark.parametrize("env_name", ["visual_toolbox_v2", "visual_toolbox"])
@pytest.mark.parametrize("turn, toolbox_expected, v2_expected", BAD_TURNS)
def test_bad_tool_calls_give_clear_errors_and_the_env_keeps_working(env_name, turn, toolbox_expected, v2_expected):
    expected = toolbox_expected if env_name == "visual_toolbox" or v2_expected is SAME else v2_expected
    env = gym.make(env_name)
    env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    obs, _, terminated, truncated, info = env.step(turn)
    if "unclosed" in turn or turn.endswith("}"):
        if env_name == "visual_toolbox":  # strict: the model is told
            assert "unbalanced tags" in info["error"]
        else:  # DeepEyes: no tool call, the episode ends
            assert terminated and info["end_reason"] == "no_tool_call"
        return
    if expected is None:
        assert info["error"] is None and info["tool_calls"][0]["ok"]
        return
    assert expected in info["error"], info["error"]
    assert not terminated and not truncated
    text = "".join(p["text"] for p in obs["messages"][0]["content"] if p["type"] == "text")
    assert "Error: " in text and expected in text
    # the env still works: a good zoom after the bad one
    _, _, _, _, info = env.step(zoom_args({"bbox_2d": [0, 0, 200, 200]}))
    assert info["tool_calls"][0]["ok"]


def test_extra_arguments_rejected_in_strict_mode_and_ignored_in_v2():
    args = {"bbox_2d": [0, 0, 200, 200], "zoom_factor": 2}
    strict = gym.make("visual_toolbox")
    strict.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    _, _, _, _, info = strict.step(zoom_args(args))
    assert "unexpected argument(s) ['zoom_factor']" in info["error"]
    v2 = gym.make("visual_toolbox_v2")
    v2.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    _, _, _, _, info = v2.step(zoom_args(args))
    assert info["tool_calls"][0]["ok"]


def test_nested_tags_are_reported_in_strict_mode():
    env = gym.make("visual_toolbox")
    env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    _, _, terminated, _, info = env.step("<tool_call><tool_call>{}</tool_call></tool_call>")
    assert not terminated and "nested <tool_call>" in info["error"]


def test_non_utf8_and_very_long_turns():
    env = gym.make("visual_toolbox_v2")
    env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    _, _, terminated, _, info = env.step(b"<answer>\xff\xfe red</answer>")
    assert terminated and info["warnings"] and "UTF-8" in info["warnings"][0]
    env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    _, _, terminated, _, info = env.step("<answer>\udcff red</answer>")
    assert terminated and info["warnings"]
    env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    _, _, _, truncated, info = env.step("x" * 300_000)
    assert truncated and info["end_reason"] == "turn_too_long" and "exceeds the limit" in info["error"]


def test_wrong_action_type_is_a_type_error():
    env = gym.make("visual_toolbox_v2")
    env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    with pytest.raises(TypeError, match="an action is a str"):
        env.step(42)


def png_bytes(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "make_image, shape",
    [
        (lambda: png_bytes(np.zeros((1, 1, 3), np.uint8)), (1, 1, 3)),
        (lambda: png_bytes(np.full((40, 50), 128, np.uint8)), (40, 50, 3)),
        (lambda: png_bytes(np.full((40, 50, 4), 200, np.uint8)), (40, 50, 3)),
        (lambda: Image.fromarray(np.full((40, 50), 65535, np.uint16)), (40, 50, 3)),
        (lambda: np.full((40, 50), 7, np.uint16), (40, 50, 3)),
    ],
)
def test_odd_images_become_uint8_rgb(make_image, shape):
    env = gym.make("visual_toolbox_v2")
    obs, _ = env.reset(options={"task": Task(question="q", answer="a", images=(make_image(),))})
    image = obs["messages"][1]["content"][0]["image"]
    assert image.shape == shape and image.dtype == np.uint8


def test_sixteen_bit_white_stays_white():
    env = gym.make("visual_toolbox_v2")
    obs, _ = env.reset(options={"task": Task(question="q", answer="a",
                                             images=(Image.fromarray(np.full((40, 50), 65535, np.uint16)),))})
    assert obs["messages"][1]["content"][0]["image"].min() == 255


def test_one_pixel_image_cannot_be_zoomed_but_works():
    env = gym.make("visual_toolbox_v2")
    env.reset(options={"task": Task(question="q", answer="a", images=(np.zeros((1, 1, 3), np.uint8),))})
    _, _, terminated, _, info = env.step(zoom_args({"bbox_2d": [0, 0, 1, 1]}))
    assert info["error"] == "ZOOM IN ARGUMENTS ARE INVALID" and not terminated


def test_corrupt_image_names_the_task_and_env_keeps_working():
    env = gym.make("visual_toolbox_v2")
    broken = Task(question="q", answer="a", images=(b"\x89PNG\r\n\x1a\n garbage",), task_id="row-17")
    with pytest.raises(ImageError, match="row-17"):
        env.reset(options={"task": broken})
    truncated = Task(question="q", answer="a", images=(png_bytes(gradient_image())[:200],), task_id="row-18")
    with pytest.raises(ImageError, match="row-18"):
        env.reset(options={"task": truncated})
    obs, _ = env.reset(options={"image": gradient_image(), "question": "q", "answer": "a"})
    assert obs["messages"]


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels, with one empty IDAT chunk: costs nothing to
    build, and would cost width*height*3 bytes to decode."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [(9000, 8000), (30000, 30000)])  # above our limit; above PIL's own
def test_decompression_bomb_is_refused_before_decoding(side):
    env = gym.make("visual_toolbox_v2")
    bomb = Task(question="q", answer="a", images=(png_header_only(*side),), task_id="bomb")
    with pytest.raises(ImageError, match="bomb.*(above the limit|cannot read)"):
        env.reset(options={"task": bomb})


def test_reset_options_need_question_and_answer():
    env = gym.make("visual_toolbox_v2")
    with pytest.raises(ValueError, match="missing \\['answer'\\]"):
        env.reset(options={"image": gradient_image(), "question": "q"})
