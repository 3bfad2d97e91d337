"""One way to play episodes whatever the policy is: a local model (transformers or vLLM) or an endpoint.

Data selection and evaluation both need "play these tasks k times in this env and judge them"; a
:class:`Runner` hides whether the turns come from :func:`deepeyes_agent.rollout.loop.run_episodes` over a
local engine or from :func:`deepeyes_agent.rollout.endpoint.run_endpoint_episodes`. ``describe()`` names the
policy for the resume check (a run continued with another policy would mix results).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Protocol

from deepeyes_agent.policy.loading import QwenVLImageProcessor, load_processor
from deepeyes_agent.rollout.engine import Engine, SamplingParams
from deepeyes_agent.rollout.factory import EngineKind, make_engine
from deepeyes_agent.rollout.trajectory import TrajectoryBatch
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.judges import JudgeSpec


class Runner(Protocol):
    """Plays ``n_per_task`` episodes of each task and returns judged trajectories in task order."""

    def play(self, tasks: Sequence[Task], *, n_per_task: int, sampling: SamplingParams,
             env_id: Optional[str] = None, env_kwargs: Optional[Mapping[str, Any]] = None,
             judge: JudgeSpec = "rule", seed: int = 0) -> TrajectoryBatch: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LocalRunner:
    """A local engine and its processor, played through the rollout loop. ``on_close`` runs after the engine
    closes (e.g. removing the temporary export of a checkpoint)."""

    def __init__(self, engine: Engine, processor: QwenVLImageProcessor, *, description: Optional[dict[str, Any]] = None,
                 max_total_tokens: Optional[int] = None, max_prompt_tokens: Optional[int] = None,
                 on_close: Optional[Callable[[], None]] = None):
        self.engine, self.processor = engine, processor
        self.on_close = on_close
        self.description = dict(description or {"kind": type(engine).__name__})
        self.token_limits: dict[str, int] = {}
        if max_total_tokens is not None:
            self.token_limits["max_total_tokens"] = max_total_tokens
        if max_prompt_tokens is not None:
            self.token_limits["max_prompt_tokens"] = max_prompt_tokens

    def play(self, tasks: Sequence[Task], *, n_per_task: int, sampling: SamplingParams,
             env_id: Optional[str] = None, env_kwargs: Optional[Mapping[str, Any]] = None,
             judge: JudgeSpec = "rule", seed: int = 0) -> TrajectoryBatch:
        from deepeyes_agent.rollout.loop import run_episodes

        return run_episodes(list(tasks), self.engine, self.processor, n_per_task=n_per_task, sampling=sampling,
                            env_id=env_id, env_kwargs=env_kwargs, judge=judge, seed=seed, **self.token_limits)

    def describe(self) -> dict[str, Any]:
        return dict(self.description)

    def close(self) -> None:
        try:
            self.engine.close()
        finally:
            if self.on_close is not None:
                self.on_close()


class EndpointRunner:
    """An OpenAI-compatible endpoint (see :mod:`deepeyes_agent.rollout.endpoint`)."""

    def __init__(self, base_url: str, model: Optional[str] = None, *, api_key: Optional[str] = None,
                 concurrency: int = 8, timeout: float = 300.0):
        from deepeyes_agent.rollout.endpoint import EndpointPolicy

        self.policy = EndpointPolicy(base_url, model, api_key=api_key, concurrency=concurrency, timeout=timeout)

    def play(self, tasks: Sequence[Task], *, n_per_task: int, sampling: SamplingParams,
             env_id: Optional[str] = None, env_kwargs: Optional[Mapping[str, Any]] = None,
             judge: JudgeSpec = "rule", seed: int = 0) -> TrajectoryBatch:
        from deepeyes_agent.rollout.endpoint import run_endpoint_episodes

        return run_endpoint_episodes(tasks, self.policy, n_per_task=n_per_task, sampling=sampling, env_id=env_id,
                                     env_kwargs=env_kwargs, judge=judge, seed=seed)

    def describe(self) -> dict[str, Any]:
        return self.policy.describe()

    def close(self) -> None:
        self.policy.close()


def local_runner(path: str | os.PathLike, *, engine: EngineKind = "hf", device: str = "cpu", dtype: str = "float32",
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 max_total_tokens: Optional[int] = None, max_prompt_tokens: Optional[int] = None,
                 engine_kwargs: Optional[Mapping[str, Any]] = None) -> LocalRunner:
    """A runner for the policy at ``path`` with the transformers (``"hf"``) or vLLM (``"vllm"``) engine
    (``rollout.factory.make_engine``). ``path`` is a model directory, an export, a run directory or a checkpoint
    (``policy.export.resolve_policy_source``); a checkpoint is exported to a temporary directory first, removed
    at ``close()``. The processor is always ours (it builds the token contexts); vLLM gets the model directory
    and generates from those token ids."""
    from deepeyes_agent.policy.export import policy_model_dir, resolve_policy_source

    source = resolve_policy_source(path)
    description = {"kind": "local", "path": str(source.path), "engine": engine, "dtype": dtype,
                   "min_pixels": min_pixels, "max_pixels": max_pixels}
    if source.kind != "model":  # a plain model directory is described as before (old runs still resume)
        description.update(source.describe())
    model_dir, cleanup = policy_model_dir(source)
    try:
        processor = load_processor(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
        generator = make_engine(engine, model_dir, processor, dtype=dtype, device=device, vllm_kwargs=engine_kwargs)
    except BaseException:
        cleanup()
        raise
    return LocalRunner(generator, processor, description=description, max_total_tokens=max_total_tokens,
                       max_prompt_tokens=max_prompt_tokens, on_close=cleanup)


# ---------------------------------------------------------------------------------------------- command line
def add_policy_arguments(parser: Any) -> None:
    """The policy options shared by the selection and evaluation commands."""
    group = parser.add_argument_group("policy (one of --policy or --endpoint)")
    which = group.add_mutually_exclusive_group(required=True)
    which.add_argument("--policy", help="local model directory (Qwen2.5-VL layout), an exported run, a train.py run "
                                        "directory (its final policy) or a checkpoint (checkpoints/iter_N)")
    which.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    group.add_argument("--model", help="model name at the endpoint (default: the first of GET /models)")
    group.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                       help="endpoint key (default: $OPENAI_API_KEY, else EMPTY)")
    group.add_argument("--concurrency", type=int, default=8,
                       help="episodes in flight against the endpoint (default: %(default)s)")
    group.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                       help="engine for --policy (default: %(default)s)")
    group.add_argument("--device", default="cpu", help="torch device for --policy (default: %(default)s)")
    group.add_argument("--dtype", default="float32", help="weights dtype for --policy (default: %(default)s)")
    group.add_argument("--min-pixels", type=int, help="override the processor's pixel budget (default: the model's)")
    group.add_argument("--max-pixels", type=int, help="override the processor's pixel budget (default: the model's)")
    group.add_argument("--max-total-tokens", type=int, help="context budget per episode (prompt + response; "
                                                            "default: the run's, for a policy from a run)")


def runner_from_arguments(args: Any, run_settings: Optional[Mapping[str, Any]] = None) -> Runner:
    """Build the runner the parsed arguments of :func:`add_policy_arguments` describe; a local policy trained
    by ``train.py`` plays with its run's episode budgets (``run_settings``) unless the arguments set them."""
    if args.endpoint:
        return EndpointRunner(args.endpoint, args.model, api_key=args.api_key, concurrency=args.concurrency)
    run = run_settings or {}
    max_total = args.max_total_tokens if args.max_total_tokens is not None else run.get("max_total_tokens")
    return local_runner(args.policy, engine=args.engine, device=args.device, dtype=args.dtype,
                        min_pixels=args.min_pixels, max_pixels=args.max_pixels, max_total_tokens=max_total,
                        max_prompt_tokens=run.get("max_prompt_tokens"))
