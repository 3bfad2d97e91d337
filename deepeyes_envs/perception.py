"""Synthetic perception questions: what a base model should know before it is taught to use tools.

A real vision-language model starts RL with eyes that can read what is large enough and words for what it
sees; the tiny test model starts from random weights. These tasks give it that start (see
``deepeyes_agent.policy.pretrain``): each is one image and a question answered in one short answer, with no
tool call anywhere.

Families (``PERCEPTION_FAMILIES``):

* ``color``: the colour of a square, from half the image down to a few pixels wide;
* ``shape``: the kind of the one shape in the image (circle, square, triangle, diamond or star);
* ``mark``: the colour of the plus sign among x marks in a black frame that fills most of a small image (a
  margin of 9 to 13 px around the 44 px frame), so the marks are big enough to read at the model's pixel
  budget: the toy zoom layout, as large in view as a zoom on the frame makes it;
* ``locate``: where the black frame of a full-size toy zoom image is, as ``[x1, y1, x2, y2]`` in pixels of the
  image the model sees (its ``seen_size``), which is how Qwen2.5-VL grounds. The marks there are too small to
  read, and no question here asks for them: no family is answered only through a zoom.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .synthetic import COLORS, TOY_COLORS, Scene, Shape, SyntheticImage, ToyConfig, place_box, toy_task
from .tasks import Task

PERCEPTION_FAMILIES = ("color", "shape", "mark", "locate")
MARK_SIDE = 13  # px: the marks of configs/zoom_cpu.yaml's tasks, readable in a zoom on the frame, not in the full view
SHAPE_KINDS = ("circle", "square", "triangle", "diamond", "star")
SeenSize = Callable[[int, int], tuple[int, int]]  # (width, height) of an image -> as the model sees it


def perception_task(seed: int, index: int, family: str, seen_size: SeenSize) -> Task:
    """Task ``index`` of ``family`` (fully determined by seed, index and family)."""
    if family not in PERCEPTION_FAMILIES:
        raise ValueError(f"family must be one of {PERCEPTION_FAMILIES}, got {family!r}")
    rng = np.random.default_rng([seed, index, PERCEPTION_FAMILIES.index(family)])
    sub_seed = int(rng.integers(2**31))
    if family == "color":
        size = int(rng.choice([32, 56, 112, 224]))
        config = ToyConfig(kind="color", size=size, difficulty=float(rng.uniform(0.0, 0.8)))
        return _renamed(toy_task(sub_seed, index, config), family, seed, index)
    if family == "mark":  # the frame with a margin of 9..13 px: as large in view as in a zoom on it
        config = ToyConfig(kind="zoom", size=44 + 2 * int(rng.integers(9, 14)), frame_layout="center",
                           target_size=MARK_SIDE)
        return _renamed(toy_task(sub_seed, index, config), family, seed, index)
    if family == "locate":
        layout = str(rng.choice(["random", "quadrants", "center"]))
        task = toy_task(sub_seed, index, ToyConfig(kind="zoom", frame_layout=layout, target_size=MARK_SIDE))
        (x1, y1, x2, y2), = task.gt_boxes
        side = task.images[0].size[0]  # square toy images
        sw, sh = seen_size(side, side)
        box = [round(x1 * sw / side), round(y1 * sh / side), round(x2 * sw / side), round(y2 * sh / side)]
        question = ("Where is the black frame? Answer with its bounding box [x1, y1, x2, y2] in pixels of the "
                    "image you see.")
        return dataclasses.replace(_renamed(task, family, seed, index), question=question, answer=str(box),
                                   extra={"kind": "perception_locate", "seen_box": box})
    return _shape_task(rng, seed, index)


def perception_tasks(seed: int, n: int, seen_size: SeenSize, families: tuple[str, ...] = PERCEPTION_FAMILIES
                     ) -> list[Task]:
    """``n`` tasks cycling through ``families`` (task i is of family i mod len(families))."""
    return [perception_task(seed, i, families[i % len(families)], seen_size) for i in range(n)]


def _shape_task(rng: np.random.Generator, seed: int, index: int) -> Task:
    size = int(rng.choice([56, 112, 224]))
    kind = str(rng.choice(SHAPE_KINDS))
    color = str(rng.choice(TOY_COLORS))
    side = int(rng.integers(size // 3, size - 4))
    shape = Shape(kind, place_box(rng, size, size, side, side, margin=2), COLORS[color])
    scene = Scene(width=size, height=size, background=(128, 128, 128), shapes=(shape,))
    words = ", ".join(SHAPE_KINDS[:-1]) + f" or {SHAPE_KINDS[-1]}"
    task_id = f"perception-shape-{seed}-{index}"
    return Task(question=f"What shape is in the image? Answer with one word: {words}.", answer=kind,
                images=(SyntheticImage(scene, name=f"task {task_id!r} image 0"),), data_source="perception",
                env_name="", task_id=task_id, gt_boxes=(tuple(float(v) for v in shape.box),),
                extra={"kind": "perception_shape", "answer_space": SHAPE_KINDS})


def _renamed(task: Task, family: str, seed: int, index: int) -> Task:
    """A toy task recast as a one-turn perception question (no env of its own, its own id and source)."""
    return dataclasses.replace(task, task_id=f"perception-{family}-{seed}-{index}", data_source="perception",
                               env_name="", extra={**task.extra, "kind": f"perception_{family}"})
