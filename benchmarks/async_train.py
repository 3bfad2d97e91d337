"""Trajectories learned per second: synchronous training beside asynchronous training at max_staleness 1.

The real trainer (``DeepEyesAlgorithm`` on a local Ray cluster, the tiny Qwen2.5-VL, two remote env runners,
the learner in the driver) plays ``paced`` episodes (``deepeyes_envs/paced.py``): each lasts 1 to 5 turns, most
short, a few long, as DeepEyes' zoom counts do, and each turn lasts at least ``--turn-latency`` seconds, standing
in for a generation on an accelerator (the tiny model's own takes milliseconds); a runner's episodes wait
together, as for one batched generation, so a runner's chunk lasts as long as its longest episode. A batch is
``--prompts`` groups of 2 rollouts. Synchronous training waits for the slowest runner, then updates while the
runners idle; at staleness 1 the runners keep playing the next batch during the update and a batch is made of
the first groups to finish. Each mode runs a warm-up iteration, then ``--iterations`` timed ones; the rate
is episodes learned / wall time of the timed iterations. ::

    python benchmarks/async_train.py                      # ~2 min on 2 cores
    python benchmarks/async_train.py --iterations 4 --turn-latency 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray

from deepeyes_agent.policy.tiny import build_tiny_qwen2_5_vl
from deepeyes_agent.training.config import load_config
from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig, iteration_record

TARGET = 1.4


def run_mode(model_dir: Path, staleness: int, args: argparse.Namespace) -> dict:
    cfg = load_config(None, [
        f"model.path={model_dir}", "env.env_id=paced", f"env.kwargs={{turn_latency_s: {args.turn_latency}}}",
        "data.n_train=512", "data.n_eval=0", f"rollout.prompts_per_iteration={args.prompts}",
        "rollout.rollouts_per_prompt=2", f"rollout.max_tokens={args.max_tokens}", "rollout.max_total_tokens=2048",
        "algorithm.micro_batch_size=8", "algorithm.entropy_coef=0.01", "optim.lr=1e-4",
        "resources.num_env_runners=2", "resources.num_cpus_per_env_runner=1", "resources.torch_threads=1",
        f"algorithm.max_staleness={staleness}", f"seed={args.seed}"])
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        algo.train()  # warm-up: first generation, first update
        episodes, waits, updates, staleness_sum, turns = 0, 0.0, 0.0, 0.0, 0.0
        start = time.perf_counter()
        for _ in range(args.iterations):
            m = iteration_record(algo.train())
            episodes += int(m["episodes"])
            waits += m["time/rollout_s"]
            updates += m.get("time/update_s", 0.0)
            staleness_sum += m["async/staleness_mean"] * m["episodes"]
            turns += m["turns"] * m["episodes"]
        seconds = time.perf_counter() - start
        return {"mode": "synchronous" if staleness == 0 else f"max_staleness {staleness}", "episodes": episodes,
                "seconds": seconds, "per_s": episodes / seconds, "wait_s": waits / args.iterations,
                "update_s": updates / args.iterations, "staleness": staleness_sum / max(1, episodes),
                "dropped_groups": int(m.get("async/dropped_groups", 0.0)),
                "turns": turns / max(1, episodes)}
    finally:
        algo.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per mode")
    parser.add_argument("--prompts", type=int, default=4, help="groups per batch (2 rollouts each)")
    parser.add_argument("--turn-latency", type=float, default=0.3, help="seconds a turn lasts at least")
    parser.add_argument("--max-tokens", type=int, default=8, help="most tokens the policy generates per turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 1024**2,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_tiny_qwen2_5_vl(Path(tmp) / "tiny", seed=0)
            rows = [run_mode(model_dir, staleness, args) for staleness in (0, 1)]
    finally:
        ray.shutdown()
    ratio = rows[1]["per_s"] / rows[0]["per_s"]
    print(f"\n{args.iterations} timed iterations per mode, {args.prompts} groups x 2 rollouts per batch, "
          f"2 env runners, turns of at least {args.turn_latency} s\n")
    print("| mode | episodes | turns/episode | seconds | episodes/s | wait for data s/it | update s/it | "
          "mean staleness | dropped groups | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['mode']} | {row['episodes']} | {row['turns']:.2f} | {row['seconds']:.1f} | {row['per_s']:.2f} "
              f"| {row['wait_s']:.2f} | {row['update_s']:.2f} | {row['staleness']:.2f} | {row['dropped_groups']} | "
              f"{row['per_s'] / rows[0]['per_s']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2))
    print(f"RESULT async_train: {ratio:.2f}x (target >= {TARGET}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
