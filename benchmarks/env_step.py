"""How fast is one zoom step of ``visual_toolbox_v2``, and how much memory do 4K datasets cost?

Section 1 times one ``env.step`` that zooms into a 1080p and a 4K image, beside two references
measured in the same run on the same image and box:

* (a) the floor: ``PIL.Image.crop`` on an image already in memory, then ``np.asarray`` to have pixels;
* (b) a DeepEyes-style step: parse the turn, crop with PIL, encode the crop as PNG and decode it again.

Targets: step / floor <= 1.5 and (b) / step >= 5. The env's crop is a read-only view of the original
(no copy), so the table also shows the step with the crop copied out, for a like-for-like reading.

Section 2 writes N synthetic 4K tasks to a DeepEyes parquet file, then, in a fresh subprocess,
resets an env on every task in order (plus one zoom step each) and reports the peak RSS of that
process (``VmHWM``). Target: under 1.5 GB for 2,000 tasks. The parquet file is cached (it takes
minutes to render and encode 2,000 4K images); ``--quick`` uses a few tasks in a temporary folder.

    python benchmarks/env_step.py            # full run (about 2k resets of 4K images)
    python benchmarks/env_step.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((1920, 1080), (3840, 2160))
STEP_TARGET = 1.5  # step / floor at most this
PNG_TARGET = 5.0  # (b) / step at least this
RSS_TARGET_MB = 1536.0
DEFAULT_CACHE = Path("outputs") / "bench"

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


# --- section 1: step timing ----------------------------------------------------------------------


def synthetic_image(width: int, height: int) -> np.ndarray:
    """A V*-like cluttered image (not noise, so PNG sizes and timings resemble real photos)."""
    from deepeyes_envs.synthetic import SyntheticTaskSource

    return SyntheticTaskSource(n=1, seed=0, width=width, height=height)[0].images[0].load()


def zoom_box(width: int, height: int, frac: float) -> tuple[int, int, int, int]:
    """A box of ``frac`` of each side, off-centre, in original-image pixels."""
    bw, bh = round(width * frac), round(height * frac)
    x1, y1 = round(width * 0.37), round(height * 0.41)
    return (x1, y1, x1 + bw, y1 + bh)


def zoom_turn(box: tuple[int, int, int, int]) -> str:
    call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": list(box), "label": "the target"}}
    return f"<think>The target is small; zoom in.</think>\n<tool_call>\n{json.dumps(call)}\n</tool_call>"


def median_ms(fn: Callable[[], float], repeats: int, warmup: int = 3) -> float:
    """Median over ``repeats`` calls of ``fn``, which returns the seconds its timed part took."""
    for _ in range(warmup):
        fn()
    gc.collect()
    return 1000 * statistics.median(fn() for _ in range(repeats))


def floor_crop(pil: Image.Image, box: tuple[int, int, int, int]) -> float:
    t0 = time.perf_counter()
    pixels = np.asarray(pil.crop(box))
    elapsed = time.perf_counter() - t0
    assert pixels.shape[0] == box[3] - box[1]
    return elapsed


def deepeyes_style_step(pil: Image.Image, turn: str) -> float:
    """Parse the turn, crop with PIL, round-trip the crop through PNG bytes (as DeepEyes does)."""
    t0 = time.perf_counter()
    call = json.loads(TOOL_CALL.findall(turn)[-1].strip())
    x1, y1, x2, y2 = call["arguments"]["bbox_2d"]
    crop = pil.crop((max(0, x1), max(0, y1), min(pil.width, x2), min(pil.height, y2)))
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    pixels = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    elapsed = time.perf_counter() - t0
    assert pixels.shape == (y2 - y1, x2 - x1, 3)
    return elapsed


class EnvStepper:
    """Times ``env.step`` alone: each call resets (untimed) and then times one zoom turn."""

    def __init__(self, image: np.ndarray, turn: str, copy: bool):
        import gymnasium as gym

        import deepeyes_envs  # noqa: F401  (registers the envs)

        self.env = gym.make("visual_toolbox_v2")
        self.image, self.turn, self.copy = image, turn, copy
        self.options = {"image": image, "question": "What colour is the target?", "answer": "A"}

    def __call__(self) -> float:
        self.env.reset(options=self.options)
        t0 = time.perf_counter()
        obs, _, terminated, _, info = self.env.step(self.turn)
        crop = obs["messages"][0]["content"][1]["image"]
        if self.copy:
            crop = np.array(crop)
        elapsed = time.perf_counter() - t0
        if terminated or info["error"]:
            raise RuntimeError(f"the zoom step failed: {info}")
        return elapsed


def time_steps(repeats: int, frac: float, sizes: tuple[tuple[int, int], ...] = SIZES) -> list[dict]:
    rows = []
    for width, height in sizes:
        image = synthetic_image(width, height)
        pil = Image.fromarray(image)
        box = zoom_box(width, height, frac)
        turn = zoom_turn(box)
        rows.append({
            "image": f"{width}x{height}",
            "crop": f"{box[2] - box[0]}x{box[3] - box[1]}",
            "step": median_ms(EnvStepper(image, turn, copy=False), repeats),
            "step_copy": median_ms(EnvStepper(image, turn, copy=True), repeats),
            "floor": median_ms(lambda pil=pil, box=box: floor_crop(pil, box), repeats),
            "png": median_ms(lambda pil=pil, turn=turn: deepeyes_style_step(pil, turn), repeats),
        })
    return rows


def print_step_table(rows: list[dict], repeats: int) -> None:
    """Print the timing table, each row marked with whether it meets both targets."""
    print(f"== one zoom step, visual_toolbox_v2 (median of {repeats}, milliseconds) ==")
    head = ("image", "crop", "step", "step+copy", "floor (a)", "PNG (b)", "step/floor", "(b)/step", "targets")
    fmt = "{:<10} {:<9} {:>8} {:>9} {:>9} {:>8} {:>10} {:>8}  {}"
    print(fmt.format(*head))
    for r in rows:
        step_ratio, png_ratio = r["step"] / r["floor"], r["png"] / r["step"]
        ok = step_ratio <= STEP_TARGET and png_ratio >= PNG_TARGET
        print(fmt.format(r["image"], r["crop"], f"{r['step']:.3f}", f"{r['step_copy']:.3f}", f"{r['floor']:.3f}",
                         f"{r['png']:.2f}", f"{step_ratio:.2f}x", f"{png_ratio:.0f}x", "met" if ok else "MISSED"))
    print(f"targets: step/floor <= {STEP_TARGET}, (b)/step >= {PNG_TARGET:g}. "
          "step returns a read-only view of the original; step+copy also copies the crop out.")


# --- section 2: peak RSS over a parquet file of 4K tasks ----------------------------------------


def _png_of(args: tuple[int, int, int, int]) -> bytes:
    """PNG bytes of synthetic task ``index`` (run in a worker process)."""
    from deepeyes_envs.synthetic import SyntheticTaskSource

    n, index, width, height = args
    return SyntheticTaskSource(n=n, seed=0, width=width, height=height)[index].images[0].to_bytes()


def _tasks_with_png(n: int, width: int, height: int, jobs: int) -> Iterator:
    """Synthetic tasks with their images pre-encoded by ``jobs`` worker processes, in order."""
    from deepeyes_envs.images import LazyImage
    from deepeyes_envs.synthetic import SyntheticTaskSource

    source = SyntheticTaskSource(n=n, seed=0, width=width, height=height)
    work = [(n, i, width, height) for i in range(n)]
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for i, png in enumerate(pool.imap(_png_of, work, chunksize=4)):
            task = source[i]
            yield dataclasses.replace(task, images=(LazyImage(png, name=task.images[0].name),))


def build_parquet(path: Path, n: int, width: int, height: int, jobs: int) -> float:
    """Write (or reuse) the parquet file of ``n`` synthetic tasks; return seconds spent writing."""
    from deepeyes_envs.data.parquet import write_deepeyes_parquet

    if path.exists():
        return 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    written = write_deepeyes_parquet(_tasks_with_png(n, width, height, jobs), path)
    assert written == n
    return time.perf_counter() - t0


RSS_CHILD = """
import sys, time
import gymnasium as gym
import deepeyes_envs
from deepeyes_envs.data.parquet import load_deepeyes_parquet

def peak_mb():
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec,
    # so a child of a large process would report the parent's peak.
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024

source = load_deepeyes_parquet(sys.argv[1])
env = gym.make("visual_toolbox_v2", task_source=source)
before = peak_mb()
turn = ('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [1000, 500, 1900, 1000]}}'
        '</tool_call>')
t0 = time.perf_counter()
for i in range(len(source)):
    _, info = env.reset(options={"task": source[i]})
    _, _, _, _, step_info = env.step(turn)
    assert step_info["error"] is None, step_info["error"]
print(len(source), info["image_size"][0], info["image_size"][1], before, peak_mb(), time.perf_counter() - t0)
"""


def measure_rss(path: Path) -> dict:
    """Reset an env on every task of ``path`` in a fresh process; its peak RSS before and after."""
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{out.stderr}")
    n, width, height, before, peak, seconds = out.stdout.split()
    return {"tasks": int(n), "image": f"{width}x{height}", "before_mb": float(before), "peak_mb": float(peak),
            "seconds": float(seconds), "file_mb": path.stat().st_size / 2**20}


def print_rss_table(r: dict, target_mb: float) -> None:
    print("== peak RSS, one env resetting on every task of a parquet file (+ one zoom step each) ==")
    fmt = "{:>6} {:<10} {:>10} {:>14} {:>13} {:>9} {:>8}  {}"
    print(fmt.format("tasks", "image", "file MB", "RSS at start", "peak RSS MB", "s/reset", "total s", "target"))
    ok = r["peak_mb"] < target_mb
    print(fmt.format(r["tasks"], r["image"], f"{r['file_mb']:.0f}", f"{r['before_mb']:.0f}", f"{r['peak_mb']:.0f}",
                     f"{r['seconds'] / r['tasks']:.3f}", f"{r['seconds']:.1f}",
                     f"< {target_mb:.0f} MB {'met' if ok else 'MISSED'}"))


# --- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions and 8 tasks: a smoke run")
    parser.add_argument("--repeats", type=int, help="timed steps per measurement (default 300, quick 15)")
    parser.add_argument("--box-frac", type=float, default=0.25, help="zoom box side as a fraction of the image's")
    parser.add_argument("--rss-tasks", type=int, help="4K tasks in the parquet file (default 2000, quick 8)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder for the cached parquet file")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="processes encoding PNGs")
    parser.add_argument("--skip-rss", action="store_true", help="time steps only")
    args = parser.parse_args(argv)
    repeats = args.repeats or (15 if args.quick else 300)
    n_tasks = args.rss_tasks or (8 if args.quick else 2000)

    steps = time_steps(repeats, args.box_frac)
    print_step_table(steps, repeats)
    if not args.skip_rss:
        print()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) if args.quick else args.cache
            path = folder / f"synthetic_4k_{n_tasks}.parquet"
            seconds = build_parquet(path, n_tasks, 3840, 2160, args.jobs)
            if seconds:
                print(f"(wrote {path} in {seconds:.0f} s)")
            print_rss_table(measure_rss(path), RSS_TARGET_MB)
    largest = steps[-1]
    print(f"RESULT env_step: {largest['png'] / largest['step']:.0f}x (target >= {PNG_TARGET:g}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
