"""Offline, seeded synthetic tasks with ground-truth boxes.

Three families:

* **Visual search** (V*-like): a large image (1920x1080 by default, 4K works) with a cluttered
  background and small target shapes; attribute questions ("What is the color of the triangle?"),
  relative-position questions ("Is the red circle on the left or right side of the blue square?")
  and, optionally, questions about a tiny letter drawn on a target. Multiple-choice options are
  shuffled by the seed and the answer is the option letter.
* **Toy** tasks for proving that RL learns: small images, a 2-4 colour answer space judged by
  rule, a ``difficulty`` knob for target size, and a ``zoom`` variant whose deciding detail is too
  small to see at a low pixel budget unless the model zooms into the ground-truth box.
* **Counting** ("How many red dots are there?"): many small dots of a few colours; counting them by eye
  at the model's resolution is error-prone, counting pixels in code (the ``python_tool``) is exact.

A task holds only its layout (a :class:`Scene`); pixels are rendered from it when the env loads the
task, so thousands of tasks cost almost nothing, and the same seed and index always give the same
task, pixel for pixel. Writing tasks to parquet renders and PNG-encodes them then.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.tasks import IndexedTaskSource, Task, format_multiple_choice, option_letter
from .images import MAX_DECODED_PIXELS, ImageError, LazyImage, encode_png

RGB = tuple[int, int, int]
IntBox = tuple[int, int, int, int]

# Named colours, far apart from each other and from the muted backgrounds.
COLORS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 20),
    "orange": (250, 130, 20),
    "purple": (140, 50, 190),
    "cyan": (20, 205, 215),
    "white": (252, 252, 252),
    "black": (12, 12, 12),
}

TARGET_KINDS = ("circle", "square", "triangle", "diamond", "star")
# Distractors never share a kind with a target, so "the triangle" is always unique.
DISTRACTOR_KINDS = ("bar", "ring", "cross")
LABEL_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ2345679"
MIN_LABELLED_SIDE = 14  # smaller targets get no letter (it would hide the shape)


@dataclass(frozen=True)
class Shape:
    """One drawn shape. ``box`` is (x1, y1, x2, y2) in pixels, x2/y2 exclusive: the shape covers
    exactly ``image[y1:y2, x1:x2]``, so the box is also the ground-truth crop."""

    kind: str
    box: IntBox
    color: RGB
    label: str = ""
    label_color: RGB = (0, 0, 0)
    label_size: int = 10  # font size of the label


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image; rendering is a pure function of this."""

    width: int
    height: int
    background: RGB
    shapes: tuple[Shape, ...] = ()
    blotch_seed: Optional[int] = None  # None: flat background
    blotch_cell: int = 96
    blotch_amplitude: int = 30
    noise: int = 0  # +/- grey noise per pixel (costly to PNG-encode; off by default)


def render_scene(scene: Scene) -> np.ndarray:
    """Render a scene to uint8 HxWx3 (deterministic: same scene, same pixels)."""
    img = _background(scene)
    draw = ImageDraw.Draw(img)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
        if shape.label:
            _draw_label(draw, shape)
    return np.asarray(img, dtype=np.uint8).copy()


def _background(scene: Scene) -> Image.Image:
    w, h = scene.width, scene.height
    if scene.blotch_seed is None and scene.noise == 0:
        return Image.new("RGB", (w, h), scene.background)
    rng = np.random.default_rng(scene.blotch_seed if scene.blotch_seed is not None else 0)
    if scene.blotch_seed is None:
        img = Image.new("RGB", (w, h), scene.background)
    else:
        # Low-frequency colour blotches: a coarse random grid upsampled bilinearly.
        gw, gh = w // scene.blotch_cell + 2, h // scene.blotch_cell + 2
        amp = scene.blotch_amplitude
        grid = np.asarray(scene.background, dtype=np.int16) + rng.integers(-amp, amp + 1, (gh, gw, 3))
        img = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
    if scene.noise:
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-scene.noise, scene.noise + 1, (h, w, 1), dtype=np.int16)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x1, y1, x2, y2 = shape.box
    r, b = x2 - 1, y2 - 1  # PIL coordinates are inclusive
    cx, cy = (x1 + r) / 2, (y1 + b) / 2
    side = min(x2 - x1, y2 - y1)
    kind, color = shape.kind, shape.color
    if kind in ("square", "bar"):
        draw.rectangle([x1, y1, r, b], fill=color)
    elif kind == "plus":  # strokes a 13th of the side (one pixel up to 25 px): the pixel count of an "xmark"
        draw.line([(x1, int(cy)), (r, int(cy))], fill=color, width=max(1, side // 13))
        draw.line([(int(cx), y1), (int(cx), b)], fill=color, width=max(1, side // 13))
    elif kind == "xmark":
        draw.line([(x1, y1), (r, b)], fill=color, width=max(1, side // 13))
        draw.line([(x1, b), (r, y1)], fill=color, width=max(1, side // 13))
    elif kind == "circle":
        draw.ellipse([x1, y1, r, b], fill=color)
    elif kind == "ring":
        draw.ellipse([x1, y1, r, b], outline=color, width=max(1, side // 5))
    elif kind == "frame":
        draw.rectangle([x1, y1, r, b], outline=color, width=max(1, side // 14))
    elif kind == "triangle":
        draw.polygon([(x1, b), (cx, y1), (r, b)], fill=color)
    elif kind == "diamond":
        draw.polygon([(cx, y1), (r, cy), (cx, b), (x1, cy)], fill=color)
    elif kind == "star":
        rx, ry = (r - x1) / 2, (b - y1) / 2
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = [(cx + rx * k * np.cos(a), cy - ry * k * np.sin(a)) for a, k in zip(angles, radii, strict=True)]
        draw.polygon(pts, fill=color)
    elif kind == "cross":
        t = max(1, side // 3)
        draw.rectangle([x1, int(cy - t / 2), r, int(cy + t / 2)], fill=color)
        draw.rectangle([int(cx - t / 2), y1, int(cx + t / 2), b], fill=color)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _draw_label(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x1, y1, x2, y2 = shape.box
    font = _font(shape.label_size)
    draw.text(((x1 + x2) / 2, (y1 + y2) / 2), shape.label, fill=shape.label_color, font=font, anchor="mm")


class SyntheticImage(LazyImage):
    """A ``LazyImage`` rendered from its :class:`Scene` on :meth:`load` instead of decoded.

    It costs a few hundred bytes until loaded; ``to_bytes`` gives PNG bytes (for writing files).
    """

    png_compress_level = 1  # PNG encoding dominates writing big images; level 1 is ~3x faster

    def __init__(self, scene: Scene, name: str = "synthetic image"):
        super().__init__(source=b"", name=name)
        self.scene = scene

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SyntheticImage) and self.scene == other.scene

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        w, h, n = self.scene.width, self.scene.height, len(self.scene.shapes)
        return f"SyntheticImage({w}x{h}, {n} shapes, name={self.name!r})"

    @property
    def size(self) -> tuple[int, int]:
        return (self.scene.width, self.scene.height)

    def load(self, max_pixels: int = MAX_DECODED_PIXELS) -> np.ndarray:
        w, h = self.size
        if w * h > max_pixels:
            raise ImageError(f"{self.name}: {w}x{h} image has {w * h} pixels, above the limit of {max_pixels}")
        return render_scene(self.scene)

    def to_bytes(self) -> bytes:
        return encode_png(self.load(), compress_level=self.png_compress_level)


# --- layout helpers ----------------------------------------------------------------------------


def _overlaps(a: IntBox, b: IntBox, margin: int = 0) -> bool:
    return a[0] - margin < b[2] and b[0] - margin < a[2] and a[1] - margin < b[3] and b[1] - margin < a[3]


def place_box(rng: np.random.Generator, w: int, h: int, bw: int, bh: int, margin: int) -> IntBox:
    """A random ``bw`` x ``bh`` box inside a ``w`` x ``h`` image, ``margin`` px from its edges where it fits."""
    x = int(rng.integers(margin, max(margin + 1, w - bw - margin)))
    y = int(rng.integers(margin, max(margin + 1, h - bh - margin)))
    return (x, y, x + bw, y + bh)


def _background_color(rng: np.random.Generator) -> RGB:
    grey = int(rng.integers(85, 170))
    return tuple(int(v) for v in np.clip(grey + rng.integers(-20, 21, 3), 0, 255))  # type: ignore[return-value]


def _label_color(color: RGB) -> RGB:
    return (0, 0, 0) if sum(color) > 380 else (255, 255, 255)


# --- visual search -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualSearchConfig:
    """Knobs of V*-like tasks. ``target_size`` is (min, max) side in pixels; None scales it with the
    image (1.2%-2.5% of the short side: 13-27 px at 1080p). ``n_distractors`` None scales with area."""

    width: int = 1920
    height: int = 1080
    kinds: tuple[str, ...] = ("attribute", "position")  # add "text" for tiny-letter questions
    n_options: int = 4
    target_size: Optional[tuple[int, int]] = None
    n_distractors: Optional[int] = None
    background: str = "blotches"  # or "flat"
    noise: int = 0
    labels: bool = True  # draw a tiny letter on targets of MIN_LABELLED_SIDE px or more
    colors: tuple[str, ...] = tuple(COLORS)
    data_source: str = "synthetic_vstar"
    env_name: str = "visual_toolbox_v2"

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - {"attribute", "position", "text"}
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of attribute, position, text; got {self.kinds}")
        if not 2 <= self.n_options <= len(self.colors):
            raise ValueError(f"n_options must be between 2 and {len(self.colors)}")
        if self.background not in ("blotches", "flat"):
            raise ValueError(f"background must be 'blotches' or 'flat', got {self.background!r}")
        if min(self.width, self.height) < 64:
            raise ValueError("visual search images need at least 64 px per side")


def visual_search_task(seed: int, index: int = 0, config: VisualSearchConfig = VisualSearchConfig()) -> Task:
    """One V*-like task, fully determined by (seed, index, config)."""
    cfg = config
    rng = np.random.default_rng([seed, index])
    w, h = cfg.width, cfg.height
    short = min(w, h)
    lo, hi = cfg.target_size or (max(8, round(0.012 * short)), max(10, round(0.025 * short)))
    kind = str(rng.choice(cfg.kinds))
    if kind == "text":  # the letter must be legible at full resolution
        lo, hi = max(lo, MIN_LABELLED_SIDE + 2), max(hi, MIN_LABELLED_SIDE + 6)
    n_targets = 2 if kind == "position" else 1
    target_kinds = [str(k) for k in rng.choice(TARGET_KINDS, size=n_targets, replace=False)]
    target_colors = [str(c) for c in rng.choice(cfg.colors, size=n_targets, replace=False)]
    targets = _place_targets(rng, w, h, lo, hi, n_targets, cfg.labels, target_kinds, target_colors)

    if kind == "attribute":
        answer_text = target_colors[0]
        others = [c for c in cfg.colors if c != answer_text]
        options = [answer_text, *(str(c) for c in rng.choice(others, size=cfg.n_options - 1, replace=False))]
        stem = f"What is the color of the {target_kinds[0]}?"
    elif kind == "text":
        answer_text = targets[0].label
        others = [c for c in LABEL_CHARS if c != answer_text]
        options = [answer_text, *(str(c) for c in rng.choice(others, size=cfg.n_options - 1, replace=False))]
        stem = f"What character is written on the {target_colors[0]} {target_kinds[0]}?"
    else:
        left = (targets[0].box[0] + targets[0].box[2]) < (targets[1].box[0] + targets[1].box[2])
        answer_text = "left" if left else "right"
        options = ["left", "right"]
        stem = (
            f"Is the {target_colors[0]} {target_kinds[0]} on the left or right side of "
            f"the {target_colors[1]} {target_kinds[1]}?"
        )
    order = rng.permutation(len(options))
    options = [options[i] for i in order]
    letter = option_letter(options.index(answer_text))

    scene = Scene(
        width=w,
        height=h,
        background=_background_color(rng),
        shapes=tuple(_distractors(rng, cfg, w, h, lo, hi, targets, target_kinds)) + tuple(targets),
        blotch_seed=int(rng.integers(2**31)) if cfg.background == "blotches" else None,
        noise=cfg.noise,
    )
    task_id = f"vsearch-{seed}-{index}"
    return Task(
        question=format_multiple_choice(stem, options),
        answer=letter,
        images=(SyntheticImage(scene, name=f"task {task_id!r} image 0"),),
        data_source=cfg.data_source,
        env_name=cfg.env_name,
        task_id=task_id,
        options=tuple(options),
        gt_boxes=tuple(tuple(float(v) for v in t.box) for t in targets),
        extra={
            "kind": kind,
            "answer_text": answer_text,
            "targets": [
                {"kind": k, "color": c, "label": t.label}
                for k, c, t in zip(target_kinds, target_colors, targets, strict=True)
            ],
        },
    )


def _place_targets(
    rng: np.random.Generator,
    w: int,
    h: int,
    lo: int,
    hi: int,
    n: int,
    labels: bool,
    kinds: Sequence[str],
    colors: Sequence[str],
) -> list[Shape]:
    """Targets in free space; two targets are kept apart horizontally so left/right is clear."""
    chars = rng.choice(list(LABEL_CHARS), size=n, replace=False)
    placed: list[Shape] = []
    for i in range(n):
        side = int(rng.integers(lo, hi + 1))
        box = place_box(rng, w, h, side, side, margin=side)
        for _ in range(100):
            if not placed:
                break
            other = placed[0].box
            apart = abs((box[0] + box[2]) - (other[0] + other[2])) / 2 >= max(0.1 * w, 3 * hi)
            if apart and not _overlaps(box, other, margin=hi):
                break
            box = place_box(rng, w, h, side, side, margin=side)
        rgb = COLORS[colors[i]]
        label = str(chars[i]) if labels and side >= MIN_LABELLED_SIDE else ""
        size = max(7, round(0.55 * side))
        placed.append(Shape(kinds[i], box, rgb, label=label, label_color=_label_color(rgb), label_size=size))
    return placed


def _distractors(
    rng: np.random.Generator,
    cfg: VisualSearchConfig,
    w: int,
    h: int,
    lo: int,
    hi: int,
    targets: Sequence[Shape],
    target_kinds: Sequence[str],
) -> list[Shape]:
    """Clutter that never covers a target and never shares a kind with one."""
    pool = [k for k in TARGET_KINDS if k not in target_kinds] + list(DISTRACTOR_KINDS)
    n = cfg.n_distractors if cfg.n_distractors is not None else round(40 * w * h / (1920 * 1080))
    palette = [COLORS[c] for c in cfg.colors]
    out = []
    for _ in range(n):
        kind = str(rng.choice(pool))
        side = int(rng.integers(lo, 4 * hi + 1))
        bw, bh = (side, max(2, side // 4)) if kind == "bar" else (side, side)
        if kind == "bar" and rng.random() < 0.5:
            bw, bh = bh, bw
        box = place_box(rng, w, h, bw, bh, margin=0)
        if any(_overlaps(box, t.box, margin=hi // 2) for t in targets):
            continue
        color = palette[int(rng.integers(len(palette)))]
        out.append(Shape(kind, box, color))
    return out


# --- toy tasks ---------------------------------------------------------------------------------

TOY_COLORS = ("red", "green", "blue", "yellow")
FRAME_LAYOUTS = ("random", "quadrants", "center")
READABLE_SCALE = 3  # the frame and marks of a toy zoom task readable in the full view (ToyConfig.readable_share)


@dataclass(frozen=True)
class ToyConfig:
    """Knobs of the toy family (issue 5, part 6).

    ``kind="color"``: one square on a grey image; "What is the color of the square?", answered
    with one colour word out of ``n_colors``. ``difficulty`` in [0, 1] shrinks the square from half
    the image to ``min_target`` px and adds grey distractors; ``target_size`` overrides it.

    ``kind="zoom"``: a black frame (the ground-truth box, over 30 px so a DeepEyes zoom on it is
    valid) holds ``n_colors`` tiny one-pixel-stroke marks, one per colour: a plus sign for the
    answer, x marks for the others, with equal pixel counts. At a pixel budget of (size/4)^2 (56x56
    for the default 224) each mark is a 2 px smudge, so which one is the plus can't be seen and
    accuracy stays at chance; zooming into the frame makes it plain. ``difficulty`` shrinks the
    marks from 9 to 5 px.

    ``frame_layout`` (zoom only) says where the frame goes: ``"random"`` (default) anywhere on the
    image; ``"quadrants"`` centred in one of the four quadrants, so where to zoom is one of four
    boxes. A tiny model can learn to pick one of four boxes from a 56x56 view (each of its 4 visual
    tokens covers one quadrant) where regressing free coordinates is out of its reach. ``"center"``: always
    the image centre, so the zoom box is the same for every task and only *whether* to zoom is learned.

    ``frame_margin`` (zoom only) is blank space, in px, between the frame's border and its marks: the slack that
    lets a zoom on the frame's own box read all the marks when the box is a few pixels off.

    ``readable_share`` (zoom only) of the tasks draw the frame and its marks three times larger, with strokes
    to match: the full view then shows them as a zoom on a small frame does, so a zoom is needless there.
    ``extra["needs_zoom"]`` says which kind a task is (the "zoom only when needed" mix, docs/training.md).
    """

    kind: str = "color"
    size: Optional[int] = None  # None: 112 for "color", 224 for "zoom"
    n_colors: int = 4
    difficulty: float = 0.0
    target_size: Optional[int] = None
    min_target: int = 4
    frame_size: int = 44
    frame_margin: int = 0
    frame_layout: str = "random"
    readable_share: float = 0.0
    data_source: str = "synthetic_toy"
    env_name: str = "visual_toolbox_v2"

    def __post_init__(self) -> None:
        if self.kind not in ("color", "zoom"):
            raise ValueError(f"toy kind must be 'color' or 'zoom', got {self.kind!r}")
        if self.size is None:
            object.__setattr__(self, "size", 112 if self.kind == "color" else 224)
        if not 2 <= self.n_colors <= len(TOY_COLORS):
            raise ValueError(f"n_colors must be between 2 and {len(TOY_COLORS)}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError("difficulty must be within [0, 1]")
        if self.kind == "zoom" and self.size < self.frame_size + 8:
            raise ValueError("zoom toy images must be larger than the frame")
        if not 0 <= self.frame_margin <= self.frame_size // 6:
            raise ValueError(f"frame_margin must be within [0, frame_size // 6], got {self.frame_margin}")
        if self.frame_layout not in FRAME_LAYOUTS:
            raise ValueError(f"frame_layout must be one of {FRAME_LAYOUTS}, got {self.frame_layout!r}")
        if self.frame_layout == "quadrants" and self.size < 2 * self.frame_size + 4:
            raise ValueError("frame_layout='quadrants' needs an image at least twice the frame (plus margins)")
        if not 0.0 <= self.readable_share <= 1.0:
            raise ValueError("readable_share must be within [0, 1]")
        if self.readable_share and self.size < READABLE_SCALE * self.frame_size + 8:
            raise ValueError(f"readable_share needs an image larger than {READABLE_SCALE} times the frame")

    @property
    def colors(self) -> tuple[str, ...]:
        return TOY_COLORS[: self.n_colors]

    def target_side(self) -> int:
        if self.target_size is not None:
            return self.target_size
        big = self.size // 2 if self.kind == "color" else 9
        return round(big + (self.min_target - big) * self.difficulty)


def toy_task(seed: int, index: int = 0, config: ToyConfig = ToyConfig()) -> Task:
    """One toy task, fully determined by (seed, index, config)."""
    rng = np.random.default_rng([seed, index])
    colors = config.colors
    answer = str(rng.choice(colors))
    words = ", ".join(colors[:-1]) + f" or {colors[-1]}"
    extra = {}
    if config.kind == "color":
        shapes, gt, stem = _toy_color_layout(rng, config, answer)
    else:
        # Drawn only for a mix, so that the tasks of a config without one stay as they were.
        readable = bool(config.readable_share) and bool(rng.random() < config.readable_share)
        drawn = dataclasses.replace(config, frame_size=READABLE_SCALE * config.frame_size,
                                    frame_margin=READABLE_SCALE * config.frame_margin, readable_share=0.0,
                                    target_size=READABLE_SCALE * config.target_side(), frame_layout="random"
                                    ) if readable else config
        shapes, gt, stem = _toy_zoom_layout(rng, drawn, answer)
        extra = {"needs_zoom": not readable} if config.readable_share else {}
    scene = Scene(width=config.size, height=config.size, background=(128, 128, 128), shapes=tuple(shapes))
    task_id = f"toy-{config.kind}-{seed}-{index}"
    return Task(
        question=f"{stem} Answer with one word: {words}.",
        answer=answer,
        images=(SyntheticImage(scene, name=f"task {task_id!r} image 0"),),
        data_source=config.data_source,
        env_name=config.env_name,
        task_id=task_id,
        gt_boxes=(tuple(float(v) for v in gt),),
        extra={"kind": f"toy_{config.kind}", "answer_space": colors, "target_box": shapes[-1].box, **extra},
    )


def _toy_color_layout(rng: np.random.Generator, cfg: ToyConfig, answer: str) -> tuple[list[Shape], IntBox, str]:
    side = max(1, min(cfg.target_side(), cfg.size - 2))
    target = Shape("square", place_box(rng, cfg.size, cfg.size, side, side, margin=1), COLORS[answer])
    shapes = []
    for _ in range(round(6 * cfg.difficulty)):  # grey clutter, never a candidate colour
        s = int(rng.integers(max(2, side // 2), max(3, side * 2)))
        box = place_box(rng, cfg.size, cfg.size, s, s, margin=0)
        if not _overlaps(box, target.box, margin=2):
            grey = int(rng.choice([60, 90, 170, 200]))
            shapes.append(Shape(str(rng.choice(["circle", "triangle", "ring"])), box, (grey, grey, grey)))
    return [*shapes, target], target.box, "What is the color of the square?"


def _toy_zoom_layout(rng: np.random.Generator, cfg: ToyConfig, answer: str) -> tuple[list[Shape], IntBox, str]:
    """A frame holding one tiny mark per colour: a plus for the answer, x marks for the rest.

    Both marks are one-pixel strokes with the same pixel count (2*side - 1), so once the image is
    shrunk they blur into equal smudges of their colours and only a zoom tells them apart.
    """
    f = cfg.frame_size
    if cfg.frame_layout == "quadrants":  # centred in quadrant q: left/right by q % 2, top/bottom by q // 2
        q, half = int(rng.integers(4)), cfg.size // 2
        x, y = (q % 2) * half + (half - f) // 2, (q // 2) * half + (half - f) // 2
        frame = (x, y, x + f, y + f)
    elif cfg.frame_layout == "center":
        x = y = (cfg.size - f) // 2
        frame = (x, y, x + f, y + f)
    else:
        frame = place_box(rng, cfg.size, cfg.size, f, f, margin=2)
    border = max(1, f // 14)
    inset = border + cfg.frame_margin
    cell = (f - 2 * inset) // 2
    side = max(3, min(cfg.target_side(), cell - 2))
    if side % 2 == 0:  # odd, so both strokes of each mark cross on a pixel
        side = side + 1 if side + 1 <= cell - 2 else side - 1
    slots = rng.permutation(4)[: cfg.n_colors]
    colors = [str(c) for c in rng.permutation(cfg.colors)]
    marks = []
    for slot, color in zip(slots, colors, strict=True):
        x0 = frame[0] + inset + (slot % 2) * cell
        y0 = frame[1] + inset + (slot // 2) * cell
        jx, jy = (int(rng.integers(1, max(2, cell - side))) for _ in range(2))
        box = (x0 + jx, y0 + jy, x0 + jx + side, y0 + jy + side)
        marks.append(Shape("plus" if color == answer else "xmark", box, COLORS[color]))
    marks.sort(key=lambda m: m.kind == "plus")  # the target last, as in every toy layout
    stem = (
        "Inside the black frame there are tiny marks, one per colour: one plus sign (+) and "
        "the rest x marks. What is the color of the plus sign?"
    )
    return [Shape("frame", frame, (0, 0, 0)), *marks], frame, stem


# --- counting --------------------------------------------------------------------------------

COUNT_COLORS = ("red", "green", "blue", "yellow")


@dataclass(frozen=True)
class CountConfig:
    """Knobs of the counting family: ``n_targets`` dots of one colour (the question's) among ``n_others``
    dots of the other ``colors``, each a flat disc of ``radius`` px (min, max) on a flat grey image, at
    least ``gap`` px apart so that every dot is its own connected region of exactly its colour."""

    width: int = 448
    height: int = 336
    colors: tuple[str, ...] = COUNT_COLORS
    n_targets: tuple[int, int] = (3, 12)
    n_others: tuple[int, int] = (6, 18)
    radius: tuple[int, int] = (4, 8)
    gap: int = 3
    data_source: str = "synthetic_count"
    env_name: str = "visual_code"

    def __post_init__(self) -> None:
        if len(self.colors) < 2 or any(c not in COLORS for c in self.colors):
            raise ValueError(f"colors must be at least two of {sorted(COLORS)}, got {self.colors}")
        for name in ("n_targets", "n_others", "radius"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 0 <= min <= max, got {(lo, hi)}")
        if self.radius[0] < 1 or self.n_targets[0] < 1:
            raise ValueError("dots need a radius of at least 1 px and a question at least 1 target")


def count_task(seed: int, index: int = 0, config: CountConfig = CountConfig()) -> Task:
    """One counting task, fully determined by (seed, index, config)."""
    cfg = config
    rng = np.random.default_rng([seed, index])
    target = str(rng.choice(cfg.colors))
    others = [c for c in cfg.colors if c != target]
    n_targets = int(rng.integers(cfg.n_targets[0], cfg.n_targets[1] + 1))
    n_others = int(rng.integers(cfg.n_others[0], cfg.n_others[1] + 1))
    colors = [target] * n_targets + [str(c) for c in rng.choice(others, size=n_others)]
    placed: list[Shape] = []
    for color in colors:
        side = 2 * int(rng.integers(cfg.radius[0], cfg.radius[1] + 1)) + 1
        for _ in range(200):
            box = place_box(rng, cfg.width, cfg.height, side, side, margin=1)
            if not any(_overlaps(box, s.box, margin=cfg.gap) for s in placed):
                placed.append(Shape("circle", box, COLORS[color]))
                break
        else:
            raise ValueError(f"cannot place {len(colors)} dots apart on a {cfg.width}x{cfg.height} image")
    targets = [s for s in placed if s.color == COLORS[target]]
    scene = Scene(width=cfg.width, height=cfg.height, background=(150, 150, 150), shapes=tuple(placed))
    task_id = f"count-{seed}-{index}"
    return Task(
        question=f"How many {target} dots are there? Answer with a number.",
        answer=str(len(targets)),
        images=(SyntheticImage(scene, name=f"task {task_id!r} image 0"),),
        data_source=cfg.data_source,
        env_name=cfg.env_name,
        task_id=task_id,
        gt_boxes=tuple(tuple(float(v) for v in t.box) for t in targets),
        extra={"kind": "count", "color": target, "rgb": COLORS[target], "count": len(targets)},
    )


# --- the task source ---------------------------------------------------------------------------

SYNTHETIC_KINDS = ("visual_search", "toy", "toy_zoom", "count")
AnyConfig = Union[VisualSearchConfig, ToyConfig, CountConfig]


class SyntheticTaskSource(IndexedTaskSource):
    """``n`` synthetic tasks generated on demand: task ``i`` depends only on (seed, i, config).

    ``kind`` is "visual_search" (V*-like), "toy", "toy_zoom" or "count"; keyword arguments set fields of
    the kind's config (``VisualSearchConfig``, ``ToyConfig`` or ``CountConfig``), e.g. ``width=3840, height=2160`` or
    ``difficulty=0.5``. The env uses one as its default source, so ``gym.make`` needs no data.
    """

    def __init__(
        self,
        n: int = 1000,
        seed: int = 0,
        kind: str = "visual_search",
        config: Optional[AnyConfig] = None,
        **overrides: Any,
    ):
        if n < 0:
            raise ValueError("n must be non-negative")
        if kind not in SYNTHETIC_KINDS:
            raise ValueError(f"kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
        self.n, self.seed, self.kind = n, seed, kind
        if config is None:
            if kind == "visual_search":
                config = VisualSearchConfig()
            elif kind == "count":
                config = CountConfig()
            else:
                config = ToyConfig(kind="zoom" if kind == "toy_zoom" else "color")
        self.config = dataclasses.replace(config, **overrides) if overrides else config

    def __len__(self) -> int:
        return self.n

    def _get(self, index: int) -> Task:
        if isinstance(self.config, VisualSearchConfig):
            return visual_search_task(self.seed, index, self.config)
        if isinstance(self.config, CountConfig):
            return count_task(self.seed, index, self.config)
        return toy_task(self.seed, index, self.config)
