"""The RLlib trainer on the CPU with the tiny Qwen2.5-VL: local mode, remote env runners (with a failure),
two data-parallel learners, and RLlib checkpoints. Real Ray, real models, no mocks."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from ray.rllib.core import DEFAULT_MODULE_ID  # noqa: E402

from deepeyes_agent.policy.chat import EpisodeContext  # noqa: E402
from deepeyes_agent.rollout.engine import SamplingParams  # noqa: E402
from deepeyes_agent.rollout.hf_engine import HFEngine  # noqa: E402
from deepeyes_agent.training.batch import PackedEpisode, assign_advantages  # noqa: E402
from deepeyes_agent.training.config import load_config  # noqa: E402
from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig, iteration_record  # noqa: E402
from deepeyes_envs.messages import image_part, message  # noqa: E402

pytestmark = pytest.mark.slow


def tiny_config(model_dir, *overrides: str):
    base = ["env.env_id=plain", "data.n_train=64", "data.n_eval=8", "rollout.prompts_per_iteration=4",
            "rollout.rollouts_per_prompt=2", "rollout.max_tokens=12", "rollout.max_total_tokens=512",
            "optim.lr=1e-3", "optim.weight_decay=0.0", "algorithm.micro_batch_size=4", "resources.torch_threads=1",
            f"model.path={model_dir}"]
    return load_config(None, base + list(overrides))


def _params(algo) -> list[torch.Tensor]:
    return [p.detach().clone() for p in algo.learner_group._learner.model.parameters()]


def test_local_mode_trains_saves_and_restores(ray_local, tiny_model_dir, tmp_path):
    # entropy bonus and KL to the reference: a gradient even when every rollout of a group scores the same
    cfg = tiny_config(tiny_model_dir, "sft.steps=2", "sft.batch_size=4", "sft.n_demos=8",
                      "algorithm.entropy_coef=0.01", "algorithm.kl_coef=0.05")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        assert algo.env_runner is not None and algo.learner_group.is_local
        before = _params(algo)
        history = algo.run_sft()
        assert len(history) == 2 and history[-1]["sft_nll"] < history[0]["sft_nll"]
        metrics = iteration_record(algo.train())
        assert metrics["episodes"] == 8  # 4 prompts x 2 rollouts
        for key in ("reward", "acc", "format_error", "tool_call_rate", "invalid_call_rate", "response_length",
                    "entropy", "clip_fraction", "grad_norm", "approx_kl", "learner_tokens_per_s",
                    "time/rollout_s", "time/judge_s", "time/update_s", "time/weight_sync_s"):
            assert key in metrics, key
        assert metrics["grad_norm"] > 0
        assert metrics["clip_fraction"] == 0.0 and abs(metrics["approx_kl"]) < 1e-6  # on-policy: ratio 1
        assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the SFT policy itself
        after = _params(algo)
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        # the env runner's engine got the learner's new weights
        engine_params = list(algo.env_runner.engine.model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(after, engine_params, strict=True))
        position = algo.schedule.get_state()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
        algo.train()  # move on, then come back
        assert algo.schedule.get_state() != position
    finally:
        algo.stop()
    restored = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        restored.restore_from_path(path)
        assert restored.iteration == 1 and restored.sft_done
        assert restored.schedule.get_state() == position
        assert all(torch.equal(a, b) for a, b in zip(after, _params(restored), strict=True))
        optimizer = restored.learner_group._learner.get_optimizer()
        assert optimizer.state, "optimizer moments were restored"
        engine_params = list(restored.env_runner.engine.model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(after, engine_params, strict=True))
    finally:
        restored.stop()


def test_two_remote_env_runners_share_the_batch_and_survive_a_crash(ray_local, tiny_model_dir):
    cfg = tiny_config(tiny_model_dir, "resources.num_env_runners=2", "resources.num_cpus_per_env_runner=1")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        assert algo.env_runner is None and algo.env_runner_group.num_remote_env_runners() == 2
        assert algo.config.restart_failed_env_runners
        metrics = iteration_record(algo.train())
        assert metrics["env_runners"] == 2 and len(metrics["env_runner_pids"]) == 2
        assert metrics["episodes"] == 8
        # kill one runner; the next iteration goes on with the other, then RLlib restarts it
        victim = algo.env_runner_group._worker_manager._actors[algo.env_runner_group.healthy_env_runner_ids()[0]]
        ray.kill(victim, no_restart=False)
        assert iteration_record(algo.train())["episodes"] >= 4
        deadline = time.monotonic() + 240  # the restarted actor reloads its model: wait for RLlib's probe
        while algo.env_runner_group.num_healthy_remote_env_runners() < 2 and time.monotonic() < deadline:
            time.sleep(2)
            algo.restore_env_runners(algo.env_runner_group)
        assert algo.env_runner_group.num_healthy_remote_env_runners() == 2
        metrics = iteration_record(algo.train())
        assert metrics["env_runners"] == 2 and metrics["episodes"] == 8
    finally:
        algo.stop()


@pytest.mark.parametrize("advantage", ["grpo", "gae"])  # gae: the value head is all-reduced like the rest
def test_two_learners_keep_identical_parameters(ray_local, tiny_model_dir, advantage):
    # the entropy bonus gives a gradient whatever the sampled rewards (the random tiny model's are mostly all 0)
    cfg = tiny_config(tiny_model_dir, "resources.num_learners=2", "resources.num_cpus_per_learner=1",
                      "algorithm.minibatches=2", "sft.steps=1", "sft.batch_size=4", "sft.n_demos=8",
                      f"algorithm.advantage={advantage}", "algorithm.entropy_coef=0.01")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        ranks = [r.get() for r in algo.learner_group.foreach_learner(lambda learner: learner.node_and_rank())]
        assert sorted(rank for _, rank, _ in ranks) == [0, 1] and all(world == 2 for _, _, world in ranks)
        start = algo.learner_checksums()
        algo.run_sft()
        algo.train()
        metrics = iteration_record(algo.train())
        sums = algo.learner_checksums()
        assert len(sums) == 2
        assert sums[0] == sums[1], "learners diverged"
        assert sums[0] != start[0], "parameters did not change"
        assert metrics["grad_norm"] > 0
    finally:
        algo.stop()


def _learner_weights(algo) -> dict[str, torch.Tensor]:
    algo.stage_learner_state()
    return algo.learner_group.get_weights()[DEFAULT_MODULE_ID]


def test_fsdp2_learners_match_unsharded_learners_and_share_checkpoints(ray_local, tiny_model_dir, tmp_path):
    overrides = ["resources.num_learners=2", "resources.num_cpus_per_learner=1", "algorithm.minibatches=2",
                 "sft.steps=1", "sft.batch_size=4", "sft.n_demos=8", "algorithm.entropy_coef=0.01"]
    sharded_cfg = tiny_config(tiny_model_dir, *overrides, "resources.learner_sharding=fsdp2")
    algo = DeepEyesConfig.from_run_config(sharded_cfg).build_algo()
    try:
        start = _learner_weights(algo)
        algo.run_sft()
        assert iteration_record(algo.train())["grad_norm"] > 0
        sharded = _learner_weights(algo)
        assert set(sharded) == set(start) and all(v.shape == start[k].shape for k, v in sharded.items())
        # the env runner got the full weights
        engine = algo.env_runner.engine.model.state_dict()
        assert all(torch.equal(engine[k], v) for k, v in sharded.items())
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    plain = DeepEyesConfig.from_run_config(tiny_config(tiny_model_dir, *overrides)).build_algo()
    try:
        assert all(torch.equal(v, start[k]) for k, v in _learner_weights(plain).items())
        plain.run_sft()
        plain.train()
        unsharded = _learner_weights(plain)
        for k, v in unsharded.items():  # same start, same data: the same update up to float32 rounding
            assert torch.allclose(v, sharded[k], rtol=1e-5, atol=1e-5), k
        assert any(not torch.equal(v, start[k]) for k, v in unsharded.items())
        plain.restore_from_path(path)  # an FSDP2 checkpoint loads into unsharded learners
        assert all(torch.equal(v, sharded[k]) for k, v in _learner_weights(plain).items())
        plain.train()
        assert plain.iteration == 2
        trained = _learner_weights(plain)
        path = plain.save_to_path(str(tmp_path / "ckpt-plain"))
    finally:
        plain.stop()
    resharded = DeepEyesConfig.from_run_config(sharded_cfg).build_algo()
    try:  # and the other way: an unsharded checkpoint (module and AdamW state) loads into FSDP2 learners
        resharded.restore_from_path(path)
        assert all(torch.equal(v, trained[k]) for k, v in _learner_weights(resharded).items())
        metrics = iteration_record(resharded.train())
        assert resharded.iteration == 3 and metrics["grad_norm"] > 0
    finally:
        resharded.stop()


def _uneven_episodes(policy) -> list[PackedEpisode]:
    """Three image episodes, then two text-only ones, each with one turn sampled by the tiny model: split over
    two learners with micro-batches of one, learner 0 runs three micro-batches with images and learner 1 two
    text-only ones, the case that used to hang FSDP2 learners."""
    rng = np.random.default_rng(0)
    prompts = [[message("user", image_part(rng.integers(0, 255, (56 + 28 * i, 84, 3), dtype=np.uint8)),
                        "What colour dominates?")] for i in range(3)]
    prompts += [[message("user", "What is two plus two?")], [message("user", "Name a colour.")]]
    contexts = [EpisodeContext(policy.processor, p, max_total_tokens=512) for p in prompts]
    gens = HFEngine(policy.model, policy.processor).generate(contexts, SamplingParams(max_tokens=8, seed=0))
    episodes = []
    for i, (ctx, gen) in enumerate(zip(contexts, gens, strict=True)):
        ctx.append_generated(gen.token_ids, gen.logprobs)
        episodes.append(PackedEpisode.from_context(ctx, reward=float(i % 2), group_id=int(i >= 3)))
    return episodes


@pytest.mark.timeout(900)  # a lockstep bug shows as a hang
@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_fsdp2_learners_stay_in_lockstep_on_uneven_text_and_image_shards(ray_local, tiny_model_dir, policy,
                                                                          advantage):
    overrides = ["resources.num_learners=2", "resources.num_cpus_per_learner=1", "algorithm.micro_batch_size=1",
                 f"algorithm.advantage={advantage}"]
    if advantage == "grpo":
        overrides.append("algorithm.kl_coef=0.05")  # the KL reference is sharded too
    episodes = _uneven_episodes(policy)
    results = {}
    for sharding in ("fsdp2", "none"):
        algo = DeepEyesConfig.from_run_config(
            tiny_config(tiny_model_dir, *overrides, f"resources.learner_sharding={sharding}")).build_algo()
        try:
            eps = copy.deepcopy(episodes)
            if advantage == "gae":
                algo.attach_old_values(eps)  # a forward-only pass, in lockstep as well
            assign_advantages(eps, advantage)
            first = algo.update_policy(eps, lr=1e-3)
            second = algo.update_policy(eps, lr=1e-3)  # moved away from the reference: KL > 0
            results[sharding] = (_learner_weights(algo), first, second)
        finally:
            algo.stop()
    (sharded, first, second), (plain, plain_first, plain_second) = results["fsdp2"], results["none"]
    assert first["grad_norm"] > 0 and first["tokens"] == sum(e.num_generated for e in episodes)
    for key in ("pg_loss", "tokens", "entropy_sum", "grad_norm", "kl_sum", "value_loss"):
        if key in plain_second:
            assert first[key] == pytest.approx(plain_first[key], rel=1e-4, abs=1e-6), key
            assert second[key] == pytest.approx(plain_second[key], rel=1e-4, abs=1e-6), key
    if advantage == "grpo":
        assert second["kl_sum"] > 0
    for k, v in plain.items():
        assert torch.allclose(v, sharded[k], rtol=1e-5, atol=1e-5), k


def test_ppo_trains_the_value_head_and_checkpoints_it(ray_local, tiny_model_dir, tmp_path):
    # a short SFT so that some answers are right or wrong (the random tiny model's rewards are all 0)
    cfg = tiny_config(tiny_model_dir, "algorithm.advantage=gae", "algorithm.lam=0.95", "algorithm.minibatches=2",
                      "sft.steps=8", "sft.batch_size=8", "sft.n_demos=16", "sft.lr=3e-3")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        head = algo.learner_group._learner.module[DEFAULT_MODULE_ID].value_head
        assert head is not None and not head.weight.any()  # zero-initialised: V = 0 before training
        algo.run_sft()
        assert not head.weight.any()  # SFT trains the policy only
        for _ in range(2):
            metrics = iteration_record(algo.train())
        for key in ("value_loss", "vf_clip_fraction", "value_mean", "explained_variance", "time/values_s"):
            assert key in metrics, key
        assert metrics["value_loss"] > 0 and metrics["grad_norm"] > 0
        trained = [t.detach().clone() for t in (head.weight, head.bias)]
        assert trained[0].abs().sum() > 0, "the value head did not learn"
        # env runners generate only: they get the policy's weights, not the critic's
        policy = _params(algo)
        assert all(torch.equal(a, b) for a, b in zip(policy, algo.env_runner.engine.model.parameters(), strict=True))
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    restored = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        restored.restore_from_path(path)
        head = restored.learner_group._learner.module[DEFAULT_MODULE_ID].value_head
        assert all(torch.equal(a, b) for a, b in zip(trained, (head.weight, head.bias), strict=True))
        assert all(torch.equal(a, b) for a, b in zip(policy, _params(restored), strict=True))
        metrics = iteration_record(restored.train())  # and training goes on from there
        assert restored.iteration == 3 and metrics["value_loss"] > 0
    finally:
        restored.stop()


@pytest.mark.parametrize("mode", ["local", "data_parallel", "fsdp2"])
def test_a_frozen_vision_tower_stays_frozen_in_every_learner_mode(ray_local, tiny_model_dir, mode):
    learners = {"local": [], "data_parallel": ["resources.num_learners=2", "resources.num_cpus_per_learner=1"],
                "fsdp2": ["resources.num_learners=2", "resources.num_cpus_per_learner=1",
                          "resources.learner_sharding=fsdp2"]}[mode]
    cfg = tiny_config(tiny_model_dir, *learners, "optim.vision_lr_scale=0", "sft.steps=2", "sft.batch_size=4",
                      "sft.n_demos=8", "algorithm.entropy_coef=0.01")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        start = _learner_weights(algo)
        algo.run_sft()
        algo.train()
        after = _learner_weights(algo)
        vision = [k for k in start if k.startswith("model.visual.")]
        assert vision and all(torch.equal(after[k], start[k]) for k in vision), "the tower moved"
        assert any(not torch.equal(after[k], start[k]) for k in start if k not in vision), "nothing trained"
        groups = algo.learner_group.foreach_learner(
            lambda learner: [(g["lr_scale"], len(g["params"])) for g in learner.get_optimizer().param_groups])
        assert all(r.get() == [(1.0, r.get()[0][1])] for r in groups)  # one group: the tower is not in it
    finally:
        algo.stop()


def test_a_slow_vision_tower_has_its_own_learning_rate_in_checkpoints(ray_local, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, "optim.vision_lr_scale=0.1", "algorithm.entropy_coef=0.01")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        algo.train()
        path = algo.save_to_path(str(tmp_path / "ckpt"))
    finally:
        algo.stop()
    restored = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        restored.restore_from_path(path)
        groups = restored.learner_group.foreach_learner(
            lambda learner: [(g["lr_scale"], g["lr"]) for g in learner.get_optimizer().param_groups])
        assert [r.get() for r in groups] == [[(1.0, 1e-3), (0.1, pytest.approx(1e-4))]]
    finally:
        restored.stop()
