"""``DeepEyesAlgorithm``: one RLlib training iteration for a vision-language policy.

``training_step`` reads as the data flow of the design::

    tasks   = next prompts from the seeded schedule (the driver owns the data position)
    results = env runners play rollouts_per_prompt episodes of each task (generate, tools, judge)
    PPO only: the learners' critic scores the batch (values before the update)
    advantages over the whole batch (GRPO groups, RLOO, REINFORCE++ whitening, PPO's GAE)
    learners: one optimizer step per minibatch, gradients all-reduced across learners
    weights -> env runners (RLlib's sync_weights)

``DeepEyesConfig`` (RLlib's ``AlgorithmConfig``, in this module as RLlib keeps a config beside its algorithm)
carries the typed run config; ``DeepEyesConfig.from_run_config(cfg).build_algo()`` is what ``train.py`` runs.

Checkpoints are RLlib's (``save_to_path`` / ``restore_from_path``): the learners' module and optimizer,
plus this class's own state (data position, SFT status, RNG states). Env runners that die are restarted by
RLlib (``restart_failed_env_runners``); an iteration carries on with the batches that came back.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.rllib.algorithms.algorithm import Algorithm
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.util.debug import log_once

from deepeyes_agent.rollout.controls import Control
from deepeyes_agent.rollout.metrics import batch_metrics, most_common_box
from deepeyes_agent.rollout.seeding import derive_seed
from deepeyes_agent.training.batch import PackedEpisode, assign_advantages, split_even
from deepeyes_agent.training.config import TrainConfig
from deepeyes_agent.training.demonstrations import demonstrations
from deepeyes_agent.training.health import CollapseAlarm, trainable_episodes
from deepeyes_agent.training.iteration_metrics import iteration_metrics
from deepeyes_agent.training.losses import token_count
from deepeyes_agent.training.rllib.async_sampling import DEPTH, AsyncSampler
from deepeyes_agent.training.rllib.env_runner import LLMEnvRunner, RunnerBatch
from deepeyes_agent.training.rllib.learner import LLMLearner
from deepeyes_agent.training.rllib.module import QwenVLModule
from deepeyes_agent.training.tasks import MixedSchedule, make_schedule, make_task_source

STATE_KEY = "deepeyes"
METRICS_KEY = "deepeyes"  # where an iteration's record sits in what ``train()`` returns


def iteration_record(result: Mapping[str, Any]) -> dict[str, Any]:
    """The iteration's record (``training.iteration_metrics``) out of what ``DeepEyesAlgorithm.train()`` returned.
    RLlib's metrics logger keeps a key once logged and reports it empty (None) in iterations that did not log it
    (PPO's critic numbers when every episode was dropped, say); those are left out."""
    return {key: value for key, value in result[METRICS_KEY].items() if value is not None}


class BadDataError(RuntimeError):
    """Too many of the rows a run read cannot be played (``data.max_bad_row_share``)."""


class DeepEyesConfig(AlgorithmConfig):
    """RLlib config of :class:`DeepEyesAlgorithm`: the typed run config as ``config.deepeyes``, mapped onto RLlib's
    own settings (env runners, learners, resources, fault tolerance, seed) by :meth:`run_config`."""

    def __init__(self, algo_class: type | None = None) -> None:
        super().__init__(algo_class=algo_class or DeepEyesAlgorithm)
        self.deepeyes = TrainConfig.model_construct()  # the defaults, until run_config() sets a validated one
        self.env_runner_cls = LLMEnvRunner
        # The runner drives whole episodes itself: no RLlib connectors, no env-runner state merging.
        self.add_default_connectors_to_env_to_module_pipeline = False
        self.add_default_connectors_to_module_to_env_pipeline = False
        self.add_default_connectors_to_learner_pipeline = False
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False
        self.restart_failed_env_runners = True
        self.num_cpus_for_main_process = 0  # the driver mostly waits; do not reserve a core for it
        # Tune's per-iteration system-usage poller (GPU through GPUtil): unused here; TensorBoard and Ray's
        # dashboard show resources.
        self.log_sys_usage = False
        # Built on the new API stack by design: RLlib's one-time notice that it is the default is marked as shown.
        log_once(f"{(algo_class or DeepEyesAlgorithm).__name__}_on_new_api_stack")

    # ------------------------------------------------------------------ RLlib hooks
    def get_default_learner_class(self) -> type:
        return LLMLearner

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        model = self.deepeyes.model
        return RLModuleSpec(module_class=QwenVLModule, model_config={
            "path": model.path, "dtype": model.dtype, "attn_implementation": model.attn_implementation,
            "gradient_checkpointing": model.gradient_checkpointing,
            "value_head": self.deepeyes.algorithm.advantage == "gae"})

    def run_config(self, run: TrainConfig) -> DeepEyesConfig:
        """Take every setting from a typed run config (and map the RLlib-level ones)."""
        self.deepeyes = run
        res = run.resources
        self.debugging(seed=run.seed, log_level="WARN")
        self.env_runners(num_env_runners=res.num_env_runners, num_cpus_per_env_runner=res.num_cpus_per_env_runner,
                         num_gpus_per_env_runner=res.num_gpus_per_env_runner,
                         custom_resources_per_env_runner=dict(res.env_runner_resources),
                         create_local_env_runner=res.num_env_runners == 0,
                         sample_timeout_s=res.sample_timeout_s,
                         max_requests_in_flight_per_env_runner=DEPTH if run.algorithm.max_staleness else 1)
        self.learners(num_learners=res.num_learners, num_cpus_per_learner=res.num_cpus_per_learner,
                      num_gpus_per_learner=res.num_gpus_per_learner)
        self.fault_tolerance(restart_failed_env_runners=res.restart_failed_env_runners)
        super().training(lr=run.optim.lr)
        return self

    @classmethod
    def from_run_config(cls, run: TrainConfig) -> DeepEyesConfig:
        return cls().run_config(run)


def learner_results(results: Any) -> list[Any]:
    """The values of a ``foreach_learner`` call; a learner's failure is raised, not returned as a value."""
    values = []
    for r in results:
        if not r.ok:
            raise RuntimeError(f"learner {r.actor_id} failed: {r.get()!r}") from r.get()
        values.append(r.get())
    return values


class DeepEyesAlgorithm(Algorithm):
    """RL for Qwen-VL policies with tools; see the module docstring."""

    @classmethod
    def get_default_config(cls) -> DeepEyesConfig:
        return DeepEyesConfig()

    def setup(self, config: DeepEyesConfig) -> None:
        super().setup(config)
        run = self.config.deepeyes
        self.schedule = make_schedule(make_task_source(run.data, "train"), run.data)
        self.n_eval_tasks = len(make_task_source(run.data, "eval"))
        self.sft_done = run.sft.steps == 0
        self.last_samples: list[Any] = []
        self.restored_env_runners = 0  # env runners brought back after a failure, over the run
        self.collapse_alarm = CollapseAlarm(run.logging.collapse_share, max(1, run.logging.collapse_patience))
        self.bad_rows: dict[str, dict[str, Any]] = {}  # "split:index" -> BadRow record, over the run
        self.rows_read: set[int] = set()  # training rows asked for, over the run
        self.last_eval_samples: list[Any] = []
        self.last_eval_top_box: tuple | None = None  # the most common first zoom box of the last evaluation
        # The learners' update count (RLlib's weights_seq_no, which every weight sync carries), mirrored after each
        # update: env runners stamp it on what they sample, so a batch's staleness is a subtraction.
        self.policy_version = 0
        self.sampler = AsyncSampler(self, run) if run.algorithm.max_staleness else None
        self.send_weights()

    # ------------------------------------------------------------------ the pieces of an iteration
    def stage_learner_state(self, with_optimizer: bool = False) -> None:
        """FSDP2 learners: gather the full weights (and, for a checkpoint, the optimizer state) on every
        learner, so that RLlib can read them from one of them. Without sharding nothing happens."""
        if self.config.deepeyes.resources.learner_sharding == "fsdp2" and not self.learner_group.is_local:
            learner_results(self.learner_group.foreach_learner(
                lambda learner, full: learner.stage_full_state(with_optimizer=full), full=with_optimizer))

    def send_weights(self, runners: Sequence[int] | None = None) -> float:
        """Send the learners' weights to the env runners ``runners`` (all of them by default); returns the seconds
        it took."""
        start = time.perf_counter()
        self.stage_learner_state()
        self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True,
                                           to_worker_indices=runners)
        return time.perf_counter() - start

    def restore_env_runners(self, env_runner_group: Any) -> list[int]:
        """Bring restarted env runners back (RLlib restarts the actors) with the current weights; asynchronously,
        the sampler requeues what they were playing and gives them weights with their next work."""
        restored = env_runner_group.probe_unhealthy_env_runners()
        if restored:
            self.restored_env_runners += len(restored)
            if self.sampler is None:
                self.send_weights(restored)
            else:
                self.sampler.forget_runners(restored)
        return restored

    def sample_episodes(self, task_indices: Sequence[int], *, split: str = "train", n_per_task: int = 1,
                        temperature: float | None = None, seed: int = 0, keep: int = 0,
                        group_base: int = 0, control: Control | None = None) -> list[RunnerBatch]:
        """Play the tasks on the env runners (split evenly across the healthy ones); one result per runner.

        Each task's rollouts stay on one runner, so a GRPO group is never split; a runner that fails
        loses its share of the batch for this iteration only.
        """
        kwargs = {"split": split, "n_per_task": n_per_task, "temperature": temperature, "control": control}
        if self.env_runner is not None:  # local mode
            return [self.env_runner.sample(task_indices=list(task_indices), seed=seed, keep=keep,
                                           group_offset=group_base, **kwargs)]
        ids = self.env_runner_group.healthy_env_runner_ids()
        if not ids:
            raise RuntimeError("no healthy env runner left")
        shares = split_even(list(task_indices), len(ids))
        calls, offset = [], group_base
        for k, share in enumerate(shares):
            calls.append({**kwargs, "task_indices": share, "seed": derive_seed(seed, k), "group_offset": offset,
                          "keep": keep if k == 0 else 0})
            offset += len(share)
        used = [i for i, share in zip(ids, shares, strict=True) if share]
        calls = [c for c in calls if c["task_indices"]]
        return self.env_runner_group.foreach_env_runner(
            "sample", kwargs=calls, remote_worker_ids=used, local_env_runner=False,
            timeout_seconds=self.config.deepeyes.resources.sample_timeout_s)

    def _learner_call(self, method: str, shards: Sequence[Any], **kwargs: Any) -> list[Any]:
        """Call ``method(shard, **kwargs)`` on every learner, learner r getting ``shards[r]`` (the local learner,
        in the driver, is rank 0)."""
        refs = [ray.put(s) for s in shards]

        def call(learner: Any, refs: list, kwargs: dict) -> Any:
            return getattr(learner, method)(ray.get(refs[learner.rank]), **kwargs)

        return learner_results(self.learner_group.foreach_learner(call, refs=refs, kwargs=kwargs))

    def attach_old_values(self, episodes: Sequence[PackedEpisode]) -> None:
        """PPO: every episode's per-token values under the critic before the update (learners score shards)."""
        shards = split_even(list(episodes), max(1, self.config.num_learners))
        values = [v for result in self._learner_call("critic_values", shards) for v in result]
        for episode, episode_values in zip(episodes, values, strict=True):
            episode.values = episode_values

    def update_policy(self, episodes: Sequence[PackedEpisode], lr: float) -> dict[str, float]:
        """Split the batch into minibatches x learners and run the optimizer steps; returns summed metrics."""
        run = self.config.deepeyes
        n_learners = max(1, self.config.num_learners)
        minibatches = split_even(list(episodes), run.algorithm.minibatches)
        per_learner: list[list[tuple[list[PackedEpisode], float]]] = [[] for _ in range(n_learners)]
        for mb in minibatches:
            normalizer = max(1.0, token_count(mb, run.algorithm.loss_agg))
            for r, shard in enumerate(split_even(mb, n_learners)):
                per_learner[r].append((shard, normalizer))
        results = self._learner_call("update_from_packed", per_learner, lr=lr, epochs=run.algorithm.epochs)
        total: dict[str, float] = {}
        for res in results:
            for k, v in res.items():
                total[k] = total.get(k, 0.0) + v
        total["grad_norm"] = results[0]["grad_norm"]  # identical on every learner (after the all-reduce)
        total["logprob_gap_max"] = max(res.get("logprob_gap_max", 0.0) for res in results)
        total["optimizer_steps"] = results[0]["optimizer_steps"]
        total["policy_version"] = results[0]["policy_version"]
        return total

    def collect_batch(self, iteration: int, keep: int) -> tuple[list[PackedEpisode], list[RunnerBatch], dict]:
        """Sample the iteration's episodes: ``prompts_per_iteration`` tasks, ``rollouts_per_prompt`` rollouts each.

        With ``algorithm.mask_over_turn`` episodes that ran out of turns are left out; with
        ``algorithm.dynamic_sampling`` groups without a reward difference are dropped and more tasks sampled, up to
        ``max_sample_rounds`` rounds. Returns the episodes to learn from, every runner's batch, and counts.
        """
        run = self.config.deepeyes
        algo, wanted = run.algorithm, run.rollout.prompts_per_iteration
        kept: list[PackedEpisode] = []
        results: list[RunnerBatch] = []
        stats: dict[str, float] = {}
        mix: list[int] = []
        for rounds in range(algo.max_sample_rounds if algo.dynamic_sampling else 1):
            have = len({e.group_id for e in kept})
            if have >= wanted:
                break
            indices = self.schedule.take(wanted - have)
            mix += indices
            batch = self.sample_episodes(indices, n_per_task=run.rollout.rollouts_per_prompt,
                                         seed=derive_seed(run.seed, iteration, rounds),
                                         keep=keep if rounds == 0 else 0, group_base=rounds * wanted)
            results += batch
            episodes = [e for r in batch for e in r.episodes]
            episodes, counts = trainable_episodes(episodes, mask_over_turn=algo.mask_over_turn,
                                                  dynamic_sampling=algo.dynamic_sampling)
            for key, value in counts.items():
                stats[key] = stats.get(key, 0.0) + value
            if algo.dynamic_sampling:
                stats["health/sample_rounds"] = float(rounds + 1)
            kept += episodes
        if isinstance(self.schedule, MixedSchedule):
            stats["data/agentic_share"] = self.schedule.agentic_share(mix)
        stats["data/skipped_rows"] = float(self.record_bad_rows(results, mix))
        return kept, results, stats

    def record_bad_rows(self, results: Sequence[RunnerBatch], indices: Sequence[int]) -> int:
        """Remember the rows the env runners could not play; stop the run once too many of those read are bad.
        Returns how many new bad rows these results brought."""
        new = {f"{b['split']}:{b['index']}": b for r in results for b in r.bad_rows}
        fresh = len(set(new) - set(self.bad_rows))
        self.bad_rows.update(new)
        self.rows_read.update(indices)
        share = self.config.deepeyes.data.max_bad_row_share
        bad = sum(1 for key in self.bad_rows if key.startswith("train:"))
        if len(self.rows_read) >= 1.0 / share and bad > share * len(self.rows_read):
            raise BadDataError(f"{bad} of the {len(self.rows_read)} training rows read so far cannot be played, more "
                               f"than data.max_bad_row_share = {share:.2%}; they are listed in skipped_rows.jsonl "
                               "(`python -m deepeyes_envs.data.check FILE` reports every bad row of a file)")
        return fresh

    def trajectories_to_keep(self, iteration: int) -> int:
        """How many of iteration ``iteration``'s trajectories to save (``logging.save_trajectories_every``)."""
        logging = self.config.deepeyes.logging
        every = logging.save_trajectories_every
        return logging.n_saved_trajectories if every and (iteration + 1) % every == 0 else 0

    def current_lr(self) -> float:
        optim = self.config.deepeyes.optim
        if optim.warmup_iterations > 0:
            return optim.lr * min(1.0, (self.iteration + 1) / optim.warmup_iterations)
        return optim.lr

    # ------------------------------------------------------------------ one iteration
    def training_step(self) -> None:
        """One iteration: collect a batch (from the asynchronous sampler, or synchronously), learn from the episodes
        kept, then record what it played and learned (``training.iteration_metrics``)."""
        run = self.config.deepeyes
        iteration = self.iteration  # completed iterations so far
        start = time.perf_counter()
        if self.sampler is not None:
            episodes, results, batch_stats = self.sampler.collect(iteration)
        else:
            episodes, results, batch_stats = self.collect_batch(iteration, self.trajectories_to_keep(iteration))
        timings = {"rollout_s": time.perf_counter() - start}
        staleness = [self.policy_version - e.policy_version for e in episodes]
        played = [e for r in results for e in r.episodes]
        if not played:
            raise RuntimeError("no episodes came back from the env runners")
        lr = self.current_lr()
        update_stats = self.learn(episodes, lr, timings) if episodes else {}  # else all were dropped or masked
        metrics = iteration_metrics(played=played, learned=episodes, results=results, batch_stats=batch_stats,
                                    update_stats=update_stats, timings=timings, staleness=staleness, lr=lr,
                                    epochs=run.algorithm.epochs, env_runner_restarts=self.restored_env_runners,
                                    critic=run.algorithm.advantage == "gae")
        if run.logging.collapse_patience:
            metrics.update(self.collapse_alarm.record(metrics["tool_call_rate"]))
        self.last_samples = [s for r in results for s in r.samples]
        for key, value in metrics.items():
            self.metrics.log_value((METRICS_KEY, key), value, reduce="item")

    def learn(self, episodes: list[PackedEpisode], lr: float, timings: dict[str, float]) -> dict[str, float]:
        """Advantages (after the critic's values, for PPO), one policy update, and the weights to the env runners
        (unless the asynchronous sampler hands them out when a runner is idle); adds each part's seconds to
        ``timings``; returns the learners' summed statistics."""
        run = self.config.deepeyes
        if run.algorithm.advantage == "gae":
            start = time.perf_counter()
            self.attach_old_values(episodes)
            timings["values_s"] = time.perf_counter() - start
        assign_advantages(episodes, run.algorithm.advantage, norm_by_std=run.algorithm.norm_by_std,
                          gamma=run.algorithm.gamma, lam=run.algorithm.lam)
        start = time.perf_counter()
        stats = self.update_policy(episodes, lr)
        self.policy_version = int(stats.pop("policy_version"))
        timings["update_s"] = time.perf_counter() - start
        if self.sampler is None:
            timings["weight_sync_s"] = self.send_weights()
        return stats

    # ------------------------------------------------------------------ evaluation and SFT
    def evaluate_heldout(self, n_tasks: int | None = None, keep: int = 0,
                         control: Control | None = None) -> dict[str, float]:
        """Play the held-out tasks once each at ``rollout.eval_temperature``; accuracy, tool-call rate, ...
        The first ``keep`` trajectories are kept in ``last_eval_samples`` (the report shows one). ``control``
        changes where the policy looks (``rollout.controls``). The most common first zoom box is kept in
        ``last_eval_top_box`` (the fixed-box control's box)."""
        run = self.config.deepeyes
        n = min(self.n_eval_tasks, n_tasks or self.n_eval_tasks)
        if n == 0:
            return {}
        if self.sampler is not None:  # asynchronous: runners get new weights only when given work; these are due
            self.sampler.sync_weights(self.env_runner_group.healthy_env_runner_ids())
        results = self.sample_episodes(list(range(n)), split="eval", n_per_task=1, keep=keep,
                                       temperature=run.rollout.eval_temperature, seed=run.seed + 424242,
                                       control=control)
        self.last_eval_samples = [s for r in results for s in r.samples]
        self.bad_rows.update({f"{b['split']}:{b['index']}": b for r in results for b in r.bad_rows})
        self.last_eval_top_box = most_common_box([e.metrics for r in results for e in r.episodes])
        return batch_metrics([e.metrics for r in results for e in r.episodes])

    def run_sft(self, progress: Any = None) -> list[dict[str, float]]:
        """Supervised warm start on scripted demonstrations (``sft.steps`` AdamW steps); idempotent."""
        if self.sft_done:
            return []
        from deepeyes_agent.policy.loading import load_processor

        run = self.config.deepeyes
        processor = load_processor(run.model.path, min_pixels=run.model.min_pixels, max_pixels=run.model.max_pixels)
        source = make_task_source(run.data, "train")
        rng = np.random.default_rng([run.seed, 17])
        picks = rng.choice(len(source), size=min(run.sft.n_demos, len(source)), replace=False)
        contexts = demonstrations([source[int(i)] for i in picks], run.env, processor,
                                  include_zoom=run.sft.include_zoom, max_total_tokens=run.rollout.max_total_tokens,
                                  zoom_fraction=run.sft.zoom_fraction, seed=run.seed, thoughts=run.sft.thoughts,
                                  zoom_margin=run.sft.zoom_margin)
        demos = [PackedEpisode.from_context(c) for c in contexts]
        n_learners = max(1, self.config.num_learners)
        history = []
        for step in range(run.sft.steps):
            order = rng.permutation(len(demos))[: run.sft.batch_size]
            batch = [demos[int(i)] for i in order]
            normalizer = max(1.0, token_count(batch, "token-mean"))
            shards = split_even(batch, n_learners)
            results = self._learner_call("sft_update", shards, normalizer=normalizer, lr=run.sft.lr)
            nll = sum(r["nll_sum"] for r in results) / normalizer
            history.append({"sft_step": step + 1, "sft_nll": nll, "sft_grad_norm": results[0]["grad_norm"]})
            if progress is not None:
                progress(history[-1])
        learner_results(self.learner_group.foreach_learner(lambda learner: learner.finish_sft()))
        self.send_weights()
        self.sft_done = True
        return history

    def learner_checksums(self) -> list[list[float]]:
        """Each learner's per-tensor parameter sums (equal lists: identical parameters)."""
        return learner_results(self.learner_group.foreach_learner(lambda learner: learner.parameter_checksum()))

    # ------------------------------------------------------------------ checkpoint state
    def get_state(self, components: Any = None, *, not_components: Any = None, **kwargs: Any) -> dict[str, Any]:
        self.stage_learner_state(with_optimizer=True)
        state = super().get_state(components, not_components=not_components, **kwargs)
        state[STATE_KEY] = {
            "schedule": self.schedule.get_state(), "sft_done": self.sft_done,
            "collapse_alarm": self.collapse_alarm.get_state(),
            "bad_rows": self.bad_rows, "rows_read": sorted(self.rows_read),
            "policy_version": self.policy_version,
            "pending_tasks": self.sampler.pending_tasks() if self.sampler is not None else [],
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        }
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        own = state.get(STATE_KEY)
        if own:
            self.schedule.set_state(own["schedule"])
            self.sft_done = bool(own["sft_done"])
            if "collapse_alarm" in own:  # checkpoints of before the alarm and the bad rows have none
                self.collapse_alarm.set_state(own["collapse_alarm"])
                self.bad_rows, self.rows_read = dict(own["bad_rows"]), set(own["rows_read"])
            self.policy_version = int(own.get("policy_version", 0))  # checkpoints of before async have none
            if self.sampler is not None:
                self.sampler.set_pending_tasks(own.get("pending_tasks", []))
            random.setstate(own["rng"]["python"])
            np.random.set_state(own["rng"]["numpy"])
            torch.set_rng_state(own["rng"]["torch"])
