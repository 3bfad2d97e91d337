"""Rollout throughput: the batched loop beside one episode at a time, with and without KV-cache reuse.

Tiny random Qwen2.5-VL on the CPU, ``visual_toolbox_v2`` toy-zoom tasks (224x224 images). A random
model never writes a tool call, so the envs are driven by ``ScriptedActions``: three zooms (crops of
different sizes) then an answer, i.e. 4 turns per episode, while the model samples every turn for
real (``max_tokens`` tokens at temperature 1, no stop strings; ``<|im_end|>`` may end a turn early).
Throughput counts generated tokens over the loop's whole wall time (reset, generation, env steps, judge),
and over the process CPU time; each mode's fastest of ``--repeats`` rounds counts. The baseline is one episode at a time
without KV reuse; the line before the RESULT compares the batched cached mode with one episode at a time
with the cache. One torch thread by default: on a two-core machine shared with other jobs, two threads'
spin-waits between the tiny model's many small ops made the same runs 3 to 25 times slower, and noisy.

    python benchmarks/rollout.py                       # 16 episodes x 4 turns, prints a markdown table
    python benchmarks/rollout.py --episodes 4 --max-tokens 8 --repeats 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from deepeyes_agent.policy.loading import load_policy  # noqa: E402
from deepeyes_agent.policy.tiny import build_tiny_qwen2_5_vl  # noqa: E402
from deepeyes_agent.rollout.engine import SamplingParams  # noqa: E402
from deepeyes_agent.rollout.hf_engine import HFEngine  # noqa: E402
from deepeyes_agent.rollout.loop import run_episodes  # noqa: E402
from deepeyes_agent.rollout.scripted import ScriptedActions  # noqa: E402
from deepeyes_agent.rollout.trajectory import TrajectoryBatch  # noqa: E402
from deepeyes_envs.synthetic import SyntheticTaskSource  # noqa: E402

MODES = (("one-at-a-time", False), ("one-at-a-time", True), ("batched", False), ("batched", True))


def play(mode: str, reuse: bool, model: Any, processor: Any, tasks: list, n_per_task: int,
         params: SamplingParams, seed: int) -> dict[str, Any]:
    """Run all episodes in one mode and return its row of measurements."""
    engine = HFEngine(model, processor, reuse_kv_cache=reuse)
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "batched":
        batches = [run_episodes(tasks, engine, processor, n_per_task=n_per_task, sampling=params, seed=seed,
                                env_wrapper=ScriptedActions)]
    else:
        batches = [run_episodes([task], engine, processor, n_per_task=1, sampling=params, seed=seed + 100 * g + k,
                                env_wrapper=ScriptedActions)
                   for g, task in enumerate(tasks) for k in range(n_per_task)]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    trajectories = TrajectoryBatch(t for b in batches for t in b)
    tokens = sum(t.n_generated_tokens for t in trajectories)
    generate_s = sum(b.timings["generate_s"] for b in batches)
    return {"mode": mode, "kv_reuse": reuse, "episodes": len(trajectories),
            "turns": sum(t.n_turns for t in trajectories),
            "images": sum(len(t.images) for t in trajectories), "generated_tokens": tokens,
            "wall_s": wall, "cpu_s": cpu, "generate_s": generate_s, "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / cpu,
            "generate_tokens_per_s": tokens / generate_s}


def run_benchmark(model_dir: str | Path | None = None, episodes: int = 16, n_tasks: int = 4, max_tokens: int = 32,
                  seed: int = 0, threads: int = 1, repeats: int = 3) -> list[dict[str, Any]]:
    """All four modes on the same tasks and sampling settings, ``repeats`` rounds of the four in turn (so a load
    change on a shared machine hits every mode alike), each mode's fastest round kept; rows carry ratios to the
    baseline."""
    torch.set_num_threads(threads)
    if n_tasks < 1 or episodes % n_tasks:
        raise ValueError(f"episodes ({episodes}) must be a multiple of n_tasks ({n_tasks})")
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load_policy(model_dir or build_tiny_qwen2_5_vl(Path(tmp) / "tiny"))
    source = SyntheticTaskSource(n=n_tasks, seed=seed, kind="toy_zoom")
    tasks = [source[i] for i in range(n_tasks)]
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0, stop=())
    play("batched", False, model, processor, tasks[:1], 1, params, seed)  # warm-up (lazy inits, allocator)
    rounds = [[play(mode, reuse, model, processor, tasks, episodes // n_tasks, params, seed) for mode, reuse in MODES]
              for _ in range(repeats)]
    rows = [min(runs, key=lambda r: r["wall_s"]) for runs in zip(*rounds, strict=True)]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["cpu_speedup"] = row["tokens_per_cpu_s"] / rows[0]["tokens_per_cpu_s"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| mode | KV reuse | episodes | turns | images | generated tokens | wall s | CPU s | tokens/s "
             "| tokens/CPU s | x baseline (wall) | x baseline (CPU) |", "|---" * 12 + "|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {'yes' if r['kv_reuse'] else 'no'} | {r['episodes']} | {r['turns']} | "
                     f"{r['images']} | {r['generated_tokens']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['cpu_speedup']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", default=None, help="a local model directory (default: build the tiny model)")
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=4, help="distinct tasks; episodes/tasks rollouts each")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all modes; each mode's fastest is kept")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run_benchmark(args.model_dir, args.episodes, args.tasks, args.max_tokens, args.seed, args.threads,
                         args.repeats)
    print(format_table(rows))
    best = rows[-1]  # batched with KV reuse, against one episode at a time without it
    print(f"batched with KV reuse / one-at-a-time with KV reuse: {best['speedup'] / rows[1]['speedup']:.2f}x "
          "(target >= 1.5x)")
    print(f"RESULT rollout: {best['speedup']:.2f}x (target >= 6x)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
