"""``DeepEyesConfig``: the RLlib ``AlgorithmConfig`` of the trainer, with builder methods as usual.

It carries the typed run config (``deepeyes_agent.train_config.TrainConfig``) as ``config.deepeyes`` and maps
it onto RLlib's own settings (env runners, learners, resources, fault tolerance, seed)::

    config = (DeepEyesConfig()
              .policy(path="/models/Qwen2.5-VL-7B-Instruct", dtype="bfloat16")
              .tasks(source="/data/deepeyes.parquet")
              .rollouts(engine="vllm", prompts_per_iteration=256, rollouts_per_prompt=16, max_tokens=10240)
              .training(advantage="grpo", lr=1e-6, clip_ratio_low=0.2)
              .env_runners(num_env_runners=4)
              .learners(num_learners=8, num_gpus_per_learner=1))
    algo = config.build_algo()

``DeepEyesConfig.from_run_config(cfg)`` does the same from a config file (what ``train.py`` uses).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray.rllib.algorithms.algorithm_config import AlgorithmConfig, NotProvided
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from deepeyes_agent.train_config import TrainConfig


class DeepEyesConfig(AlgorithmConfig):
    """RLlib config of :class:`~deepeyes_agent.rllib.algorithm.DeepEyesAlgorithm`."""

    def __init__(self, algo_class: type | None = None) -> None:
        from deepeyes_agent.rllib.algorithm import DeepEyesAlgorithm
        from deepeyes_agent.rllib.env_runner import LLMEnvRunner

        super().__init__(algo_class=algo_class or DeepEyesAlgorithm)
        self.deepeyes = TrainConfig()
        self.env_runner_cls = LLMEnvRunner
        # The runner drives whole episodes itself: no RLlib connectors, no env-runner state merging.
        self.add_default_connectors_to_env_to_module_pipeline = False
        self.add_default_connectors_to_module_to_env_pipeline = False
        self.add_default_connectors_to_learner_pipeline = False
        self.merge_env_runner_states = False
        self.broadcast_env_runner_states = False
        self.restart_failed_env_runners = True
        self.num_cpus_for_main_process = 0  # the driver mostly waits; do not reserve a core for it

    # ------------------------------------------------------------------ RLlib hooks
    def get_default_learner_class(self) -> type:
        from deepeyes_agent.rllib.learner import LLMLearner

        return LLMLearner

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        from deepeyes_agent.rllib.module import QwenVLModule

        model = self.deepeyes.model
        return RLModuleSpec(module_class=QwenVLModule, model_config={
            "path": model.path, "dtype": model.dtype, "attn_implementation": model.attn_implementation,
            "gradient_checkpointing": model.gradient_checkpointing,
            "value_head": self.deepeyes.algorithm.advantage == "gae"})

    # ------------------------------------------------------------------ builder methods
    def _set(self, section: str, **values: Any) -> DeepEyesConfig:
        given = {k: v for k, v in values.items() if v is not NotProvided}
        current = getattr(self.deepeyes, section)
        setattr(self.deepeyes, section, dataclasses.replace(current, **given))
        return self

    def policy(self, *, path: str = NotProvided, dtype: str = NotProvided, min_pixels: int = NotProvided,
               max_pixels: int = NotProvided, attn_implementation: str = NotProvided,
               gradient_checkpointing: bool = NotProvided) -> DeepEyesConfig:
        """The policy model: a local Qwen-VL directory and how to load it."""
        return self._set("model", path=path, dtype=dtype, min_pixels=min_pixels, max_pixels=max_pixels,
                         attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing)

    def tasks(self, *, source: str = NotProvided, kind: str = NotProvided, options: dict = NotProvided,
              n_train: int = NotProvided, n_eval: int = NotProvided, env_id: str = NotProvided,
              env_kwargs: dict = NotProvided) -> DeepEyesConfig:
        """Where tasks come from and which env plays them."""
        self._set("data", source=source, kind=kind, options=options, n_train=n_train, n_eval=n_eval)
        return self._set("env", env_id=env_id, kwargs=env_kwargs)

    def rollouts(self, *, engine: str = NotProvided, prompts_per_iteration: int = NotProvided,
                 rollouts_per_prompt: int = NotProvided, temperature: float = NotProvided,
                 top_p: float = NotProvided, max_tokens: int = NotProvided, judge: Any = NotProvided
                 ) -> DeepEyesConfig:
        """How env runners sample: engine, batch shape, sampling parameters, judge."""
        return self._set("rollout", engine=engine, prompts_per_iteration=prompts_per_iteration,
                         rollouts_per_prompt=rollouts_per_prompt, temperature=temperature, top_p=top_p,
                         max_tokens=max_tokens, judge=judge)

    def training(self, *, advantage: str = NotProvided, clip_ratio_low: float = NotProvided,
                 clip_ratio_high: float = NotProvided, loss_agg: str = NotProvided, kl_coef: float = NotProvided,
                 entropy_coef: float = NotProvided, micro_batch_size: int = NotProvided,
                 lam: float = NotProvided, vf_coef: float = NotProvided, vf_clip: float = NotProvided,
                 weight_decay: float = NotProvided, grad_clip: float = NotProvided, **kwargs: Any) -> DeepEyesConfig:
        """The algorithm and optimizer; RLlib's own ``training`` arguments (``lr``, ``gamma``, ...) pass through.

        PPO: ``advantage="gae"`` with ``gamma``, ``lam``, ``vf_coef``, ``vf_clip``.
        """
        super().training(**kwargs)
        for name, section in (("lr", "optim"), ("gamma", "algorithm")):
            if kwargs.get(name, NotProvided) is not NotProvided:
                self._set(section, **{name: kwargs[name]})
        self._set("algorithm", advantage=advantage, clip_ratio_low=clip_ratio_low, clip_ratio_high=clip_ratio_high,
                  loss_agg=loss_agg, kl_coef=kl_coef, entropy_coef=entropy_coef, micro_batch_size=micro_batch_size,
                  lam=lam, vf_coef=vf_coef, vf_clip=vf_clip)
        return self._set("optim", weight_decay=weight_decay, grad_clip=grad_clip)

    def run_config(self, run: TrainConfig) -> DeepEyesConfig:
        """Take every setting from a typed run config (and map the RLlib-level ones)."""
        self.deepeyes = run
        res = run.resources
        self.debugging(seed=run.seed, log_level="WARN")
        self.env_runners(num_env_runners=res.num_env_runners, num_cpus_per_env_runner=res.num_cpus_per_env_runner,
                         num_gpus_per_env_runner=res.num_gpus_per_env_runner,
                         custom_resources_per_env_runner=dict(res.env_runner_resources),
                         create_local_env_runner=res.num_env_runners == 0,
                         sample_timeout_s=res.sample_timeout_s)
        self.learners(num_learners=res.num_learners, num_cpus_per_learner=res.num_cpus_per_learner,
                      num_gpus_per_learner=res.num_gpus_per_learner)
        self.fault_tolerance(restart_failed_env_runners=res.restart_failed_env_runners)
        super().training(lr=run.optim.lr)
        return self

    @classmethod
    def from_run_config(cls, run: TrainConfig) -> DeepEyesConfig:
        return cls().run_config(run)
