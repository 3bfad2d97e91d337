"""A visual_code episode through the agent's rollout loop, on the tiny model: the code tool's image is handled
exactly like a zoom crop (a context image in an observation segment, loss mask 0, the token budget, the
training forward, saved trajectories, HTML). The envs are wrapped in ``ScriptedActions`` (the counting program,
then the answer), since a random model writes no tool calls; the model still samples every turn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepeyes_agent.policy.chat import collate
from deepeyes_agent.policy.logprobs import token_logprobs
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine
from deepeyes_agent.rollout.loop import run_episodes
from deepeyes_agent.rollout.scripted import ScriptedActions
from deepeyes_agent.rollout.trajectory import load_trajectories, save_trajectories
from deepeyes_envs.scripted import answer_turn, count_code_turn
from deepeyes_envs.synthetic import SyntheticTaskSource

torch.set_num_threads(2)
PARAMS = SamplingParams(max_tokens=5, stop=())


def code_script(task, reset_info) -> list[str]:
    return [count_code_turn(task.extra["color"], task.extra["rgb"]), answer_turn(task.answer)]


def with_code_script(env):
    return ScriptedActions(env, code_script)


@pytest.fixture(scope="module")
def task():
    return SyntheticTaskSource(n=1, seed=0, kind="count")[0]


@pytest.fixture(scope="module")
def trajectory(policy, task):
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    (traj,) = run_episodes([task], engine, policy.processor, sampling=PARAMS, env_wrapper=with_code_script,
                           max_total_tokens=4096)
    return traj


def test_the_code_tools_image_is_a_context_image_with_loss_mask_0(trajectory, task):
    traj = trajectory
    assert traj.env_id == "visual_code" and traj.n_turns == 2 and traj.end_reason == "answer"
    (call,) = traj.turns[0].tool_calls
    assert call["name"] == "python_tool" and call["ok"] and call["status"] == "ok" and call["images_shown"] == 1
    assert traj.n_image_observations == 1 and len(traj.images) == 2
    mask = traj.images[1]
    target = (task.images[0].load() == task.extra["rgb"]).all(axis=2)
    np.testing.assert_array_equal(mask[:, :, 0] == 255, target)  # the program's mask of the asked colour
    ctx = traj.context
    observation = ctx.segments[2]
    assert observation.kind == "observation" and (observation.image_start, observation.image_end) == (1, 2)
    assert set(ctx.loss_mask[observation.start:observation.end]) == {0}
    pads = [i for i in range(observation.start, observation.end) if ctx.token_ids[i] == ctx.vision.image_token_id]
    assert len(pads) == ctx.image_grid_thw[1][1] * ctx.image_grid_thw[1][2] // 4  # the image's tokens, merged 2x2
    assert sum(ctx.loss_mask) == traj.n_generated_tokens == 2 * 5
    assert traj.reward_parts["acc"] == 1.0 and traj.reward_parts["tool"] == 1.0 and traj.reward == pytest.approx(2.0)


def test_the_training_forward_reads_the_context_with_the_codes_image(policy, trajectory):
    inputs = collate([trajectory.context])
    assert inputs["image_grid_thw"].shape[0] == 2  # the task image and the code's image, both fed to the model
    with torch.no_grad():
        recomputed = token_logprobs(policy.model, inputs, 1.0, trajectory.context.vision.vision_token_ids)
    mask = inputs["loss_mask"].bool()
    assert mask.sum() == 2 * 5
    assert (recomputed[mask] - inputs["old_logprobs"][mask]).abs().max().item() < 1e-4  # as sampled, image and all


def test_saved_trajectory_keeps_the_image_and_renders_it(trajectory, tmp_path):
    (back,) = load_trajectories(save_trajectories([trajectory], tmp_path / "saved"))
    assert back.token_ids == trajectory.token_ids and back.loss_mask == trajectory.loss_mask
    assert len(back.images) == 2 and all((a == b).all() for a, b in zip(back.images, trajectory.images, strict=True))
    assert back.turns[0].tool_calls[0]["name"] == "python_tool"
    page = trajectory._repr_html_()
    assert page.count("<img") == len(trajectory.images) + 1 and "python_tool" in page and "loss mask 0" in page


def test_an_observation_over_the_budget_is_dropped_whole(policy, task, trajectory):
    budget = trajectory.context.segments[1].end + 10  # the prompt and one turn fit; the code's image does not
    engine = HFEngine(policy.model, policy.processor)
    (traj,) = run_episodes([task], engine, policy.processor, sampling=PARAMS, env_wrapper=with_code_script,
                           max_total_tokens=budget)
    assert traj.end_reason == "token_budget" and traj.truncated and traj.turns[0].observation_dropped
    assert len(traj.images) == 1 and len(traj.token_ids) <= budget
