"""Asynchronous training with bounded staleness (``algorithm.max_staleness``) on a real Ray cluster: the
sampler at staleness 0 is the synchronous run, at 1 it samples during updates, corrects stale episodes and
drops batches that are too old, and a runner killed with work in flight loses none of it. Tiny Qwen2.5-VL, two
remote env runners, no mocks."""

from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")

from deepeyes_agent.training.config import load_config  # noqa: E402
from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig, iteration_record  # noqa: E402
from deepeyes_agent.training.rllib.async_sampling import AsyncSampler  # noqa: E402

pytestmark = pytest.mark.slow
COMPARED = ("reward", "acc", "episodes", "pg_loss", "entropy", "grad_norm", "approx_kl", "clip_fraction",
            "response_length", "logprob_gap_mean")


def two_runner_config(model_dir, *overrides: str):
    base = ["env.env_id=plain", "data.n_train=64", "data.n_eval=8", "rollout.prompts_per_iteration=4",
            "rollout.rollouts_per_prompt=2", "rollout.max_tokens=12", "rollout.max_total_tokens=512",
            "optim.lr=1e-3", "optim.weight_decay=0.0", "algorithm.micro_batch_size=4", "resources.torch_threads=1",
            "algorithm.entropy_coef=0.01", "resources.num_env_runners=2", "resources.num_cpus_per_env_runner=1",
            f"model.path={model_dir}"]
    return load_config(None, base + list(overrides))


def train(algo, iterations: int) -> tuple[list[dict], list[torch.Tensor]]:
    curves = []
    for _ in range(iterations):
        curves.append(iteration_record(algo.train()))
    return curves, [p.detach().clone() for p in algo.learner_group._learner.model.parameters()]


def test_the_sampler_without_staleness_is_the_synchronous_run(ray_local, tiny_model_dir):
    cfg = two_runner_config(tiny_model_dir)
    assert cfg.algorithm.max_staleness == 0
    sync = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        assert sync.sampler is None
        sync_curves, sync_params = train(sync, 2)
    finally:
        sync.stop()
    pipelined = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        pipelined.sampler = AsyncSampler(pipelined, cfg)
        curves, params = train(pipelined, 2)
        assert pipelined.sampler.groups_in_flight() == 0  # nothing is played during an update at k = 0
        assert all(c["async/queued_groups"] == 0.0 for c in curves)
    finally:
        pipelined.stop()
    for ours, theirs in zip(curves, sync_curves, strict=True):
        assert {k: ours[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
        assert ours["async/staleness_max"] == 0.0 and ours["async/dropped_groups"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(params, sync_params, strict=True))


def test_staleness_one_samples_during_updates_corrects_and_drops(ray_local, tiny_model_dir):
    cfg = two_runner_config(tiny_model_dir, "algorithm.max_staleness=1")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        curves, _ = train(algo, 3)
        first, later = curves[0], curves[1:]
        assert first["async/staleness_max"] == 0.0  # nothing was sampled before the first update
        assert first["async/queued_groups"] == 4  # the next batch went out before the update started
        for metrics in later:
            assert metrics["episodes"] == 8
            assert metrics["async/staleness_max"] == 1.0  # played while the learner updated
            assert 0.0 < metrics["async/is_weight_mean"] <= cfg.algorithm.is_truncation
        assert algo.policy_version == 3
        # work in flight survives a checkpoint: its tasks are saved, to be played first after a restore
        pending = algo.sampler.pending_tasks()
        assert len(pending) == curves[-1]["async/queued_groups"] == 4
        state = algo.get_state()
        assert state["deepeyes"]["pending_tasks"] == pending and state["deepeyes"]["policy_version"] == 3
        # held-out evaluation plays with the current weights, though the runners were busy since the last update
        algo.evaluate_heldout(n_tasks=2)
        versions = algo.env_runner_group.foreach_env_runner(lambda r: r.policy_version, local_env_runner=False)
        assert versions == [algo.policy_version] * 2
        # Tighten the bound: the batch already playing was sampled one update ago, so it is dropped,
        # counted, and the iteration refills with fresh groups.
        algo.sampler.max_staleness = 0
        metrics = iteration_record(algo.train())
        assert metrics["async/dropped_groups"] - curves[-1]["async/dropped_groups"] == 4.0
        assert metrics["episodes"] == 8 and metrics["async/staleness_max"] == 0.0
    finally:
        algo.stop()


def test_a_runner_killed_with_work_in_flight_loses_no_task_and_returns_with_current_weights(ray_local, tiny_model_dir):
    # long enough episodes that the next batch's chunks are still playing when train() returns
    cfg = two_runner_config(tiny_model_dir, "algorithm.max_staleness=1", "rollout.max_tokens=256",
                            "rollout.max_total_tokens=1024")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        iteration_record(algo.train())  # the next batch went out before the update: a chunk on each runner
        sampler = algo.sampler
        victim, survivor = sorted(sampler.in_flight)
        lost_tasks = [t for chunk in sampler.in_flight[victim] for t in chunk.tasks]
        ray.kill(algo.env_runner_group._worker_manager._actors[victim], no_restart=False)
        deadline = time.monotonic() + 60
        while victim in sampler.in_flight and time.monotonic() < deadline:
            sampler.receive()
        assert sampler.lost_chunks == 1 and sampler.requeued == lost_tasks  # its tasks go out again, first
        metrics = iteration_record(algo.train())
        assert metrics["episodes"] == 8 and len(metrics["env_runner_pids"]) == 1  # the survivor played them all
        deadline = time.monotonic() + 240  # the restarted actor reloads its model: wait for RLlib's probe
        while algo.env_runner_group.num_healthy_remote_env_runners() < 2 and time.monotonic() < deadline:
            time.sleep(2)
            algo.restore_env_runners(algo.env_runner_group)
        assert algo.env_runner_group.num_healthy_remote_env_runners() == 2
        assert iteration_record(algo.train())["episodes"] == 8  # the restarted runner is given work again ...
        versions = algo.env_runner_group.foreach_env_runner(lambda r: r.policy_version, local_env_runner=False)
        assert len(set(versions)) == 1 and versions[0] >= algo.policy_version - 1, versions  # ... with the weights
    finally:
        algo.stop()
