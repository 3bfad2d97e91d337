"""Zoom controls (deepeyes_agent.rollout.controls): the env plays the control's turn, the episode's context
records what was played, and the grounding metrics say where the boxes went."""

from __future__ import annotations

import json

import gymnasium as gym
import pytest

from deepeyes_agent.rollout.controls import Control, ControlledActions, centre_box
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine
from deepeyes_agent.rollout.loop import run_episodes
from deepeyes_agent.rollout.metrics import batch_metrics, episode_metrics, most_common_box
from deepeyes_envs.scripted import box_in_frame, padded_box
from deepeyes_envs.synthetic import ToyConfig, toy_task

TASKS = [toy_task(5, i, ToyConfig(kind="zoom", frame_layout="random", target_size=13)) for i in range(3)]
ENV_KWARGS = {"max_turns": 3, "prompt_style": "plain", "tools": ["image_zoom_in_tool"], "min_pixels": 3136,
              "max_pixels": 3136}


def zoom(box: list[int]) -> str:
    return f'<tool_call>\n{json.dumps({"name": "image_zoom_in_tool", "arguments": {"bbox_2d": box}})}\n</tool_call>'


def test_a_fixed_box_control_zooms_there_whatever_the_policy_wrote():
    env = ControlledActions(gym.make("visual_toolbox", disable_env_checker=True, **ENV_KWARGS),
                            Control("fixed_box", (20, 20, 36, 36)))
    env.reset(seed=0, options={"task": TASKS[0]})
    _, _, terminated, _, info = env.step({"text": zoom([1, 2, 40, 41]), "finish_reason": "stop"})
    assert not terminated and info["played_action"] == zoom([20, 20, 36, 36])
    assert info["tool_calls"][0]["arguments"]["bbox_2d"] == [20, 20, 36, 36]
    assert info["tool_calls"][0]["bbox_original"] == [80.0, 80.0, 144.0, 144.0]  # 224 px seen at 56: x4
    _, _, terminated, _, info = env.step({"text": "<answer>red</answer>", "finish_reason": "stop"})
    assert terminated and info["played_action"] is None  # no box in an answer: nothing replaced
    env.close()


def test_the_oracle_control_zooms_on_the_padded_ground_truth_first():
    env = ControlledActions(gym.make("visual_toolbox", disable_env_checker=True, **ENV_KWARGS), Control("oracle_zoom"))
    _, reset_info = env.reset(seed=0, options={"task": TASKS[1]})
    _, _, _, _, info = env.step({"text": "<answer>red</answer>", "finish_reason": "stop"})
    expected = [round(v) for v in box_in_frame(padded_box(TASKS[1].gt_boxes[0], 224, 224), reset_info)]
    assert info["tool_calls"][0]["arguments"]["bbox_2d"] == expected and info["tool_calls"][0]["ok"]
    assert info["tool_calls"][0]["iou"] > 0.4
    env.close()


def test_the_oracle_control_zooms_with_the_demonstrations_margin():
    env = ControlledActions(gym.make("visual_toolbox", disable_env_checker=True, **ENV_KWARGS),
                            Control("oracle_zoom", margin=0.0))
    _, reset_info = env.reset(seed=0, options={"task": TASKS[1]})
    _, _, _, _, info = env.step({"text": "<answer>red</answer>", "finish_reason": "stop"})
    expected = [round(v) for v in box_in_frame(TASKS[1].gt_boxes[0], reset_info)]  # the frame's own box
    assert info["tool_calls"][0]["arguments"]["bbox_2d"] == expected and info["tool_calls"][0]["iou"] > 0.8
    env.close()


def test_controls_refuse_what_they_cannot_play():
    with pytest.raises(ValueError, match="control kind"):
        Control("blindfold")
    with pytest.raises(ValueError, match="box of 4"):
        Control("fixed_box", (1, 2, 3))
    assert centre_box((56, 56), 16) == (20, 20, 36, 36)


def test_the_loop_records_the_played_turn_and_the_metrics_see_the_box(policy):
    engine = HFEngine(policy.model, policy.processor)
    env_kwargs = {k: v for k, v in ENV_KWARGS.items() if "pixels" not in k}  # the processor's budget
    batch = run_episodes(TASKS, engine, policy.processor, env_id="visual_toolbox", env_kwargs=env_kwargs,
                         sampling=SamplingParams(max_tokens=8, temperature=1.0), seed=3, max_total_tokens=2048,
                         env_wrapper=Control("oracle_zoom").wrapper())
    records = []
    for traj in batch:
        first = traj.turns[0]
        assert first.scripted_action and "image_zoom_in_tool" in first.scripted_action
        assert first.scripted_action in traj.context.decode()  # the context holds the played turn, not the sample
        assert traj.context.logprobs[traj.context.prompt_length] == 0.0  # written, not sampled
        records.append(episode_metrics(traj))
        assert records[-1]["box_centre_hit"] == 1.0 and records[-1]["image_observations"] >= 1
    summary = batch_metrics(records)
    assert summary["box_centre_hit"] == 1.0 and summary["top_box_share"] == pytest.approx(1 / 3)  # three frames
    assert most_common_box(records) == records[0]["first_box"]  # a tie: the first one written
