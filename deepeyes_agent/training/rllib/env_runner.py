"""The env runner: owns envs, a generation engine and a judge; plays whole multi-turn episodes.

RLlib's default ``SingleAgentEnvRunner`` steps an env one action at a time through connectors built for
tensors; an LLM's action is a whole generated turn and its observations are variable-size images, so this
runner drives the rollout itself (``deepeyes_agent.rollout.loop.run_episodes``: batched generation across
episodes, env steps, one batched judge call at the end) and returns finished episodes, packed for the
learners. It keeps RLlib's contract otherwise: built from the ``AlgorithmConfig``, weights arrive through
``set_state`` (the Algorithm's ``sync_weights``), restarts are handled by RLlib's fault tolerance.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import ray
import torch
from ray.rllib.core import COMPONENT_RL_MODULE, DEFAULT_MODULE_ID
from ray.rllib.env.env_runner import EnvRunner
from ray.rllib.utils.checkpoints import Checkpointable
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from deepeyes_agent.policy.loading import load_processor
from deepeyes_agent.rollout.controls import Control
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.factory import make_engine
from deepeyes_agent.rollout.loop import run_episodes
from deepeyes_agent.rollout.metrics import episode_metrics
from deepeyes_agent.rollout.trajectory import Trajectory
from deepeyes_agent.training.batch import PackedEpisode
from deepeyes_agent.training.tasks import make_task_source
from deepeyes_envs.data.tasks import BadRow, Task, TaskError
from deepeyes_envs.judges import make_judge


@dataclass
class RunnerBatch:
    """What one env runner's :meth:`LLMEnvRunner.sample` hands the driver."""

    episodes: list[PackedEpisode]  # finished episodes, packed for the learners (skipped tasks left out)
    samples: list[Trajectory]  # the first ``keep`` trajectories, to save (without their token contexts)
    timings: dict[str, float]  # the rollout loop's timings plus ``runner_total_s``
    judge_stats: dict[str, float]  # the judge's counters (requests, retries, fallbacks, ...)
    bad_rows: list[dict[str, Any]]  # rows that could not be played: BadRow.to_json() plus "split"
    node_id: str
    pid: int
    worker_index: int
    policy_version: int  # the policy version these episodes were sampled with


class LLMEnvRunner(EnvRunner, Checkpointable):
    """Plays episodes of tasks given by index; see the module docstring."""

    def __init__(self, *, config: Any, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        self.run = self.config.deepeyes
        torch.set_num_threads(self.run.resources.torch_threads)
        self.processor = load_processor(self.run.model.path, min_pixels=self.run.model.min_pixels,
                                        max_pixels=self.run.model.max_pixels)
        model = self.run.model
        self.engine = make_engine(self.run.rollout.engine, model.path, self.processor, dtype=model.dtype,
                                  attn_implementation=model.attn_implementation, vllm_kwargs=self.run.rollout.vllm,
                                  kv_cache=self.run.rollout.hf_kv_cache)
        self.judge = make_judge(self.run.rollout.judge)
        self.sources = {"train": make_task_source(self.run.data, "train"),
                        "eval": make_task_source(self.run.data, "eval")}
        self.policy_version = 0  # the learners' update count of the weights held (RLlib's WEIGHTS_SEQ_NO)
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    # ------------------------------------------------------------------ RLlib's EnvRunner API
    def assert_healthy(self) -> None:
        assert self.engine is not None and self.processor is not None, "env runner not built"

    def get_spaces(self) -> dict[str, tuple[gym.Space, gym.Space]]:
        """Token-level spaces: one vocabulary id observed, one generated (RLlib needs some spaces)."""
        vocab = len(self.processor.tokenizer)
        obs = gym.spaces.Box(0, vocab, shape=(1,), dtype=np.int64)
        act = gym.spaces.Discrete(vocab)
        return {"__env__": (obs, act), DEFAULT_MODULE_ID: (obs, act)}

    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        return {WEIGHTS_SEQ_NO: self.policy_version}

    def set_state(self, state: dict[str, Any]) -> None:
        """Load new policy weights when the state carries them (``sync_weights``)."""
        module_state = state.get(COMPONENT_RL_MODULE)
        if isinstance(module_state, ray.ObjectRef):
            module_state = ray.get(module_state)
        if module_state:
            weights = module_state.get(DEFAULT_MODULE_ID, module_state)
            self.engine.load_weights({k: torch.as_tensor(v) for k, v in weights.items()})
        self.policy_version = int(state.get(WEIGHTS_SEQ_NO, self.policy_version + (1 if module_state else 0)))

    def get_ctor_args_and_kwargs(self) -> tuple[tuple, dict[str, Any]]:
        return (), {"config": self.config}

    def get_metrics(self) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        self.engine.close()

    # ------------------------------------------------------------------ sampling
    def sample(self, *, task_indices: list[int] = (), split: str = "train", n_per_task: int = 1,
               seed: int = 0, temperature: float | None = None, group_offset: int = 0, keep: int = 0,
               control: Control | None = None, **kwargs: Any) -> RunnerBatch:
        """Play ``n_per_task`` episodes of each task; returns packed episodes, metrics and ``keep`` samples.
        ``control`` (evaluation only) changes where the policy looks (``rollout.controls``)."""
        start = time.perf_counter()
        rollout = self.run.rollout
        tasks, rows, bad_rows = self.read_tasks(split, task_indices)
        temp = rollout.temperature if temperature is None else temperature
        sampling = SamplingParams(max_tokens=rollout.max_tokens, temperature=temp,
                                  top_p=rollout.top_p if temp > 0 else 1.0, seed=seed)
        trajectories = run_episodes(tasks, self.engine, self.processor, n_per_task=n_per_task, sampling=sampling,
                                    env_id=self.run.env.env_id or None, env_kwargs=self.run.env.kwargs,
                                    judge=self.judge, max_total_tokens=rollout.max_total_tokens,
                                    max_prompt_tokens=rollout.max_prompt_tokens, seed=seed,
                                    env_wrapper=control.wrapper() if control is not None else None)
        episodes = []
        for traj in trajectories:
            if traj.end_reason == "bad_task" and traj.episode_index == 0:  # once per task, not per rollout
                bad_rows.append({**traj.info["bad_row"], "index": rows[traj.group_id], "split": split})
            if traj.context is None:  # skipped: a bad task, or a prompt alone over the budget
                continue
            episode = PackedEpisode.from_context(traj.context, reward=traj.reward, task_id=traj.task_id,
                                                 group_id=group_offset + traj.group_id, metrics=episode_metrics(traj))
            episode.policy_version = self.policy_version
            episodes.append(episode)
        samples = []
        for traj in list(trajectories)[:keep]:
            traj.context = None  # holds the processor; the saved format does not need it
            samples.append(traj)
        self.num_env_steps_sampled_lifetime += sum(t.n_turns for t in trajectories)
        timings = dict(getattr(trajectories, "timings", {}))
        timings["runner_total_s"] = time.perf_counter() - start
        judge_stats = self.judge.stats() if hasattr(self.judge, "stats") else {}
        return RunnerBatch(episodes=episodes, samples=samples, timings=timings, judge_stats=judge_stats,
                           bad_rows=bad_rows, node_id=self.node_id, pid=os.getpid(),
                           worker_index=self.worker_index or 0, policy_version=self.policy_version)

    def read_tasks(self, split: str, indices: Sequence[int]) -> tuple[list[Task], list[int], list[dict[str, Any]]]:
        """The tasks of these rows, the rows they came from, and the rows that cannot become a task (BadRow
        records): a bad row is skipped and reported, never the end of the batch."""
        tasks, rows, bad = [], [], []
        for index in indices:
            try:
                tasks.append(self.sources[split][index])
                rows.append(index)
            except TaskError as exc:
                bad.append({**BadRow.from_error(exc, index=index).to_json(), "index": index, "split": split})
        return tasks, rows, bad
