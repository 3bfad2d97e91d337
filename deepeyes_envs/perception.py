"""Synthetic perception questions: what a base model should know before it is taught to use tools.

A real vision-language model starts RL with eyes that can read what is large enough and words for what it
sees; the tiny test model starts from random weights. These tasks give it that start (see
``deepeyes_agent.policy.pretrain``): each is one image and a question answered in one short answer, with no
tool call anywhere.

Families (``PERCEPTION_FAMILIES``):

* ``color``: the colour of a square, from half the image down to a few pixels wide;
* ``shape``: the kind of the one shape in the image (circle, square, triangle, diamond or star);
* ``mark``: the colour of the plus sign among x marks, in a crop of a toy zoom image (``ZOOM_TASKS``) around its
  frame, as a zoom on the frame shows it: the crop a little off centre and of a drawn size (``MARK_CROP_*``), as
  the policy's boxes will be, so the marks are big enough to read at the model's pixel budget; a quarter of them
  on a whole image drawn large enough to read as it is;
* ``locate``: where the black frame of a full-size toy zoom image is, placed anywhere, answered as Qwen2.5-VL
  grounds, ``{"bbox_2d": [x1, y1, x2, y2]}`` in pixels of the image the model sees (its ``seen_size``): the
  very tokens of a zoom call's box, so that a policy can carry the skill into its calls. The marks there
  are too small to read, and no question here asks for them: no family is answered only through a zoom.

A locate task's ``extra["frame_center"]`` is the frame's centre as fractions of the image: the eyes' position
objective (``deepeyes_agent.policy.pretrain``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import numpy as np

from .data.tasks import Task
from .synthetic import COLORS, TOY_COLORS, Scene, Shape, SyntheticImage, ToyConfig, place_box, toy_task

PERCEPTION_FAMILIES = ("color", "shape", "mark", "locate")
MARK_SIDE = 13  # px: the marks of the zoom runs' tasks, readable in a zoom on the frame, not in the full view
# The zoom runs' tasks (configs/zoom_cpu.yaml): 224 px images seen at 56 px, a 60 px frame (15 seen px) placed
# anywhere, its 13 px marks 8 px inside the border, so that a zoom on the frame's own box (the box the locate
# answer gives) reads every mark even when it is up to 12 px (3 seen px) off.
ZOOM_TASKS = ToyConfig(kind="zoom", frame_layout="random", target_size=MARK_SIDE, frame_size=60, frame_margin=8)
# px, square: a zoom on the frame's box, a seen pixel or two too small or too large; all are seen at 56 px. Square,
# since a crop with one side under 70.5 px and one over would be seen at 28x56 px (each side rounds to 56 or 84).
MARK_CROP_SIDES = (52, 70)
# px: how far the crop's centre may sit from the frame's (three seen px, the frame's inner slack), so that a box a
# little off still reads and RL's reward grows as a box nears the frame.
MARK_CROP_SHIFT = 12
# Of the mark questions, the share asked of a whole image whose frame and marks are drawn three times larger
# (ToyConfig.readable_share): what a zoom is needless for (the "zoom only when needed" mix).
MARK_READABLE_SHARE = 0.25
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
    if family == "mark":
        return _mark_task(rng, sub_seed, seed, index)
    if family == "locate":
        return _locate_task(sub_seed, seed, index, seen_size, str(rng.choice(["random", "random", "quadrants",
                                                                                "center"])))
    return _shape_task(rng, seed, index)


def perception_tasks(seed: int, n: int, seen_size: SeenSize, families: tuple[str, ...] = PERCEPTION_FAMILIES
                     ) -> list[Task]:
    """``n`` tasks cycling through ``families`` (task i is of family i mod len(families))."""
    return [perception_task(seed, i, families[i % len(families)], seen_size) for i in range(n)]


def locate_task(seed: int, index: int, seen_size: SeenSize, layout: str = "random") -> Task:
    """A locate question about a toy zoom image with its frame placed by ``layout`` (the model card measures each
    placement apart)."""
    return _locate_task(seed, seed, index, seen_size, layout)


def _locate_task(sub_seed: int, seed: int, index: int, seen_size: SeenSize, layout: str) -> Task:
    task = toy_task(sub_seed, index, dataclasses.replace(ZOOM_TASKS, frame_layout=layout))
    (x1, y1, x2, y2), = task.gt_boxes
    side = task.images[0].size[0]  # square toy images
    sw, sh = seen_size(side, side)
    box = [round(x1 * sw / side), round(y1 * sh / side), round(x2 * sw / side), round(y2 * sh / side)]
    question = ('Where is the black frame? Answer with its bounding box as {"bbox_2d": [x1, y1, x2, y2]} in '
                "pixels of the image you see.")
    centre = ((x1 + x2) / 2 / side, (y1 + y2) / 2 / side)
    return dataclasses.replace(_renamed(task, "locate", seed, index), question=question,
                               answer=json.dumps({"bbox_2d": box}),
                               extra={"kind": "perception_locate", "seen_box": box, "layout": layout,
                                      "frame_center": centre})


def _mark_task(rng: np.random.Generator, sub_seed: int, seed: int, index: int) -> Task:
    """The marks question on a crop around the frame of a toy zoom image, the plus inside the crop; or, for
    ``MARK_READABLE_SHARE`` of them, on a whole toy zoom image drawn large enough to read without a zoom."""
    if rng.random() < MARK_READABLE_SHARE:
        task = _renamed(toy_task(sub_seed, index, dataclasses.replace(ZOOM_TASKS, readable_share=1.0)), "mark",
                        seed, index)
        return dataclasses.replace(task, gt_boxes=())
    task = toy_task(sub_seed, index, ZOOM_TASKS)
    scene = task.images[0].scene
    (fx1, fy1, fx2, fy2), = task.gt_boxes
    plus = task.extra["target_box"]
    while True:  # a few draws at most: most crops of this size hold the whole plus
        w = h = int(rng.integers(MARK_CROP_SIDES[0], MARK_CROP_SIDES[1] + 1))
        cx, cy = ((fx1 + fx2) / 2 + rng.uniform(-MARK_CROP_SHIFT, MARK_CROP_SHIFT),
                  (fy1 + fy2) / 2 + rng.uniform(-MARK_CROP_SHIFT, MARK_CROP_SHIFT))
        x0, y0 = max(0, round(cx - w / 2)), max(0, round(cy - h / 2))
        x0, y0 = min(x0, scene.width - w), min(y0, scene.height - h)
        if x0 <= plus[0] and y0 <= plus[1] and plus[2] <= x0 + w and plus[3] <= y0 + h:
            break
    shapes = tuple(dataclasses.replace(s, box=(s.box[0] - x0, s.box[1] - y0, s.box[2] - x0, s.box[3] - y0))
                   for s in scene.shapes)
    crop = dataclasses.replace(scene, width=w, height=h, shapes=shapes)
    renamed = _renamed(task, "mark", seed, index)
    return dataclasses.replace(renamed, images=(SyntheticImage(crop, name=f"task {renamed.task_id!r} image 0"),),
                               gt_boxes=(), extra={**renamed.extra, "crop": (x0, y0, x0 + w, y0 + h)})


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
