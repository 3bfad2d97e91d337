"""One image geometry: the env's smart_resize gives the Qwen-VL processor's size for every image size.

deepeyes_envs may not import transformers, so it has its own smart_resize; these tests hold it to the
processor's over a dense grid of sizes (sides 1 to 20,000, aspect ratios up to the limit and past it), for
Qwen2/2.5-VL (factor 28) and Qwen3-VL (patch 16, merge 2: factor 32), with the pixel budgets we ship.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

import deepeyes_envs  # noqa: F401  (registers the envs)
from deepeyes_envs.images import MAX_PIXELS, MIN_PIXELS, ImageError, seen_size, smart_resize

DEEPEYES_BUDGET = (MIN_PIXELS, MAX_PIXELS)  # 4*28*28 .. 16384*28*28 (docs/deepeyes.md, "The v2 env")
TINY_BUDGET = (4 * 28 * 28, 64 * 28 * 28)  # the tiny CPU model (deepeyes_agent.models)
TINY_ZOOM_BUDGET = (3136, 3136)  # the pretrained tiny base of configs/zoom_cpu.yaml
QWEN3_BUDGET = (65536, 16777216)  # Qwen3-VL's published preprocessor budget

CASES = [
    (28, DEEPEYES_BUDGET), (28, TINY_BUDGET), (28, TINY_ZOOM_BUDGET),
    (32, DEEPEYES_BUDGET), (32, TINY_BUDGET), (32, QWEN3_BUDGET),
]


def grid(factor: int, max_pixels: int) -> set[tuple[int, int]]:
    """(height, width) pairs that reach every branch and boundary of the arithmetic."""
    sizes = {(h, w) for h in range(1, 161) for w in range(1, 161)}  # small images, the min_pixels regime
    sides = {int(round(v)) for v in np.geomspace(1, 20_000, 90)} | {20_000}
    sides |= {k * factor + d for k in range(0, 40) for d in (-1, 0, 1, factor // 2 - 1, factor // 2, factor // 2 + 1)}
    sides = {s for s in sides if 1 <= s <= 20_000}
    sizes |= {(h, w) for h in sides for w in sides}
    root = math.isqrt(max_pixels)  # the max_pixels boundary, densely
    band = range(max(1, root - 40), root + 40)
    sizes |= {(h, w) for h in band for w in band}
    for short in range(1, 101):  # aspect ratios at the limit of 200, and just past it
        for long in (200 * short - 1, 200 * short, 200 * short + 1):
            sizes |= {(short, long), (long, short)}
    rng = np.random.default_rng(0)
    heights = np.exp(rng.uniform(0, math.log(20_000), 20_000)).astype(int) + 1
    ratios = np.exp(rng.uniform(-math.log(200), math.log(200), 20_000))
    widths = np.clip((heights * ratios).astype(int), 1, 20_000)
    sizes |= {(int(h), int(w)) for h, w in zip(heights, widths, strict=True) if h <= 20_000}
    return sizes


def outcome(fn, height: int, width: int, factor: int, budget: tuple[int, int]):
    try:
        return fn(height, width, factor=factor, min_pixels=budget[0], max_pixels=budget[1])
    except ValueError:  # transformers raises ValueError; ours ImageError, a ValueError
        return "rejected"


@pytest.mark.parametrize("factor, budget", CASES)
def test_smart_resize_equals_the_processors_over_a_dense_grid(factor, budget):
    sizes = grid(factor, budget[1])
    assert len(sizes) > 40_000
    mismatches = [(h, w, ours, theirs) for h, w in sorted(sizes)
                  if (ours := outcome(smart_resize, h, w, factor, budget)) != (theirs := outcome(hf_smart_resize, h, w, factor, budget))]
    assert mismatches == [], f"{len(mismatches)} sizes differ, e.g. (h, w, ours, transformers) {mismatches[:5]}"
    rejected = [s for s in sizes if outcome(smart_resize, *s, factor, budget) == "rejected"]
    assert rejected and all(max(h, w) / min(h, w) > 200 for h, w in rejected)


def test_a_thin_strip_is_the_processors_size():
    """The case that was wrong: rounding the short side up to 28 before the area check gave 2100x28."""
    assert seen_size(2111, 12) == (756, 28)
    assert seen_size(12, 2111) == (28, 756)
    assert seen_size(2111, 12, factor=32, min_pixels=QWEN3_BUDGET[0], max_pixels=QWEN3_BUDGET[1]) == (3424, 32)


def test_refused_sizes_and_budgets_give_clear_errors():
    with pytest.raises(ImageError, match="aspect ratio of a 201x1 image exceeds 200"):
        seen_size(201, 1)
    with pytest.raises(ImageError, match="must be positive"):
        seen_size(0, 10)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        seen_size(100, 100, min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        gym.make("visual_toolbox", min_pixels=0)
    with pytest.raises(ValueError, match="factor must be at least 1"):
        gym.make("visual_toolbox", image_factor=0)


@pytest.mark.parametrize("patch, budget", [(14, DEEPEYES_BUDGET), (14, TINY_BUDGET), (16, QWEN3_BUDGET)])
@pytest.mark.parametrize("width, height", [(2111, 12), (12, 2111), (1, 1), (3, 600), (200, 1), (57, 43), (640, 480)])
def test_seen_size_is_what_the_image_processor_produces(patch, budget, width, height):
    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=budget[0], max_pixels=budget[1])
    image = Image.new("RGB", (width, height))
    _, grid_h, grid_w = processor(images=[image], return_tensors="np")["image_grid_thw"][0]
    assert seen_size(width, height, *budget, factor=2 * patch) == (grid_w * patch, grid_h * patch)


@pytest.mark.parametrize("factor, budget", [(28, DEEPEYES_BUDGET), (32, QWEN3_BUDGET)])
def test_the_env_reports_the_seen_frame_for_its_factor(factor, budget):
    env = gym.make("visual_toolbox", image_factor=factor, min_pixels=budget[0], max_pixels=budget[1])
    _, info = env.reset(options={"image": np.zeros((12, 2111, 3), np.uint8), "question": "q", "answer": "a"})
    height, width = hf_smart_resize(12, 2111, factor=factor, min_pixels=budget[0], max_pixels=budget[1])
    assert info["seen_size"] == (width, height)
    assert env.unwrapped.seen_sizes == [(width, height)]
