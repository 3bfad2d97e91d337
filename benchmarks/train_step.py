"""Seconds per RL iteration split by phase, and learner tokens per second, for the tiny CPU config.

Runs a few iterations of ``configs/tiny_cpu.yaml`` (tiny Qwen2.5-VL, toy tasks, local mode, no SFT) and
prints the mean of each phase (rollout = generation + env + judge, of which generation and judge are shown
apart; update; weight sync) over the iterations after the first (warm-up), with its share of the
iteration's wall time (the baseline of the same run), plus learner and rollout tokens per second::

    python benchmarks/train_step.py                  # 6 iterations, 1 warm-up
    python benchmarks/train_step.py --iterations 10 rollout.prompts_per_iteration=16

Extra ``key=value`` arguments override the config like train.py's. Numbers depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("time/rollout_s", "time/generate_s", "time/judge_s", "time/update_s", "time/weight_sync_s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from deepeyes_agent.training.config import load_config
    from deepeyes_agent.training.driver import prepare_run_dir, start_ray
    from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig, iteration_record

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml",
                          [f"logging.run_dir={tmp}/run", "sft.steps=0", *args.overrides])
        prepare_run_dir(cfg)
        started = start_ray(cfg, None)
        algo = DeepEyesConfig.from_run_config(cfg).build_algo()
        rows = []
        try:
            for _ in range(args.iterations):
                t0 = time.perf_counter()
                rows.append({**iteration_record(algo.train()), "wall_s": time.perf_counter() - t0})
        finally:
            algo.stop()
            if started:
                ray.shutdown()
    measured = rows[args.warmup:] or rows
    summary = {k: statistics.mean(r[k] for r in measured) for k in (*PHASES, "wall_s")}
    summary["learner_tokens_per_s"] = statistics.mean(r["learner_tokens_per_s"] for r in measured)
    summary["rollout_tokens_per_s"] = statistics.mean(r["rollout_tokens_per_s"] for r in measured)
    summary["trajectories"] = measured[0]["episodes"]
    summary["mean_tokens_per_trajectory"] = statistics.mean(r["tokens"] for r in measured)
    if args.json:
        print(json.dumps(summary))
        return
    print(f"tiny_cpu, {summary['trajectories']:.0f} trajectories of {summary['mean_tokens_per_trajectory']:.0f} "
          f"tokens per iteration, mean of {len(measured)} iterations after {args.warmup} warm-up")
    print(f"{'phase':<22}{'seconds':>10}{'x wall':>10}")  # the share: comparable across loaded machines
    for key in (*PHASES, "wall_s"):
        print(f"{key.removeprefix('time/'):<22}{summary[key]:>10.3f}{summary[key] / summary['wall_s']:>10.2f}")
    print(f"{'learner tokens/s':<22}{summary['learner_tokens_per_s']:>10.0f}")
    print(f"{'rollout tokens/s':<22}{summary['rollout_tokens_per_s']:>10.0f}")
    accounted = sum(summary[k] for k in ("time/rollout_s", "time/update_s", "time/weight_sync_s")) / summary["wall_s"]
    print(f"RESULT train_step: {accounted:.2f}x (target >= 0.9x)")  # the iteration's time spent in its phases


if __name__ == "__main__":
    main()
