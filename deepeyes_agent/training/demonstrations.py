"""Supervised warm-start data: a scripted agent's episodes, tokenized exactly as a rollout would record them."""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym
import numpy as np

import deepeyes_envs  # noqa: F401 - registers the envs
from deepeyes_agent.policy.chat import EpisodeContext, VisionTokenizer
from deepeyes_agent.policy.loading import QwenVLImageProcessor
from deepeyes_agent.rollout.loop import env_kwargs_for
from deepeyes_agent.training.config import EnvConfig
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.registry import env_id_for
from deepeyes_envs.scripted import answer_turn, scripted_turns

DIRECT_THOUGHT = "I can see it."


def demonstration(task: Task, env_cfg: EnvConfig, processor: QwenVLImageProcessor, *, include_zoom: bool = True,
                  max_total_tokens: int = 28672, thoughts: bool = True, zoom_margin: float = 0.25) -> EpisodeContext:
    """A scripted agent's episode on ``task`` as a token context (loss mask 1 on its turns, logprobs 0).

    The env is the one a rollout would play (``env.env_id``, or the one the task's ``env_name`` routes to, in
    the processor's pixel budget), and each turn is tokenized as an engine would have produced it
    (``EpisodeContext.append_written``).
    """
    vision = VisionTokenizer(processor)
    env = gym.make(env_cfg.env_id or env_id_for(task), disable_env_checker=True,
                   **env_kwargs_for(vision, {**env_cfg.kwargs, "defer_reward": True}))
    try:
        obs, info = env.reset(options={"task": task})
        ctx = EpisodeContext(processor, obs["messages"], max_total_tokens=max_total_tokens, max_prompt_tokens=None,
                             vision=vision)
        if include_zoom:
            turns = scripted_turns(task, info, thoughts=thoughts, margin=zoom_margin)
        else:
            turns = [answer_turn(task.answer, DIRECT_THOUGHT if thoughts else None)]
        for text in turns:
            obs, _, terminated, truncated, _ = env.step(text)
            ctx.append_written(text, ends_turn=terminated or truncated)
            if terminated or truncated or not ctx.append_observation(obs["messages"]):
                break
        return ctx
    finally:
        env.close()


def demonstrations(tasks: Sequence[Task], env_cfg: EnvConfig, processor: QwenVLImageProcessor, *,
                   include_zoom: bool = True, max_total_tokens: int = 28672, zoom_fraction: float = 1.0,
                   seed: int = 0, thoughts: bool = True, zoom_margin: float = 0.25) -> list[EpisodeContext]:
    """Demonstrations of ``tasks``. With ``include_zoom``, a seeded ``zoom_fraction`` of them zoom then answer
    and the rest answer directly (a mix that leaves RL a low starting tool-call rate to raise)."""
    if not 0.0 <= zoom_fraction <= 1.0:
        raise ValueError(f"zoom_fraction must be within [0, 1], got {zoom_fraction}")
    n_zoom = round(zoom_fraction * len(tasks)) if include_zoom else 0
    zooms = set(np.random.default_rng([seed, 23]).permutation(len(tasks))[:n_zoom].tolist())
    return [demonstration(t, env_cfg, processor, include_zoom=i in zooms, max_total_tokens=max_total_tokens,
                          thoughts=thoughts, zoom_margin=zoom_margin) for i, t in enumerate(tasks)]
