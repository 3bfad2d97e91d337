"""How many sandboxed executions per second does the code tool sustain, warm pool against cold starts?

Three programs, each run in two ways in the same run, on the same images and with the same sandbox:

* **warm pool**: one ``SandboxPool`` worker (numpy and PIL imported, namespaces built) forks a fresh
  child per execution; this is what ``python_tool`` does;
* **fresh interpreter** (the baseline): a new worker per execution (interpreter start, imports,
  namespaces, then the execution and the worker's end), as a sandbox without a pool would.

The programs: a trivial ``print``; the demo's counting program on a counting task (an image in, a mask
out); a crop and contrast boost of a 1080p image. Also shown: ``env.step`` of ``visual_code`` running
the counting program (the tool inside the env, warm). Target: warm / fresh >= 5x for every program; the
RESULT line reports the smallest ratio.

    python benchmarks/code_tool.py            # about a minute
    python benchmarks/code_tool.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

TARGET = 5.0


def programs() -> list[tuple[str, str, list[np.ndarray]]]:
    """(name, code, images) of each benchmarked program."""
    from deepeyes_envs.scripted import COUNT_CODE
    from deepeyes_envs.synthetic import SyntheticTaskSource

    count = SyntheticTaskSource(n=1, seed=0, kind="count")[0]
    photo = SyntheticTaskSource(n=1, seed=0)[0].images[0].load()
    enhance = ("from PIL import ImageEnhance\n"
               "show(ImageEnhance.Contrast(images[0].crop((480, 270, 1440, 810))).enhance(2.0))")
    return [
        ("trivial print", "print(1 + 1)", []),
        ("count dots 448x336", COUNT_CODE.format(rgb=count.extra["rgb"], color=count.extra["color"]),
         [count.images[0].load()]),
        ("enhance 1080p crop", enhance, [photo]),
    ]


def timed(fn: Callable[[], None], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def checked(result) -> None:
    if not result.ok:
        raise RuntimeError(f"a benchmarked program failed: {result.status}: {result.error}")


def measure(repeats_warm: int, repeats_fresh: int) -> list[dict]:
    from deepeyes_envs.sandbox import SandboxPool

    def fresh(code: str, images: list[np.ndarray]) -> None:
        with SandboxPool() as cold:
            checked(cold.run(code, images))

    rows = []
    with SandboxPool() as pool:
        for name, code, images in programs():
            checked(pool.run(code, images))  # warm up the worker's caches for this program
            warm = timed(lambda code=code, images=images: checked(pool.run(code, images)), repeats_warm)
            cold = timed(lambda code=code, images=images: fresh(code, images), repeats_fresh)
            rows.append({"program": name, "warm": warm, "fresh": cold})
    return rows


def env_steps(repeats: int) -> list[float]:
    """Seconds per ``env.step`` of visual_code running the counting program (reset untimed)."""
    import gymnasium as gym

    import deepeyes_envs  # noqa: F401
    from deepeyes_envs.scripted import count_code_turn
    from deepeyes_envs.synthetic import SyntheticTaskSource

    env = gym.make("visual_code")
    tasks = SyntheticTaskSource(n=repeats, seed=0, kind="count")
    out = []
    try:
        for i in range(repeats):
            env.reset(seed=i, options={"task": tasks[i]})
            extra = tasks[i].extra
            turn = count_code_turn(extra["color"], extra["rgb"])
            t0 = time.perf_counter()
            *_, info = env.step(turn)
            out.append(time.perf_counter() - t0)
            if info["error"]:
                raise RuntimeError(f"the env step failed: {info['error']}")
    finally:
        env.close()
    return out


def print_table(rows: list[dict], steps: list[float]) -> float:
    """Print the table; return the first program's (the trivial one's) warm / fresh ratio."""
    print("== sandboxed executions, warm pool (fork per execution) vs a fresh interpreter per execution ==")
    fmt = "{:<20} {:>10} {:>10} {:>12} {:>12} {:>7}  {}"
    print(fmt.format("program", "warm/s", "fresh/s", "warm ms p50", "fresh ms p50", "ratio", "target"))
    ratios = []
    for r in rows:
        warm_rate, fresh_rate = len(r["warm"]) / sum(r["warm"]), len(r["fresh"]) / sum(r["fresh"])
        ratio = warm_rate / fresh_rate
        ratios.append(ratio)
        print(fmt.format(r["program"], f"{warm_rate:.1f}", f"{fresh_rate:.2f}",
                         f"{1000 * statistics.median(r['warm']):.1f}", f"{1000 * statistics.median(r['fresh']):.1f}",
                         f"{ratio:.1f}x", f">= {TARGET:g}x {'met' if ratio >= TARGET else 'MISSED'}"))
    print(f"env.step of visual_code with the counting program: {len(steps) / sum(steps):.1f} steps/s, "
          f"p50 {1000 * statistics.median(steps):.1f} ms (warm pool, over {len(steps)} steps)")
    return ratios[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--warm", type=int, help="warm executions per program (default 200, quick 20)")
    parser.add_argument("--fresh", type=int, help="fresh-interpreter executions per program (default 15, quick 3)")
    args = parser.parse_args(argv)
    warm = args.warm or (20 if args.quick else 200)
    fresh = args.fresh or (3 if args.quick else 15)
    ratio = print_table(measure(warm, fresh), env_steps(5 if args.quick else 50))
    print(f"RESULT code_tool: {ratio:.1f}x (target >= {TARGET:g}x)")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
