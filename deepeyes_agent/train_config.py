"""The typed training configuration: every setting of ``train.py``, with its default and why it exists.

A run is described by nested dataclasses (:class:`TrainConfig` and its sections). A YAML file sets some
of them, ``key=value`` overrides on the command line set more (dotted keys: ``rollout.temperature=0.7``),
and everything else keeps the documented default. Unknown keys are errors that name the closest valid
key, so a typo never silently trains with a default. Values are checked against the field's type.

``python train.py --describe`` prints every setting with its default and help text (docs/training.md
lists the same table).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


def setting(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at the call sites
    """A dataclass field with a default and a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    path: str = setting("", "Local Hugging Face directory of the policy (Qwen2-VL / 2.5-VL / 3-VL). Never downloaded.")
    build_tiny: bool = setting(False, "Build the tiny random Qwen2.5-VL into <run_dir>/tiny_model at start and use it "
                                      "(CPU tests and the default run).")
    dtype: str = setting("float32", "Parameter dtype of the learner and the HF engine: float32 or bfloat16.")
    attn_implementation: str = setting("sdpa", "transformers attention kernel: sdpa, eager or flash_attention_2.")
    min_pixels: Optional[int] = setting(None, "Override of the processor's minimum pixel budget per image "
                                              "(None: as saved).")
    max_pixels: Optional[int] = setting(None, "Override of the processor's maximum pixel budget per image; a low "
                                              "budget is what makes the toy zoom task need the zoom tool.")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass (large models).")


@dataclass
class DataConfig:
    source: str = setting("synthetic", "Where tasks come from: 'synthetic' or a DeepEyes parquet file path.")
    kind: str = setting("toy", "Synthetic family: toy (colour questions), toy_zoom (needs the zoom tool) or "
                               "visual_search (V*-like).")
    options: dict = setting({}, "Overrides of the synthetic family's config, e.g. {difficulty: 0.5, n_colors: 4}.")
    n_train: int = setting(4096, "Number of training tasks (synthetic) or the cap on rows read (parquet, 0: all).")
    n_eval: int = setting(64, "Held-out tasks for evaluation (synthetic: drawn with eval_seed, disjoint from "
                              "training).")
    seed: int = setting(0, "Seed of the training tasks.")
    eval_seed: int = setting(1_000_003, "Seed of the held-out tasks.")
    eval_path: str = setting("", "Parquet file of held-out tasks when source is a parquet path ('' : no evaluation).")
    shuffle: bool = setting(True, "Visit the training tasks in a seeded random order, reshuffled every epoch.")


@dataclass
class EnvConfig:
    env_id: str = setting("", "Env to play every task in ('' : the env each task's env_name routes to).")
    kwargs: dict = setting({}, "Keyword arguments for the env, e.g. {max_turns: 5, max_pixels: 3136}.")


@dataclass
class RolloutConfig:
    engine: str = setting("hf", "Generation engine of the env runners: 'hf' (transformers) or 'vllm'.")
    prompts_per_iteration: int = setting(16, "Tasks per training iteration (DeepEyes: 256).")
    rollouts_per_prompt: int = setting(4, "Rollouts of each task: the GRPO group size (DeepEyes: 16).")
    temperature: float = setting(1.0, "Sampling temperature; logprobs are recorded and recomputed at this temperature.")
    top_p: float = setting(1.0, "Nucleus sampling.")
    max_tokens: int = setting(64, "Most tokens per assistant reply (DeepEyes: 10240).")
    max_prompt_tokens: int = setting(8192, "Longest first observation; longer tasks are skipped.")
    max_total_tokens: int = setting(28672, "Token budget of a whole episode (prompt + replies + observations).")
    judge: Any = setting("rule", "Judge spec: 'rule', 'llm' (URL from $LLM_AS_A_JUDGE_BASE), or a dict "
                                 "{type: llm, base_url: ..., on_failure: fallback}.")
    eval_temperature: float = setting(0.0, "Temperature of held-out evaluation (0: greedy).")
    vllm: dict = setting({}, "Keyword arguments for the vLLM engine (gpu_memory_utilization, "
                             "tensor_parallel_size, ...).")


@dataclass
class AlgoConfig:
    advantage: str = setting("grpo", "Advantage estimator: grpo, dr_grpo, rloo, reinforce_plus_plus, or gae (PPO: "
                                     "a value head on the policy is trained alongside it).")
    norm_by_std: bool = setting(True, "GRPO: divide by the group's reward std.")
    clip_ratio_low: float = setting(0.2, "PPO clip: lower bound 1 - clip_ratio_low (DeepEyes: 0.2).")
    clip_ratio_high: Optional[float] = setting(None, "PPO clip upper bound 1 + clip_ratio_high (None: = low).")
    clip_ratio_c: Optional[float] = setting(3.0, "Dual-clip constant for negative advantages (None: off).")
    loss_agg: str = setting("token-mean", "Loss aggregation: token-mean, seq-mean-token-sum or seq-mean-token-mean.")
    kl_coef: float = setting(0.0, "Weight of the KL-to-reference loss (0: no reference model is loaded).")
    kl_estimator: str = setting("k3", "KL estimator for the KL loss: k1, k2, k3 or low_var_kl.")
    entropy_coef: float = setting(0.0, "Weight of the entropy bonus (0: off).")
    gamma: float = setting(1.0, "Discount per generated token of reinforce_plus_plus returns and of gae.")
    lam: float = setting(1.0, "gae: lambda of generalised advantage estimation (1: Monte-Carlo return minus V).")
    vf_coef: float = setting(0.5, "gae: weight of the value loss in the total loss.")
    vf_clip: Optional[float] = setting(0.2, "gae: value clip range; the value loss gains nothing from moving V further "
                                            "than this from its pre-update value (None: plain squared error).")
    epochs: int = setting(1, "Passes over each iteration's batch (DeepEyes: 1).")
    minibatches: int = setting(1, "Optimizer steps per pass; the batch is split into this many parts (DeepEyes: 1).")
    micro_batch_size: int = setting(16, "Trajectories per forward/backward (gradient accumulation fills the rest).")


@dataclass
class OptimConfig:
    lr: float = setting(1e-6, "AdamW learning rate, constant after warm-up (DeepEyes: 1e-6).")
    weight_decay: float = setting(0.01, "AdamW weight decay (DeepEyes: 0.01).")
    betas: list = setting([0.9, 0.999], "AdamW betas.")
    eps: float = setting(1e-8, "AdamW epsilon.")
    grad_clip: float = setting(1.0, "Global gradient-norm clip (DeepEyes: 1.0).")
    warmup_iterations: int = setting(0, "Linear learning-rate warm-up over this many iterations.")


@dataclass
class SFTConfig:
    steps: int = setting(0, "Supervised warm-start steps on scripted demonstrations before RL (0: none).")
    batch_size: int = setting(16, "Demonstrations per SFT step.")
    lr: float = setting(1e-3, "SFT learning rate (its own AdamW state, discarded before RL).")
    n_demos: int = setting(512, "Distinct demonstration tasks (drawn from the training tasks).")
    include_zoom: bool = setting(True, "Demonstrations zoom on the ground-truth box before answering; False: "
                                       "answer directly.")
    zoom_fraction: float = setting(1.0, "With include_zoom: the seeded share of demonstrations that zoom; the rest "
                                        "answer directly (a low starting tool-call rate for RL to raise).")


@dataclass
class ResourcesConfig:
    num_env_runners: int = setting(0, "Remote env runners (0: sample in the driver process).")
    num_learners: int = setting(0, "Remote learners, one per GPU in practice (0: learn in the driver process). "
                                   "With 2+ they train data-parallel (gradient all-reduce).")
    learner_sharding: str = setting("none", "With 2+ learners: 'none' (every learner holds the full model, gradients "
                                            "all-reduced) or 'fsdp2' (PyTorch FSDP2: parameters, gradients and "
                                            "optimizer state sharded per decoder layer; checkpoints and weight syncs "
                                            "stay full state dicts).")
    num_cpus_per_env_runner: float = setting(1, "CPUs reserved per env runner.")
    num_gpus_per_env_runner: float = setting(0, "GPUs per env runner (vLLM engines need 1 or more).")
    num_cpus_per_learner: float = setting(1, "CPUs reserved per remote learner.")
    num_gpus_per_learner: float = setting(0, "GPUs per learner.")
    env_runner_resources: dict = setting({}, "Custom Ray resources per env runner, e.g. {runner_slot: 1} to "
                                             "spread them.")
    torch_threads: int = setting(2, "torch threads per process (keep cores for the other processes).")
    ray_num_cpus: Optional[int] = setting(2, "CPUs of the local Ray instance train.py starts (ignored with --address).")
    object_store_mb: int = setting(256, "Object store of the local Ray instance, MB (small: trajectories are small).")
    restart_failed_env_runners: bool = setting(True, "Restart env runners that die and carry on without their batch.")
    sample_timeout_s: float = setting(1800.0, "Give up on an env runner's batch after this many seconds.")


@dataclass
class LoggingConfig:
    run_dir: str = setting("runs/{name}", "Output directory ({name} is the run name). A rerun resumes from it.")
    eval_every: int = setting(5, "Evaluate on held-out tasks every N iterations (and at the start and end; 0: never).")
    checkpoint_every: int = setting(5, "Save a checkpoint every N iterations (and at the end).")
    keep_checkpoints: int = setting(2, "Checkpoints kept on disk (older ones are deleted).")
    save_trajectories_every: int = setting(10, "Save sample trajectories every N iterations (0: never).")
    n_saved_trajectories: int = setting(8, "Trajectories saved each time.")
    tensorboard: bool = setting(True, "Write TensorBoard scalars to <run_dir>/tb.")
    report: bool = setting(True, "Write report.md and PNG plots at the end.")
    progress: bool = setting(True, "Show tqdm progress bars (SFT steps, iterations).")


@dataclass
class TrainConfig:
    name: str = setting("run", "Run name (used in run_dir).")
    seed: int = setting(0, "Seed of everything: torch, sampling, data order.")
    iterations: int = setting(100, "RL iterations (one batch of rollouts and its updates each).")
    resume: bool = setting(True, "Resume from the newest checkpoint in run_dir when there is one.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir.format(name=self.name))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Cross-field checks whose failure would otherwise show up deep inside a run."""
        from deepeyes_agent.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGG_MODES

        algo, rollout = self.algorithm, self.rollout
        problems = []
        if algo.advantage not in ADVANTAGE_ESTIMATORS:
            problems.append(f"algorithm.advantage must be one of {ADVANTAGE_ESTIMATORS}, got {algo.advantage!r}")
        if algo.loss_agg not in LOSS_AGG_MODES:
            problems.append(f"algorithm.loss_agg must be one of {LOSS_AGG_MODES}, got {algo.loss_agg!r}")
        if algo.kl_estimator not in KL_ESTIMATORS:
            problems.append(f"algorithm.kl_estimator must be one of {KL_ESTIMATORS}, got {algo.kl_estimator!r}")
        if algo.vf_clip is not None and algo.vf_clip <= 0:
            problems.append(f"algorithm.vf_clip must be positive or null, got {algo.vf_clip}")
        if not 0.0 <= algo.lam <= 1.0 or not 0.0 <= algo.gamma <= 1.0:
            problems.append("algorithm.gamma and algorithm.lam must lie in [0, 1]")
        if rollout.engine not in ("hf", "vllm"):
            problems.append(f"rollout.engine must be 'hf' or 'vllm', got {rollout.engine!r}")
        if algo.advantage in ("grpo", "dr_grpo", "rloo") and rollout.rollouts_per_prompt < 2:
            problems.append(f"{algo.advantage} needs rollout.rollouts_per_prompt >= 2 (a group baseline)")
        if not self.model.path and not self.model.build_tiny:
            problems.append("set model.path to a local model directory (or model.build_tiny=true)")
        if self.model.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"model.dtype must be float32, bfloat16 or float16, got {self.model.dtype!r}")
        if self.resources.learner_sharding not in ("none", "fsdp2"):
            problems.append(f"resources.learner_sharding must be 'none' or 'fsdp2', got "
                            f"{self.resources.learner_sharding!r}")
        batch = rollout.prompts_per_iteration * rollout.rollouts_per_prompt
        parts = max(1, self.resources.num_learners) * algo.minibatches
        if batch % parts:
            problems.append(f"the batch of {batch} trajectories does not split into {algo.minibatches} minibatch(es) "
                            f"x {max(1, self.resources.num_learners)} learner(s)")
        for name in ("iterations", "rollout.prompts_per_iteration", "rollout.max_tokens", "algorithm.epochs",
                     "algorithm.minibatches", "algorithm.micro_batch_size", "resources.torch_threads"):
            if get_dotted(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
        return self


class ConfigError(ValueError):
    """A config file or override that does not fit :class:`TrainConfig`."""


# --------------------------------------------------------------------------------------------------
# Reading files and overrides
# --------------------------------------------------------------------------------------------------


def all_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf setting as ``dotted.key -> Field``."""
    out: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(all_keys(hints[f.name], key + "."))
        else:
            out[key] = f
    return out


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(all_keys()), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; `python train.py --describe` lists every setting"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type, converting the harmless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif annotation is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


def set_dotted(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set one setting by its dotted key, type-checked."""
    parts = key.split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise _unknown_key(key)
        target = getattr(target, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
        raise _unknown_key(key)
    annotation = _field_type(type(target), leaf)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; give its settings as a mapping")
        for sub, sub_value in value.items():
            set_dotted(cfg, f"{key}.{sub}", sub_value)
        return
    setattr(target, leaf, _coerce(key, value, annotation))


def get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` down to the leaf settings (dict-typed settings stay whole)."""
    leaves = all_keys()
    out = {}
    for key, value in mapping.items():
        dotted = prefix + str(key)
        if isinstance(value, dict) and dotted not in leaves:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> (key, YAML-parsed value): ``lr=1e-5`` is a float, ``x=null`` is None."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    cfg = TrainConfig()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file is a mapping of settings")
        for key, value in _flatten(data).items():
            set_dotted(cfg, key, value)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(cfg, key, value)
    return cfg.validate()


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from :meth:`TrainConfig.to_dict` output (e.g. a run's saved config.yaml)."""
    cfg = TrainConfig()
    for key, value in _flatten(data).items():
        set_dotted(cfg, key, value)
    return cfg


def describe() -> str:
    """A table of every setting: key, default, help."""
    defaults = TrainConfig()
    lines = ["| setting | default | what it does |", "|---|---|---|"]
    for key, f in all_keys().items():
        default = get_dotted(defaults, key)
        lines.append(f"| `{key}` | `{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines)
