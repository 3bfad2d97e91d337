"""Scripted agents: one zooms on each ground-truth box, then answers; one counts dots with code.

The zoom agent is the demonstrator for supervised warm starts, the player of the demo, and a smoke
test of the whole env loop: with it every episode should end with acc 1, a tool bonus and IoU near 1.
The code agent (counting tasks, ``visual_code``) writes a program for ``python_tool`` that counts the
dots of the asked colour and shows their mask, then answers with the number the program printed: the
answer comes from the code's output, never from the task's ground truth.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from .env import ToolEnv
from .images import box_to_seen
from .tasks import Box

MIN_CROP_SIDE = 32  # the zoom tool rejects crops whose shorter side is 30 px or less


def padded_box(box: Box, width: int, height: int, margin: float = 0.25) -> Box:
    """``box`` grown by ``margin`` of its size on each side (at least to MIN_CROP_SIDE), kept on the image."""
    x1, y1, x2, y2 = box
    grow_x = max((x2 - x1) * margin, (MIN_CROP_SIDE - (x2 - x1)) / 2)
    grow_y = max((y2 - y1) * margin, (MIN_CROP_SIDE - (y2 - y1)) / 2)
    return (max(0.0, x1 - grow_x), max(0.0, y1 - grow_y),
            min(float(width), x2 + grow_x), min(float(height), y2 + grow_y))


def zoom_turn(box: Box, thought: str = "The target is small; I will zoom in on it.") -> str:
    call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [round(v, 1) for v in box]}}
    return f"<think>{thought}</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>"


def answer_turn(answer: str, thought: str = "The zoomed view shows it clearly.") -> str:
    return f"<think>{thought}</think>\n<answer>{answer}</answer>"


def scripted_turns(env: ToolEnv) -> list[str]:
    """The turns that solve the env's current episode: one zoom per ground-truth box, then the answer.

    Boxes are written in the coordinate frame the env reads, so this works for every env flavour.
    """
    task = env.task
    height, width = env.images[0].shape[:2]
    turns = []
    for box in task.gt_boxes[: env.max_turns - 1]:
        box = padded_box(box, width, height)
        if env.coordinate_frame == "seen":
            box = box_to_seen(box, env.seen_sizes[0], (width, height))
        turns.append(zoom_turn(box))
    turns.append(answer_turn(task.answer))
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


def code_turns(env: ToolEnv) -> Iterator[str]:
    """The turns of the code agent on a counting task: the program, then the number it printed.

    A generator: it reads the env's last observation after its first turn has been stepped.
    """
    extra = env.task.extra
    yield count_code_turn(extra["color"], extra["rgb"])
    printed = " ".join(p["text"] for p in env.messages[-1]["content"] if p["type"] == "text")
    found = COUNT_PRINTED.search(printed)
    yield answer_turn(found.group(1) if found else "unknown", "The program counted them.")


def scripted_agent(env: ToolEnv) -> Iterator[str]:
    """The code agent where the task is a counting task and the env offers ``python_tool``, else the zoom agent."""
    tools = env.task.tools if env.task.tools is not None else env.tool_names
    if env.task.extra.get("kind") == "count" and "python_tool" in tools:
        return code_turns(env)
    return iter(scripted_turns(env))
