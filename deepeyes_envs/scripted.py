"""Scripted agents: one zooms on each ground-truth box, then answers; one counts dots with code.

The zoom agent is the demonstrator for supervised warm starts, the player of the demo, and a smoke
test of the whole env loop: with it every episode should end with acc 1, a tool bonus and IoU near 1.
The code agent (counting tasks, ``visual_code``) writes a program for ``python_tool`` that counts the
dots of the asked colour and shows their mask, then answers with the number the program printed: the
answer comes from the code's output, never from the task's ground truth.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Generator, Mapping
from typing import Any

from .data.tasks import Box, Task
from .images import box_to_relative, box_to_seen

MIN_CROP_SIDE = 32  # the zoom tool rejects crops whose shorter side is 30 px or less


def padded_box(box: Box, width: int, height: int, margin: float = 0.25) -> Box:
    """``box`` grown by ``margin`` of its size on each side (at least to MIN_CROP_SIDE), kept on the image."""
    x1, y1, x2, y2 = box
    grow_x = max((x2 - x1) * margin, (MIN_CROP_SIDE - (x2 - x1)) / 2)
    grow_y = max((y2 - y1) * margin, (MIN_CROP_SIDE - (y2 - y1)) / 2)
    return (max(0.0, x1 - grow_x), max(0.0, y1 - grow_y),
            min(float(width), x2 + grow_x), min(float(height), y2 + grow_y))


def box_in_frame(box: Box, reset_info: Mapping[str, Any]) -> Box:
    """``box``, in pixels of the task's first image, written in the frame the env reads (from its reset info).

    ``"original"``: as it is; ``"seen"``: scaled to the image the model saw; ``"relative_1000"``: whole
    thousandths, as a Qwen3-VL model writes them, rounded outwards so the box still holds everything it held
    (and keeps the size the zoom tool requires). Float noise of the division is ignored in that rounding, so
    a box at exactly 75% is 750, not 751.
    """
    frame, size = reset_info["coordinate_frame"], reset_info["image_size"]
    if frame == "seen":
        return box_to_seen(box, reset_info["seen_size"], size)
    if frame == "relative_1000":
        x1, y1, x2, y2 = box_to_relative(box, size)
        return (math.floor(x1 + 1e-9), math.floor(y1 + 1e-9), math.ceil(x2 - 1e-9), math.ceil(y2 - 1e-9))
    return box


ZOOM_THOUGHT = "The target is small; I will zoom in on it."
ANSWER_THOUGHT = "The zoomed view shows it clearly."


def zoom_turn(box: Box, thought: str | None = ZOOM_THOUGHT) -> str:
    """A zoom call on ``box`` in whole numbers (as Qwen-VL models write boxes), after a thought unless ``thought``
    is None. Rounded to the nearest: a padded box keeps its target inside, and the crop keeps its scale (in a
    small seen frame, rounding outwards would add up to a frame pixel a side, several pixels of the original)."""
    call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [round(v) for v in box]}}
    return _thought(thought) + f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def answer_turn(answer: str, thought: str | None = ANSWER_THOUGHT) -> str:
    return _thought(thought) + f"<answer>{answer}</answer>"


def _thought(thought: str | None) -> str:
    return f"<think>{thought}</think>\n" if thought is not None else ""


def scripted_turns(task: Task, reset_info: Mapping[str, Any], *, thoughts: bool = True, margin: float = 0.25
                   ) -> list[str]:
    """The turns that solve an episode of ``task``: one zoom per ground-truth box, then the answer.

    ``reset_info`` is what the env's ``reset`` returned for it: boxes are written in the coordinate frame the
    env reads (``coordinate_frame``, ``image_size``, ``seen_size``), so this works for every env flavour, and
    the zooms leave the last of ``max_turns`` for the answer. ``thoughts=False`` leaves out the ``<think>``
    parts: fewer tokens for a tiny model to learn to write. Each box is grown by ``margin`` (``padded_box``); 0
    zooms on the box itself, the numbers a base that locates already writes for it.
    """
    width, height = reset_info["image_size"]
    zoom, answer = (ZOOM_THOUGHT, ANSWER_THOUGHT) if thoughts else (None, None)
    turns = []
    for box in task.gt_boxes[: reset_info["max_turns"] - 1]:
        turns.append(zoom_turn(box_in_frame(padded_box(box, width, height, margin), reset_info), zoom))
    turns.append(answer_turn(task.answer, answer))
    return turns


COUNT_CODE = """import numpy as np

target = np.array({rgb})
mask = np.abs(arrays[0].astype(int) - target).sum(axis=2) < 60
seen = np.zeros_like(mask)
height, width = mask.shape
count = 0
for y, x in zip(*np.nonzero(mask)):
    if seen[y, x]:
        continue
    count += 1  # a new dot: flood-fill it so that its other pixels are not counted again
    seen[y, x] = True
    stack = [(y, x)]
    while stack:
        cy, cx = stack.pop()
        for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
            if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                stack.append((ny, nx))
print(f"{{count}} {color} dots")
show(mask)
"""
COUNT_PRINTED = re.compile(r"(\d+) \w+ dots")


def count_code_turn(color: str, rgb: tuple[int, int, int]) -> str:
    call = {"name": "python_tool", "arguments": {"code": COUNT_CODE.format(rgb=tuple(rgb), color=color)}}
    return (f"<think>Counting {color} dots by eye is error-prone; I will count their pixels' connected regions "
            f"in code.</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>")


# A scripted agent: a generator of turn texts that is sent each turn's observation (the env's ``obs``).
Agent = Generator[str, Mapping[str, Any], None]


def code_turns(task: Task) -> Agent:
    """The code agent on a counting task: the program, then the number the program printed (read from the
    observation it is sent after its first turn), never the task's ground truth."""
    extra = task.extra
    obs = yield count_code_turn(extra["color"], extra["rgb"])
    printed = " ".join(p["text"] for m in obs["messages"] for p in m["content"] if p["type"] == "text")
    found = COUNT_PRINTED.search(printed)
    yield answer_turn(found.group(1) if found else "unknown", "The program counted them.")


def scripted_agent(task: Task, reset_info: Mapping[str, Any]) -> Agent:
    """The code agent where the task is a counting task and the env offers ``python_tool`` (its reset info
    lists the tools), else the zoom agent. Drive it with ``next(agent)`` then ``agent.send(obs)`` per turn."""
    if task.extra.get("kind") == "count" and "python_tool" in reset_info["tools"]:
        yield from code_turns(task)
    else:
        yield from scripted_turns(task, reset_info)
