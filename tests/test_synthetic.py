"""Synthetic tasks: determinism, shuffled options, ground-truth boxes, toy family, speed."""

from __future__ import annotations

import io
import pickle
import time

import numpy as np
import pytest
from PIL import Image

from deepeyes_envs.data.tasks import TaskSource, option_letter
from deepeyes_envs.images import LazyImage
from deepeyes_envs.synthetic import (
    COLORS,
    TOY_COLORS,
    SyntheticImage,
    SyntheticTaskSource,
    ToyConfig,
    VisualSearchConfig,
    toy_task,
    visual_search_task,
)

SMALL = VisualSearchConfig(width=480, height=320)


def _box_slice(image: np.ndarray, box) -> np.ndarray:
    x1, y1, x2, y2 = (int(v) for v in box)
    return image[y1:y2, x1:x2]


def _colour_fraction(pixels: np.ndarray, rgb) -> float:
    return float(np.all(pixels == np.asarray(rgb, dtype=np.uint8), axis=-1).mean())


def test_same_seed_gives_identical_tasks_and_pixels():
    a, b = SyntheticTaskSource(6, seed=3), SyntheticTaskSource(6, seed=3)
    for i in (0, 5):
        ta, tb = a[i], b[i]
        assert (ta.question, ta.answer, ta.options, ta.gt_boxes) == (tb.question, tb.answer, tb.options, tb.gt_boxes)
        assert np.array_equal(ta.load_images()[0], tb.load_images()[0])
        assert ta.images[0].to_bytes() == tb.images[0].to_bytes()
    other = SyntheticTaskSource(6, seed=4)[0]
    assert not np.array_equal(other.load_images()[0], a[0].load_images()[0])


def test_task_depends_on_index_not_on_access_order():
    src = SyntheticTaskSource(20, seed=1, config=SMALL)
    late_first = src[17]
    _ = [src[i] for i in range(17)]
    assert src[17].question == late_first.question and src[17].gt_boxes == late_first.gt_boxes


def test_images_are_lazy_and_rendered_on_load():
    task = visual_search_task(0, 0)
    image = task.images[0]
    assert isinstance(image, LazyImage) and isinstance(image, SyntheticImage)
    assert image.size == (1920, 1080)
    assert len(pickle.dumps(task)) < 20_000  # the layout, not 6 MB of pixels
    array = task.load_images()[0]
    assert array.shape == (1080, 1920, 3) and array.dtype == np.uint8
    decoded = np.asarray(Image.open(io.BytesIO(image.to_bytes())).convert("RGB"))
    assert np.array_equal(decoded, array)


def test_options_are_shuffled_and_answer_letter_points_at_answer_text():
    letters = []
    for i in range(40):
        task = visual_search_task(11, i, SMALL)
        idx = ord(task.answer) - ord("A")
        assert task.options[idx] == task.extra["answer_text"]
        for k, opt in enumerate(task.options):
            assert f"({option_letter(k)}) {opt}" in task.question
        if task.extra["kind"] == "attribute":
            assert len(task.options) == 4 and len(set(task.options)) == 4
            letters.append(task.answer)
    assert len(set(letters)) >= 3, f"answer letters not shuffled: {letters}"


def test_attribute_box_crop_contains_the_target_colour():
    cfg = VisualSearchConfig(width=640, height=400, kinds=("attribute",))
    for i in range(8):
        task = visual_search_task(5, i, cfg)
        crop = _box_slice(task.load_images()[0], task.gt_boxes[0])
        colour = COLORS[task.extra["answer_text"]]
        assert _colour_fraction(crop, colour) > 0.1, task.question
        assert task.extra["targets"][0]["kind"] in task.question


def test_position_answer_matches_box_geometry_and_boxes_hold_their_targets():
    cfg = VisualSearchConfig(width=800, height=450, kinds=("position",))
    for i in range(8):
        task = visual_search_task(2, i, cfg)
        (a, b), image = task.gt_boxes, task.load_images()[0]
        expected = "left" if (a[0] + a[2]) < (b[0] + b[2]) else "right"
        assert task.extra["answer_text"] == expected
        assert abs((a[0] + a[2]) - (b[0] + b[2])) / 2 >= 0.1 * cfg.width
        for box, target in zip(task.gt_boxes, task.extra["targets"], strict=True):
            assert _colour_fraction(_box_slice(image, box), COLORS[target["color"]]) > 0.1


def test_text_questions_ask_for_the_drawn_label():
    cfg = VisualSearchConfig(width=640, height=400, kinds=("text",))
    task = visual_search_task(9, 0, cfg)
    label = task.extra["targets"][0]["label"]
    assert task.extra["answer_text"] == label and label in task.options
    unlabelled = visual_search_task(9, 0, VisualSearchConfig(width=640, height=400, kinds=("text",), labels=False))
    assert unlabelled.gt_boxes == task.gt_boxes
    with_label, without = task.load_images()[0], unlabelled.load_images()[0]
    changed = np.any(with_label != without, axis=-1)
    ys, xs = np.nonzero(changed)
    x1, y1, x2, y2 = task.gt_boxes[0]
    assert len(xs) > 0 and x1 - 4 <= xs.min() and xs.max() < x2 + 4 and y1 - 4 <= ys.min() and ys.max() < y2 + 4


def test_4k_images_are_supported():
    task = SyntheticTaskSource(1, seed=0, width=3840, height=2160)[0]
    assert task.load_images()[0].shape == (2160, 3840, 3)
    assert all(0 <= b[0] < b[2] <= 3840 and 0 <= b[1] < b[3] <= 2160 for b in task.gt_boxes)


def test_1080p_task_generates_quickly():
    times = []
    for i in range(3):
        start = time.perf_counter()
        visual_search_task(0, i).load_images()
        times.append(time.perf_counter() - start)
    assert sorted(times)[1] < 0.25, times  # about 20 ms on one core; generous for shared CI


def test_toy_colour_task_is_rule_judgeable_and_difficulty_shrinks_the_target():
    easy = toy_task(0, 0, ToyConfig(n_colors=2))
    assert easy.answer in TOY_COLORS[:2] and "red or green" in easy.question
    crop = _box_slice(easy.load_images()[0], easy.gt_boxes[0])
    assert _colour_fraction(crop, COLORS[easy.answer]) == 1.0
    hard = toy_task(0, 0, ToyConfig(difficulty=1.0))
    side = hard.gt_boxes[0][2] - hard.gt_boxes[0][0]
    assert side == ToyConfig().min_target < easy.gt_boxes[0][2] - easy.gt_boxes[0][0]
    answers = {toy_task(1, i).answer for i in range(30)}
    assert answers == set(TOY_COLORS)


def test_toy_zoom_task_needs_the_frame_crop():
    cfg = ToyConfig(kind="zoom")
    for i in range(4):
        task = toy_task(4, i, cfg)
        image = task.load_images()[0]
        assert image.shape == (224, 224, 3)
        frame = task.gt_boxes[0]
        assert min(frame[2] - frame[0], frame[3] - frame[1]) > 30  # a valid DeepEyes zoom box
        crop = _box_slice(image, frame)
        counts = {name: int(np.all(crop == np.asarray(COLORS[name], np.uint8), axis=-1).sum()) for name in cfg.colors}
        # Every candidate colour is in the frame with the same pixel mass (the plus and the x marks),
        # so a shrunken view carries no hint of the answer.
        assert len(set(counts.values())) == 1 and counts[task.answer] > 0, counts
        target = _box_slice(image, task.extra["target_box"])
        side = target.shape[0]
        mask = np.all(target == np.asarray(COLORS[task.answer], np.uint8), axis=-1)
        assert mask[side // 2].all() and mask[:, side // 2].all()  # a plus: full middle row and column
        small = np.asarray(Image.fromarray(image).resize((56, 56), Image.Resampling.BOX))
        assert not np.any(np.all(small == np.asarray(COLORS[task.answer], np.uint8), axis=-1))
    sides = [toy_task(0, 0, ToyConfig(kind="zoom", difficulty=d)).extra["target_box"] for d in (0.0, 1.0)]
    assert [b[2] - b[0] for b in sides] == [9, 5]


def test_toy_zoom_quadrant_layout_puts_the_frame_in_one_of_four_places():
    cfg = ToyConfig(kind="zoom", frame_layout="quadrants")
    frames = {toy_task(2, i, cfg).gt_boxes[0] for i in range(40)}
    assert frames == {(34.0, 34.0, 78.0, 78.0), (146.0, 34.0, 190.0, 78.0),
                      (34.0, 146.0, 78.0, 190.0), (146.0, 146.0, 190.0, 190.0)}
    task = toy_task(2, 0, cfg)
    image = task.load_images()[0]
    x1, y1, x2, y2 = (int(v) for v in task.gt_boxes[0])
    assert np.all(image[y1, x1:x2] == 0) and np.all(image[y1:y2, x1] == 0)  # the frame's border is drawn there
    target = task.extra["target_box"]
    assert x1 < target[0] and target[2] < x2 and y1 < target[1] and target[3] < y2  # the plus is inside
    centered = {toy_task(2, i, ToyConfig(kind="zoom", frame_layout="center")).gt_boxes[0] for i in range(10)}
    assert centered == {(90.0, 90.0, 134.0, 134.0)}
    default = [toy_task(2, i, ToyConfig(kind="zoom")).gt_boxes[0] for i in range(10)]
    assert len(set(default)) > 4  # the default layout still places the frame anywhere
    with pytest.raises(ValueError, match="frame_layout"):
        ToyConfig(kind="zoom", frame_layout="corners")
    with pytest.raises(ValueError, match="twice the frame"):
        ToyConfig(kind="zoom", frame_layout="quadrants", size=80)


def test_a_frame_margin_keeps_the_marks_clear_of_the_frame_s_border():
    """The slack that lets a zoom on the frame's own box, a few pixels off, still hold every mark."""
    cfg = ToyConfig(kind="zoom", target_size=13, frame_size=60, frame_margin=8)
    for i in range(20):
        task = toy_task(3, i, cfg)
        x1, y1, x2, y2 = task.gt_boxes[0]
        inset = 60 // 14 + 8
        marks = [s.box for s in task.images[0].scene.shapes if s.kind in ("plus", "xmark")]
        assert len(marks) == 4 and all(x1 + inset < m[0] and m[2] <= x2 - inset and y1 + inset < m[1]
                                       and m[3] <= y2 - inset for m in marks)
        image = task.load_images()[0]
        assert np.all(image[int(y1), int(x1):int(x2)] == 0)  # the border is still on the box's edge
    with pytest.raises(ValueError, match="frame_margin"):
        ToyConfig(kind="zoom", frame_size=60, frame_margin=11)


def test_toy_zoom_mix_draws_a_share_of_tasks_readable_in_the_full_view():
    plain = [toy_task(5, i, ToyConfig(kind="zoom")) for i in range(40)]
    mixed = [toy_task(5, i, ToyConfig(kind="zoom", readable_share=0.5)) for i in range(40)]
    assert all("needs_zoom" not in t.extra for t in plain)
    readable = [t for t in mixed if not t.extra["needs_zoom"]]
    assert 10 <= len(readable) <= 30
    def strokes_survive_a_4x_shrink(task):
        """Some pixel of the 56x56 view is at least half the answer's colour (a 1 px stroke gives a quarter)."""
        small = np.asarray(Image.fromarray(task.load_images()[0]).resize((56, 56), Image.Resampling.BOX), float)
        colour, grey = np.asarray(COLORS[task.answer], float), np.full(3, 128.0)
        return bool(np.any(np.linalg.norm(small - colour, axis=-1) <= 0.55 * np.linalg.norm(grey - colour)))

    for task in readable[:4]:
        x1, y1, x2, y2 = task.gt_boxes[0]
        assert (x2 - x1, y2 - y1) == (132.0, 132.0)  # three times the 44 px frame
        assert strokes_survive_a_4x_shrink(task)
    needing = [t for t in mixed if t.extra["needs_zoom"]]
    assert all(t.gt_boxes[0][2] - t.gt_boxes[0][0] == 44.0 for t in needing)
    assert not any(strokes_survive_a_4x_shrink(t) for t in needing[:4])
    with pytest.raises(ValueError, match="readable_share"):
        ToyConfig(kind="zoom", readable_share=1.5)
    with pytest.raises(ValueError, match="three times|3 times"):
        ToyConfig(kind="zoom", readable_share=0.5, size=120)


def test_synthetic_source_is_a_task_source_and_samples_reproducibly():
    src = SyntheticTaskSource(50, seed=0, kind="toy")
    assert isinstance(src, TaskSource) and len(src) == 50
    a = [src.sample(np.random.default_rng(7)).task_id for _ in range(3)]
    b = [src.sample(np.random.default_rng(7)).task_id for _ in range(3)]
    assert a == b
    assert pickle.loads(pickle.dumps(src))[3].question == src[3].question
    with pytest.raises(IndexError):
        src[50]


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError):
        SyntheticTaskSource(1, kind="nope")
    with pytest.raises(ValueError):
        VisualSearchConfig(kinds=("colour",))
    with pytest.raises(ValueError):
        ToyConfig(difficulty=2.0)
    with pytest.raises(TypeError):
        SyntheticTaskSource(1, not_a_field=3)


# --- the counting family -------------------------------------------------------------------------


def _components(mask: np.ndarray) -> int:
    """4-connected regions of ``mask``, counted by flood fill (the test's own, not the demo agent's code)."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count, stack = count + 1, [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def test_counting_tasks_answer_the_number_of_separate_dots_of_the_asked_colour():
    source = SyntheticTaskSource(20, seed=5, kind="count")
    answers = set()
    for i in range(len(source)):
        task = source[i]
        image = task.images[0].load()
        color = task.extra["color"]
        assert task.question == f"How many {color} dots are there? Answer with a number."
        assert task.env_name == "visual_code" and task.data_source == "synthetic_count"
        assert int(task.answer) == task.extra["count"] == len(task.gt_boxes) == _components(
            np.all(image == COLORS[color], axis=-1))
        for box in task.gt_boxes:  # each ground-truth box holds one whole dot of the colour
            assert _colour_fraction(_box_slice(image, box), COLORS[color]) > 0.5
        answers.add(task.answer)
    assert len(answers) >= 5  # the count varies


def test_counting_tasks_are_reproducible_and_configurable():
    a, b = SyntheticTaskSource(3, seed=1, kind="count"), SyntheticTaskSource(3, seed=1, kind="count")
    assert a[2].question == b[2].question and np.array_equal(a[2].images[0].load(), b[2].images[0].load())
    assert SyntheticTaskSource(3, seed=2, kind="count")[2].images[0].load().tobytes() != a[2].images[0].load().tobytes()
    small = SyntheticTaskSource(1, seed=0, kind="count", width=200, height=100, n_targets=(2, 2), n_others=(0, 0))[0]
    assert small.answer == "2" and small.images[0].load().shape == (100, 200, 3)
    with pytest.raises(ValueError, match="cannot place 40 dots"):
        SyntheticTaskSource(1, kind="count", width=40, height=40, n_targets=(40, 40), n_others=(0, 0))[0]
    with pytest.raises(ValueError, match="colors must be at least two"):
        SyntheticTaskSource(1, kind="count", colors=("red",))
