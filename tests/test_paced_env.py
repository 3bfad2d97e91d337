"""PacedEnv: episodes last the number of turns drawn at reset, whatever the model writes."""

from __future__ import annotations

import collections

import gymnasium as gym
import pytest

import deepeyes_envs  # noqa: F401 - registers the envs
from deepeyes_envs.paced import GO_ON


def play(env, seed: int, turn: str) -> tuple[int, int, dict]:
    _, info = env.reset(seed=seed)
    for n in range(1, 10):
        obs, reward, terminated, truncated, step_info = env.step({"text": turn, "finish_reason": "stop"})
        if terminated or truncated:
            return info["target_turns"], n, step_info
        assert obs["messages"][0]["content"][0]["text"] == GO_ON
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("turn", ["<answer>red</answer>", "no idea", '<tool_call>{"name": "x"}</tool_call>'])
def test_an_episode_lasts_the_drawn_turns_whatever_the_model_writes(turn):
    env = gym.make("paced", disable_env_checker=True)
    lengths = collections.Counter()
    for seed in range(200):
        target, played, info = play(env, seed, turn)
        assert played == target
        lengths[target] += 1
    assert set(lengths) == {1, 2, 3, 4, 5}
    assert lengths[1] > lengths[3] > lengths[5]  # a long tail: most episodes short
    assert info["end_reason"] in ("answer", "no_tool_call", "max_turns")


def test_the_last_turn_is_scored_as_a_tool_env_scores_it():
    env = gym.make("paced", disable_env_checker=True, turn_weights=[0, 1])
    _, info = env.reset(seed=0)
    answer = env.unwrapped.task.answer
    env.step("<answer>wrong</answer>")
    _, reward, terminated, _, info = env.step(f"<answer>{answer}</answer>")
    assert terminated and info["end_reason"] == "answer" and reward > 0


@pytest.mark.parametrize("kwargs", [{"turn_weights": []}, {"turn_weights": [0, 0]}, {"turn_weights": [1, -1]},
                                    {"turn_latency_s": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="turn_"):
        gym.make("paced", disable_env_checker=True, **kwargs)


def test_a_turn_lasts_at_least_the_latency():
    """(Whether a runner's episodes wait together is measured by benchmarks/async_train.py, not asserted.)"""
    import time

    env = gym.make("paced", disable_env_checker=True, turn_weights=[0, 0, 1], turn_latency_s=0.2)
    env.reset(seed=0)
    start = time.monotonic()
    for _ in range(3):
        env.step("thinking")
    assert time.monotonic() - start >= 3 * 0.2  # a lower bound the deadline guarantees, not a timing
