"""The multi-turn rollout loop: play episodes with tools, all active episodes generating together.

Each turn the loop asks the engine for one assistant turn for every episode still running (one batched
call), steps each env with the generated text, appends the env's observation to the episode's token
context, and drops finished episodes from the batch. Rewards are judged at the very end, for every
episode at once, through ``deepeyes_envs.rewards.score_episodes`` (the judge's concurrent batch API),
because a judge called per episode is the classic DeepEyes bottleneck.

No Ray and no threads: a plain loop that works the same in a script, a test or a notebook. RLlib's env
runners call :func:`run_episodes` inside their own process. The loop knows the env only through Gymnasium's
contract (``reset`` / ``step`` and their ``info``), so any env that keeps it plays here.

A task the env cannot reset on (a ``TaskError``: a row whose image does not decode, say) ends its episode at
once with ``end_reason == "bad_task"`` and the error in ``info``, without stopping the others.

Ending rules on top of the env's own (answer, no tool call, cut-off reply, max turns): an observation
that does not fit the token budget is dropped whole, the env is closed and the trajectory ends with
``end_reason == "token_budget"`` and ``truncated`` set (docs/deepeyes.md, "The v2 env"); its reward is judged
on what the model's context holds.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import gymnasium as gym

import deepeyes_envs  # noqa: F401 - registers the envs with gymnasium
from deepeyes_agent.policy.chat import (
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_TOTAL_TOKENS,
    EpisodeContext,
    PromptTooLongError,
    VisionTokenizer,
)
from deepeyes_agent.policy.loading import QwenVLImageProcessor
from deepeyes_agent.rollout.engine import Engine, Generation, SamplingParams
from deepeyes_agent.rollout.seeding import derive_seed
from deepeyes_agent.rollout.trajectory import Trajectory, TrajectoryBatch, Turn
from deepeyes_envs.data.tasks import BadRow, Task, TaskError
from deepeyes_envs.judges import JudgeSpec, make_judge
from deepeyes_envs.messages import message_images
from deepeyes_envs.registry import env_id_for
from deepeyes_envs.rewards import EpisodeOutcome, score_episodes

DEFAULT_SAMPLING = SamplingParams(max_tokens=512, temperature=1.0)


@dataclasses.dataclass
class _Episode:
    """Loop bookkeeping for one running episode."""

    env: gym.Env
    trajectory: Trajectory
    context: EpisodeContext | None = None
    outcome: EpisodeOutcome | None = None
    done: bool = False


def run_episodes(tasks: Sequence[Task], engine: Engine, processor: QwenVLImageProcessor, *, n_per_task: int = 1,
                 sampling: SamplingParams = DEFAULT_SAMPLING, env_id: str | None = None,
                 env_kwargs: Mapping[str, Any] | None = None, judge: JudgeSpec = "rule",
                 max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
                 max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS, seed: int = 0,
                 progress: bool = False, env_wrapper: Callable[[gym.Env], gym.Env] | None = None) -> TrajectoryBatch:
    """Play ``n_per_task`` episodes of each task (a GRPO group per task) and return their trajectories.

    Envs are made per episode with ``gym.make(env_id or env_id_for(task), defer_reward=True, **env_kwargs)``,
    reading images in the processor's pixel budget (:func:`env_kwargs_for`), and reset with ``seed + episode
    number`` and the task. Trajectories come back in task order, the
    group's rollouts together; ``group_id`` is the task's index in ``tasks``. The returned list also
    carries run-level ``timings`` (reset, generate, env step, judge, total, tokens per second).
    ``env_wrapper`` wraps each new env (e.g. ``ScriptedActions`` from ``rollout.scripted``).
    """
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be at least 1, got {n_per_task}")
    vision = VisionTokenizer(processor)
    kwargs = env_kwargs_for(vision, env_kwargs)
    envs, plan = [], []
    for group, task in enumerate(tasks):
        name = env_id or env_id_for(task)
        for k in range(n_per_task):
            env = gym.make(name, disable_env_checker=True, **{**kwargs, "defer_reward": True})
            envs.append(env_wrapper(env) if env_wrapper is not None else env)
            plan.append((task, group, k, name))
    return _play(envs, plan, engine, vision, env_kwargs=kwargs, sampling=sampling, judge=judge,
                 max_total_tokens=max_total_tokens, max_prompt_tokens=max_prompt_tokens, seed=seed,
                 progress=progress)


def env_kwargs_for(vision: VisionTokenizer, env_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``env_kwargs`` plus the processor's image geometry (pixel budget and resize factor): the env must read
    boxes in the frame the model saw.

    A geometry given in ``env_kwargs`` that differs from the processor's would give the env another seen frame
    than the model's, so it is an error rather than silently overridden.
    """
    kwargs = dict(env_kwargs or {})
    geometry = (("min_pixels", vision.min_pixels), ("max_pixels", vision.max_pixels),
                ("image_factor", vision.patch_size * vision.merge_size))
    for key, value in geometry:
        if kwargs.setdefault(key, value) != value:
            raise ValueError(f"env {key}={kwargs[key]} differs from the processor's {value}: set the budget on the "
                             f"processor (load_processor(..., {key}=...)) and the envs follow it")
    return kwargs


# ------------------------------------------------------------------------------------------ the loop
def _play(envs: list[gym.Env], plan: list[tuple], engine: Engine, vision: VisionTokenizer, *,
          env_kwargs: dict[str, Any], sampling: SamplingParams, judge: JudgeSpec, max_total_tokens: int,
          max_prompt_tokens: int | None, seed: int, progress: bool) -> TrajectoryBatch:
    start = time.perf_counter()
    timings = {"reset_s": 0.0, "generate_s": 0.0, "env_step_s": 0.0, "judge_s": 0.0}
    episodes = []
    for i, (env, (task, group, k, name)) in enumerate(zip(envs, plan, strict=True)):
        t0 = time.perf_counter()
        episodes.append(_start(env, task, group, k, name, seed + i, vision, env_kwargs, max_total_tokens,
                               max_prompt_tokens))
        timings["reset_s"] += time.perf_counter() - t0
    turn = 0
    while active := [e for e in episodes if not e.done]:
        params = _turn_params(sampling, seed, turn)
        t0 = time.perf_counter()
        generations = engine.generate([e.context for e in active], params)
        generate_s = time.perf_counter() - t0
        timings["generate_s"] += generate_s
        t0 = time.perf_counter()
        for episode, generation in zip(active, generations, strict=True):
            _advance(episode, generation, generate_s, vision)
            if episode.done:
                engine.release([episode.context])
        timings["env_step_s"] += time.perf_counter() - t0
        turn += 1
        if progress:
            tokens = sum(len(g.token_ids) for g in generations)
            print(f"turn {turn}: {len(active)} episodes, {tokens} tokens in {generate_s:.2f} s, "
                  f"{len(active) - sum(e.done for e in active)} continue", file=sys.stderr)
    t0 = time.perf_counter()
    judge_trajectories(((e.trajectory, e.outcome) for e in episodes), judge)
    timings["judge_s"] = time.perf_counter() - t0
    for episode in episodes:
        episode.env.close()
        episode.trajectory.timings["judge_s"] = timings["judge_s"]
    timings["turns"] = float(turn)
    timings["total_s"] = time.perf_counter() - start
    generated = sum(e.trajectory.n_generated_tokens for e in episodes)
    timings["generated_tokens"] = float(generated)
    timings["generate_tokens_per_s"] = generated / timings["generate_s"] if timings["generate_s"] else 0.0
    return TrajectoryBatch([e.trajectory for e in episodes], timings)


def _turn_params(sampling: SamplingParams, seed: int, turn: int) -> SamplingParams:
    """Per-turn sampling seed derived from the run seed, so a run is reproducible turn by turn."""
    base = sampling.seed if sampling.seed is not None else seed
    return dataclasses.replace(sampling, seed=derive_seed(base, turn))


def open_episode(env: gym.Env, task: Task, *, group: int, k: int, name: str, reset_seed: int,
                 **fields: Any) -> tuple[dict[str, Any] | None, Trajectory]:
    """Reset ``env`` on ``task`` and start its trajectory (``fields`` are further ``Trajectory`` fields).

    A task the env cannot reset on (a ``TaskError``: a row whose image does not decode, say) is no reason to
    stop the other episodes: the observation comes back None and the trajectory already ended, with
    ``end_reason == "bad_task"``, the error, a ``BadRow`` record in ``info["bad_row"]`` and no reward. The local
    loop and the endpoint player (``rollout.endpoint``) both start episodes here, so both treat a bad row alike.
    """
    try:
        obs, _ = env.reset(seed=reset_seed, options={"task": task})
    except TaskError as exc:
        trajectory = Trajectory(task_id=task.task_id, group_id=group, env_id=name, episode_index=k, seed=reset_seed,
                                task=task, end_reason="bad_task", truncated=True, info={"error": str(exc)},
                                reward_parts={"score": 0.0, "acc": 0.0})
        trajectory.info["bad_row"] = BadRow.from_error(exc).to_json()
        return None, trajectory
    prompt = tuple(obs["messages"])
    trajectory = Trajectory(task_id=task.task_id, group_id=group, env_id=name, prompt=prompt, episode_index=k,
                            seed=reset_seed, task=task, task_images=message_images(prompt), **fields)
    return obs, trajectory


@dataclasses.dataclass
class TurnStep:
    """What one env step made of a generated turn (:func:`step_turn`)."""

    turn: Turn
    observation: Sequence[Any]
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]

    @property
    def played(self) -> str | None:
        """The text a control (``rollout.controls``) played in the policy's place, if it did."""
        return self.info.get("played_action")


def step_turn(env: gym.Env, trajectory: Trajectory, text: str, finish_reason: str, *,
              token_ids: Sequence[int] = (), logprobs: Sequence[float] = (), token_texts: Sequence[str] = (),
              generate_s: float = 0.0, metrics: Mapping[str, float] | None = None) -> TurnStep:
    """Record a generated turn in ``trajectory`` and step ``env`` with it: the tool calls, zoom boxes, error and
    observation go into the turn. Shared by the local loop (token ids and logprobs) and the endpoint player
    (text only), so a trajectory reads the same whichever played it."""
    turn = Turn(text=text, token_ids=list(token_ids), logprobs=list(logprobs), finish_reason=finish_reason,
                generate_s=generate_s, token_texts=list(token_texts), metrics=dict(metrics or {}))
    trajectory.turns.append(turn)
    t0 = time.perf_counter()
    obs, reward, terminated, truncated, info = env.step({"text": text, "finish_reason": finish_reason})
    turn.env_s = time.perf_counter() - t0
    turn.tool_calls = list(info.get("tool_calls", []))
    trajectory.zoom_boxes.extend(list(c["bbox_original"]) for c in turn.tool_calls if "bbox_original" in c)
    turn.error = info.get("error")
    turn.observation = tuple(obs["messages"])
    turn.scripted_action = info.get("played_action") or info.get("scripted_action")
    trajectory.timings["generate_s"] = trajectory.timings.get("generate_s", 0.0) + generate_s
    trajectory.timings["env_s"] = trajectory.timings.get("env_s", 0.0) + turn.env_s
    return TurnStep(turn, turn.observation, float(reward), bool(terminated), bool(truncated), info)


def end_trajectory(trajectory: Trajectory, end_reason: str, terminated: bool, truncated: bool,
                   info: Mapping[str, Any], reward: float) -> EpisodeOutcome | None:
    """Close the trajectory's bookkeeping; returns the outcome to judge, or None when the env scored itself
    (made without ``defer_reward``), whose reward is then taken as it is."""
    trajectory.end_reason, trajectory.terminated, trajectory.truncated = end_reason, terminated, truncated
    trajectory.info["episode_summary"] = info.get("episode_summary", {})
    outcome = info.get("outcome")
    if outcome is None:
        trajectory.reward = float(reward)
        trajectory.reward_parts = dict(info.get("reward_parts") or {"score": float(reward)})
    return outcome


def judge_trajectories(pairs: Iterable[tuple[Trajectory, EpisodeOutcome | None]], judge: JudgeSpec) -> None:
    """Score every trajectory that has an outcome, in one batch (the judge runs its requests concurrently)."""
    pending = [(t, o) for t, o in pairs if o is not None]
    if not pending:
        return
    for (trajectory, _), parts in zip(pending, score_episodes([o for _, o in pending], make_judge(judge)),
                                      strict=True):
        trajectory.reward = float(parts.score)
        trajectory.reward_parts = parts.as_dict()


def _start(env: gym.Env, task: Task, group: int, k: int, name: str, reset_seed: int, vision: VisionTokenizer,
           env_kwargs: dict[str, Any], max_total_tokens: int, max_prompt_tokens: int | None) -> _Episode:
    """Reset the env and open the episode's token context; a prompt over budget ends it at once."""
    t0 = time.perf_counter()
    obs, trajectory = open_episode(env, task, group=group, k=k, name=name, reset_seed=reset_seed,
                                   max_total_tokens=max_total_tokens, env_kwargs=env_kwargs)
    episode = _Episode(env=env, trajectory=trajectory, done=obs is None)
    if obs is None:
        return episode
    try:
        episode.context = EpisodeContext(vision.processor, trajectory.prompt, max_total_tokens=max_total_tokens,
                                         max_prompt_tokens=max_prompt_tokens, vision=vision)
    except PromptTooLongError as exc:
        trajectory.end_reason, trajectory.truncated, episode.done = "prompt_too_long", True, True
        trajectory.info["error"] = str(exc)
        trajectory.reward_parts = {"score": 0.0, "acc": 0.0}
    _sync(episode)
    trajectory.timings["reset_s"] = time.perf_counter() - t0
    return episode


def _advance(episode: _Episode, generation: Generation, generate_s: float, vision: VisionTokenizer) -> None:
    """Append the generated turn, step the env with it, and append (or drop) its observation."""
    ctx, trajectory = episode.context, episode.trajectory
    text = generation.text or vision.decode(generation.token_ids)
    step = step_turn(episode.env, trajectory, text, generation.finish_reason, token_ids=generation.token_ids,
                     logprobs=generation.logprobs, token_texts=[vision.decode([t]) for t in generation.token_ids],
                     generate_s=generate_s, metrics=generation.metrics)
    ended = step.terminated or step.truncated
    if step.played is None:  # a control (rollout.controls) played another turn: the context holds it
        ctx.append_generated(generation.token_ids, generation.logprobs)
    else:
        ctx.append_written(step.played, ends_turn=ended)
    if ended:
        episode.done = True
        episode.outcome = end_trajectory(trajectory, step.info.get("end_reason", ""), step.terminated, step.truncated,
                                         step.info, step.reward)
    elif not ctx.append_observation(step.observation):
        step.turn.observation_dropped = True
        episode.done = True
        end_trajectory(trajectory, "token_budget", False, True, step.info, 0.0)
        episode.outcome = EpisodeOutcome(response_text=ctx.decode(ctx.token_ids[ctx.prompt_length:]),
                                         task=trajectory.task,
                                         n_image_observations=len(ctx.images) - trajectory.n_prompt_images,
                                         call_cost=episode.env.spec.kwargs.get("call_cost") if episode.env.spec
                                         else None)
        episode.env.close()
    _sync(episode)


def _sync(episode: _Episode) -> None:
    """Mirror the context into the trajectory (the same list objects)."""
    trajectory, ctx = episode.trajectory, episode.context
    trajectory.context = ctx
    if ctx is not None:
        trajectory.token_ids, trajectory.loss_mask, trajectory.logprobs = ctx.token_ids, ctx.loss_mask, ctx.logprobs
        trajectory.images, trajectory.image_grid_thw = ctx.images, ctx.image_grid_thw
