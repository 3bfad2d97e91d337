"""A scripted agent that zooms on each ground-truth box, then answers correctly.

It is the demonstrator for supervised warm starts, the player of the demo, and a smoke test of the
whole env loop: with it every episode should end with acc 1, a tool bonus and IoU near 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .images import box_to_seen
from .tasks import Box, Task

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


def scripted_turns(task: Task, reset_info: Mapping[str, Any]) -> list[str]:
    """The turns that solve an episode of ``task``: one zoom per ground-truth box, then the answer.

    ``reset_info`` is what the env's ``reset`` returned for it: boxes are written in the coordinate frame the
    env reads (``coordinate_frame``, ``image_size``, ``seen_size``), so this works for every env flavour, and
    the zooms leave the last of ``max_turns`` for the answer.
    """
    width, height = reset_info["image_size"]
    turns = []
    for box in task.gt_boxes[: reset_info["max_turns"] - 1]:
        box = padded_box(box, width, height)
        if reset_info["coordinate_frame"] == "seen":
            box = box_to_seen(box, reset_info["seen_size"], (width, height))
        turns.append(zoom_turn(box))
    turns.append(answer_turn(task.answer))
    return turns
