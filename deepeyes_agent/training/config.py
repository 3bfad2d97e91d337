"""The typed training configuration: every setting of ``train.py``, with its default and why it exists.

A run is a :class:`TrainConfig` of pydantic sections (``deepeyes_agent.settings``): a YAML file sets some
values, dotted ``key=value`` overrides on the command line set more (``rollout.temperature=0.7``), everything
else keeps the documented default. pydantic checks each value against its field's type (choices are
``Literal`` types); :meth:`TrainConfig.check_combinations` rejects combinations that would otherwise fail deep
inside a run. ``python train.py --describe`` prints every setting (docs/training.md lists the same table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from deepeyes_agent.settings import ConfigError, JudgeSetting, Section, judge_setting, load, setting, settings_table
from deepeyes_agent.training.choices import Advantage, KLEstimator, LossAgg

__all__ = ["ConfigError", "TrainConfig", "describe", "load_config"]


class ModelConfig(Section):
    path: str = setting("", "Local Hugging Face directory of the policy (Qwen2-VL / 2.5-VL / 3-VL). Never downloaded.")
    build_tiny: bool = setting(False, "Use the tiny Qwen2.5-VL (CPU tests and the default run): built at start, see "
                                      "model.tiny_base.")
    tiny_base: Literal["random", "pretrained"] = setting(
        "random", "With build_tiny: 'random' (random weights, built into <run_dir>/tiny_model) or 'pretrained' "
                  "(pretrained on synthetic perception, never on tool calls: deepeyes_agent.policy.pretrain, cached "
                  "by its settings under ~/.cache/deepeyes/tiny-bases, so only the first run pays its minutes).")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", "Parameter dtype of the learner and the HF "
                                                                          "engine.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting("sdpa", "transformers attention "
                                                                                         "kernel.")
    min_pixels: Optional[int] = setting(None, "Override of the processor's minimum pixel budget per image "
                                              "(None: as saved). The envs read images in the same budget.")
    max_pixels: Optional[int] = setting(None, "Override of the processor's maximum pixel budget per image; a low "
                                              "budget is what makes the toy zoom task need the zoom tool.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass (large models).")


class DataConfig(Section):
    source: str = setting("synthetic", "Where tasks come from: 'synthetic', a DeepEyes parquet file, or 'hf:PATH' for "
                                       "a Hugging Face dataset in local files (save_to_disk dir, parquet/json/csv, "
                                       "imagefolder).")
    kind: str = setting("toy", "Synthetic family (deepeyes_envs.synthetic.SYNTHETIC_KINDS): toy (colour questions), "
                               "toy_zoom (needs the zoom tool) or visual_search (V*-like).")
    options: dict = setting({}, "Overrides of the synthetic family's config, e.g. {difficulty: 0.5, n_colors: 4}.")
    columns: dict = setting({}, "hf: sources: task field -> column name, where the dataset's names differ "
                                "(deepeyes_envs.data.hf.DEFAULT_COLUMNS).")
    agentic_fraction: Optional[float] = setting(None, "Share of each iteration's prompts drawn from agentic rows "
                                                      "(env_name set); the rest are plain rows (env_name empty), as "
                                                      "DeepEyes mixes them in one batch. None: rows in the file's "
                                                      "proportion.", ge=0.0, le=1.0)
    n_train: int = setting(4096, "Number of training tasks (synthetic) or the cap on rows read (files, 0: all).",
                           ge=0)
    n_eval: int = setting(64, "Held-out tasks for evaluation (synthetic: drawn with eval_seed, disjoint from "
                              "training).", ge=0)
    seed: int = setting(0, "Seed of the training tasks.")
    eval_seed: int = setting(1_000_003, "Seed of the held-out tasks.")
    eval_path: str = setting("", "Held-out tasks when source is a file: a parquet path or 'hf:PATH' ('': no "
                                 "evaluation).")
    shuffle: bool = setting(True, "Visit the training tasks in a seeded random order, reshuffled every epoch.")
    max_bad_row_share: float = setting(0.01, "Rows that cannot be played (a missing field, an image that does not "
                                             "decode) are skipped and listed in <run_dir>/skipped_rows.jsonl; the run "
                                             "stops once more than this share of the rows read are bad (checked "
                                             "from 1 / share rows on).", gt=0.0, le=1.0)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from deepeyes_envs.synthetic import SYNTHETIC_KINDS

        if kind not in SYNTHETIC_KINDS:
            raise ValueError(f"must be one of {list(SYNTHETIC_KINDS)}")
        return kind


class EnvConfig(Section):
    env_id: str = setting("", "Env to play every task in ('' : the env each task's env_name routes to).")
    kwargs: dict = setting({}, "Keyword arguments for the env, e.g. {max_turns: 5}. The image geometry (pixel budget, "
                               "resize factor) is the processor's (model.min_pixels / max_pixels), never set here.")


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = setting("hf", "Generation engine of the env runners: transformers or vLLM.")
    hf_kv_cache: bool = setting(True, "engine hf: keep each episode's keys and values between turns (a turn prefills "
                                      "only what it added; all episodes decode in one batch that finished ones "
                                      "leave); holds every running episode's cache. false: re-encode every context "
                                      "every turn with model.generate (slower).")
    prompts_per_iteration: int = setting(16, "Tasks per training iteration (DeepEyes: 256).", ge=1)
    rollouts_per_prompt: int = setting(4, "Rollouts of each task: the GRPO group size (DeepEyes: 16).", ge=1)
    temperature: float = setting(1.0, "Sampling temperature; logprobs are recorded and recomputed at this "
                                      "temperature.", ge=0.0)
    top_p: float = setting(1.0, "Nucleus sampling.", gt=0.0, le=1.0)
    max_tokens: int = setting(64, "Most tokens per assistant reply (DeepEyes: 10240).", ge=1)
    max_prompt_tokens: int = setting(8192, "Longest first observation; longer tasks are skipped.", ge=1)
    max_total_tokens: int = setting(28672, "Token budget of a whole episode (prompt + replies + observations).", ge=1)
    judge: JudgeSetting = judge_setting()
    eval_temperature: float = setting(0.0, "Temperature of held-out evaluation (0: greedy).", ge=0.0)
    vllm: dict = setting({}, "Keyword arguments for the vLLM engine (gpu_memory_utilization, tensor_parallel_size, "
                             "...).")


class AlgoConfig(Section):
    advantage: Advantage = setting("grpo", "Advantage estimator (gae: PPO, a value head on the policy is trained "
                                           "alongside it).")
    norm_by_std: bool = setting(True, "GRPO: divide by the group's reward std.")
    clip_ratio_low: float = setting(0.2, "PPO clip: lower bound 1 - clip_ratio_low (DeepEyes: 0.2).", ge=0.0)
    clip_ratio_high: Optional[float] = setting(None, "PPO clip upper bound 1 + clip_ratio_high (None: = low).")
    clip_ratio_c: Optional[float] = setting(3.0, "Dual-clip constant for negative advantages (None: off).", gt=1.0)
    loss_agg: LossAgg = setting("token-mean", "Loss aggregation.")
    kl_coef: float = setting(0.0, "Weight of the KL-to-reference loss (0: no reference model is loaded).")
    kl_estimator: KLEstimator = setting("k3", "KL estimator for the KL loss.")
    entropy_coef: float = setting(0.0, "Weight of the entropy bonus (0: off).")
    gamma: float = setting(1.0, "Discount per generated token of reinforce_plus_plus returns and of gae.",
                           ge=0.0, le=1.0)
    lam: float = setting(1.0, "gae: lambda of generalised advantage estimation (1: Monte-Carlo return minus V).",
                         ge=0.0, le=1.0)
    vf_coef: float = setting(0.5, "gae: weight of the value loss in the total loss.")
    vf_clip: Optional[float] = setting(0.2, "gae: value clip range; the value loss gains nothing from moving V further "
                                            "than this from its pre-update value (None: plain squared error).", gt=0.0)
    epochs: int = setting(1, "Passes over each iteration's batch (DeepEyes: 1).", ge=1)
    minibatches: int = setting(1, "Optimizer steps per pass; the batch is split into this many parts (DeepEyes: 1).",
                               ge=1)
    micro_batch_size: int = setting(16, "Trajectories per forward/backward (gradient accumulation fills the rest).",
                                    ge=1)
    dynamic_sampling: bool = setting(False, "Drop groups whose rollouts all scored the same (zero advantage: nothing "
                                            "to learn) and sample more prompts to refill the batch (DAPO, Mini-o3).")
    max_sample_rounds: int = setting(3, "With dynamic_sampling: sampling rounds per iteration at most; a batch still "
                                        "short after them trains on the groups it has.", ge=1)
    mask_over_turn: bool = setting(False, "Leave episodes cut off at max_turns out of the loss and of their group's "
                                          "baseline instead of scoring them (Mini-o3's over-turn masking).")
    max_staleness: int = setting(0, "Asynchronous training: env runners keep sampling while the learners update, "
                                    "and a batch may come from weights up to this many updates old; older batches "
                                    "are dropped and counted (0: sample, then learn, in turn).", ge=0)
    is_truncation: float = setting(2.0, "Asynchronous training: cap of the importance weight pi_proximal / "
                                        "pi_behaviour that corrects the loss of a stale episode.", gt=0.0)


class OptimConfig(Section):
    lr: float = setting(1e-6, "AdamW learning rate, constant after warm-up (DeepEyes: 1e-6).", ge=0.0)
    weight_decay: float = setting(0.01, "AdamW weight decay (DeepEyes: 0.01).", ge=0.0)
    betas: list[float] = setting([0.9, 0.999], "AdamW betas.", min_length=2, max_length=2)
    eps: float = setting(1e-8, "AdamW epsilon.", gt=0.0)
    grad_clip: float = setting(1.0, "Global gradient-norm clip (DeepEyes: 1.0; 0: off).", ge=0.0)
    warmup_iterations: int = setting(0, "Linear learning-rate warm-up over this many iterations.", ge=0)
    vision_lr_scale: float = setting(1.0, "Learning rate of the vision tower (patch embedding, blocks, merger) "
                                          "relative to the rest, in SFT and RL; 0 freezes it (saved with the "
                                          "optimizer's groups).", ge=0.0)


class SFTConfig(Section):
    steps: int = setting(0, "Supervised warm-start steps on scripted demonstrations before RL (0: none).", ge=0)
    batch_size: int = setting(16, "Demonstrations per SFT step.", ge=1)
    lr: float = setting(1e-3, "SFT learning rate (its own AdamW state, discarded before RL).", ge=0.0)
    n_demos: int = setting(512, "Distinct demonstration tasks (drawn from the training tasks).", ge=1)
    include_zoom: bool = setting(True, "Demonstrations zoom on the ground-truth box before answering; False: "
                                       "answer directly.")
    zoom_fraction: float = setting(1.0, "With include_zoom: the seeded share of demonstrations that zoom; the rest "
                                        "answer directly (a low starting tool-call rate for RL to raise).",
                                   ge=0.0, le=1.0)
    zoom_margin: float = setting(0.25, "How much a demonstration's zoom grows the ground-truth box on each side (a "
                                       "share of its size; the oracle-zoom control zooms the same way). 0: the box "
                                       "itself, the numbers a base that locates writes for it.", ge=0.0)
    thoughts: bool = setting(True, "Demonstrations think (<think>...</think>) before each action, as DeepEyes' format "
                                   "asks; false: the actions alone, fewer tokens for a tiny model to learn.")


class ResourcesConfig(Section):
    num_env_runners: int = setting(0, "Remote env runners (0: sample in the driver process).", ge=0)
    num_learners: int = setting(0, "Remote learners, one per GPU in practice (0: learn in the driver process). "
                                   "With 2+ they train data-parallel (gradient all-reduce).", ge=0)
    learner_sharding: Literal["none", "fsdp2"] = setting(
        "none", "With 2+ learners: 'none' (every learner holds the full model, gradients all-reduced) or 'fsdp2' "
                "(PyTorch FSDP2: parameters, gradients and optimizer state sharded per decoder layer; checkpoints "
                "and weight syncs stay full state dicts).")
    num_cpus_per_env_runner: float = setting(1, "CPUs reserved per env runner.", ge=0)
    num_gpus_per_env_runner: float = setting(0, "GPUs per env runner (vLLM engines need 1 or more).", ge=0)
    num_cpus_per_learner: float = setting(1, "CPUs reserved per remote learner.", ge=0)
    num_gpus_per_learner: float = setting(0, "GPUs per learner.", ge=0)
    env_runner_resources: dict = setting({}, "Custom Ray resources per env runner, e.g. {runner_slot: 1} to "
                                             "spread them.")
    torch_threads: int = setting(2, "torch threads per process (keep cores for the other processes).", ge=1)
    ray_num_cpus: Optional[int] = setting(2, "CPUs of the local Ray instance train.py starts (ignored with --address).")
    object_store_mb: int = setting(256, "Object store of the local Ray instance, MB (small: trajectories are small).",
                                   ge=1)
    restart_failed_env_runners: bool = setting(True, "Restart env runners that die and carry on without their batch.")
    sample_timeout_s: float = setting(1800.0, "Give up on an env runner's batch after this many seconds.", gt=0)


class LoggingConfig(Section):
    run_dir: str = setting("runs/{name}", "Output directory ({name} is the run name). A rerun resumes from it.")
    eval_every: int = setting(5, "Evaluate on held-out tasks every N iterations (and at the start and end; 0: never).",
                              ge=0)
    checkpoint_every: int = setting(5, "Save a checkpoint every N iterations (and at the end).", ge=1)
    keep_checkpoints: int = setting(2, "Checkpoints kept on disk (older ones are deleted).", ge=1)
    save_trajectories_every: int = setting(10, "Save sample trajectories every N iterations (0: never).", ge=0)
    n_saved_trajectories: int = setting(8, "Trajectories saved each time.", ge=0)
    tensorboard: bool = setting(True, "Write TensorBoard scalars to <run_dir>/tb.")
    report: bool = setting(True, "Write report.md and PNG plots at the end.")
    no_tool_control: bool = setting(False, "After the run, train the same config with the tools disabled (and "
                                           "demonstrations that answer directly) into <run_dir>/no_tool; the report "
                                           "sets its held-out curve beside the run's.")
    zoom_controls: bool = setting(False, "After the run, evaluate the final policy on the held-out tasks with every "
                                         "zoom box replaced by its most common box, then by the centre box, and "
                                         "with an oracle first zoom on the ground truth (rollout.controls); the "
                                         "report shows them beside the run.")
    progress: bool = setting(True, "Show tqdm progress bars (SFT steps, iterations).")
    collapse_share: float = setting(0.5, "Tool-call collapse alarm: warn when the tool-call rate stays below this "
                                         "share of its running maximum ...", gt=0.0, lt=1.0)
    collapse_patience: int = setting(3, "... for this many iterations in a row (0: no alarm).", ge=0)


class TrainConfig(Section):
    name: str = setting("run", "Run name (used in run_dir).")
    seed: int = setting(0, "Seed of everything: torch, sampling, data order.")
    iterations: int = setting(100, "RL iterations (one batch of rollouts and its updates each).", ge=1)
    resume: bool = setting(True, "Resume from the newest checkpoint in run_dir when there is one.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgoConfig = Field(default_factory=AlgoConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def check_combinations(self) -> TrainConfig:
        """Cross-field checks whose failure would otherwise show up deep inside a run."""
        algo, rollout = self.algorithm, self.rollout
        problems = []
        if algo.advantage in ("grpo", "dr_grpo", "rloo") and rollout.rollouts_per_prompt < 2:
            problems.append(f"{algo.advantage} needs rollout.rollouts_per_prompt >= 2 (a group baseline)")
        if not self.model.path and not self.model.build_tiny:
            problems.append("set model.path to a local model directory (or model.build_tiny=true)")
        batch = rollout.prompts_per_iteration * rollout.rollouts_per_prompt
        parts = max(1, self.resources.num_learners) * algo.minibatches
        if batch % parts:
            problems.append(f"the batch of {batch} trajectories does not split into {algo.minibatches} minibatch(es) "
                            f"x {max(1, self.resources.num_learners)} learner(s)")
        geometry = {"min_pixels", "max_pixels", "image_factor"} & set(self.env.kwargs)
        if geometry:
            problems.append(f"env.kwargs sets {sorted(geometry)}: the envs read images in the processor's geometry "
                            "(set model.min_pixels / model.max_pixels instead)")
        if self.data.agentic_fraction is not None and self.data.source == "synthetic":
            problems.append("data.agentic_fraction mixes the agentic and plain rows of a file; the synthetic source "
                            "has one kind")
        if algo.max_staleness > 0 and self.resources.num_env_runners < 1:
            problems.append("algorithm.max_staleness > 0 samples on env runners while the driver learns: set "
                            "resources.num_env_runners >= 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    return load(TrainConfig, path, overrides)


def describe() -> str:
    """A table of every setting: key, default, help."""
    return settings_table(TrainConfig)
