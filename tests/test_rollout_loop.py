"""The rollout loop on the tiny model: GRPO groups, multi-turn zoom episodes, batching, budget truncation.

A random model never writes a tool call, so the envs are wrapped in ``ScriptedActions`` (three zooms, then
the right answer) while the model samples every turn for real; observations are the env's real crops.
"""

from __future__ import annotations

import pytest
import torch

from deepeyes_agent.policy.chat import collate
from deepeyes_agent.policy.logprobs import token_logprobs
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine
from deepeyes_agent.rollout.loop import run_episodes
from deepeyes_agent.rollout.scripted import ScriptedActions, zoom_script
from deepeyes_envs.scripted import answer_turn
from deepeyes_envs.synthetic import SyntheticTaskSource

torch.set_num_threads(2)
PARAMS = SamplingParams(max_tokens=6, stop=())


@pytest.fixture(scope="module")
def tasks():
    source = SyntheticTaskSource(n=2, seed=0, kind="toy_zoom")
    return [source[0], source[1]]


@pytest.fixture(scope="module")
def batch(policy, tasks):
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    return run_episodes(tasks, engine, policy.processor, n_per_task=2, sampling=PARAMS, seed=3,
                        env_wrapper=ScriptedActions, max_total_tokens=4096)


def test_groups_turns_and_images(batch, tasks) -> None:
    assert [t.group_id for t in batch] == [0, 0, 1, 1]
    assert [t.task_id for t in batch] == [tasks[0].task_id] * 2 + [tasks[1].task_id] * 2
    assert [t.episode_index for t in batch] == [0, 1, 0, 1]
    for traj in batch:
        assert traj.n_turns == 4 and traj.n_tool_calls == 3 and traj.end_reason == "answer"
        assert len(traj.images) == 4 and len({g for g in traj.image_grid_thw}) >= 3  # crops of different sizes
        assert traj.context is not None and traj.token_ids == traj.context.token_ids
        assert [len(t.token_ids) for t in traj.turns] == [6, 6, 6, 6]
        assert all(t.scripted_action for t in traj.turns)
    # Rollouts of one group sampled different tokens.
    assert batch[0].turns[0].token_ids != batch[1].turns[0].token_ids


def test_rewards_judged_in_one_batch(batch) -> None:
    for traj in batch:  # the scripted answer is the ground truth, after successful zooms
        assert traj.reward_parts["acc"] == 1.0 and traj.reward_parts["tool"] == 1.0
        assert traj.reward == pytest.approx(2.0)
        assert traj.timings["judge_s"] == batch.timings["judge_s"]
    for key in ("reset_s", "generate_s", "env_step_s", "judge_s", "total_s", "generate_tokens_per_s"):
        assert batch.timings[key] >= 0
    assert batch.timings["generated_tokens"] == 4 * 4 * 6


def test_recorded_logprobs_equal_training_forward(policy, batch) -> None:
    contexts = [t.context for t in batch]
    inputs = collate(contexts)
    with torch.no_grad():
        recomputed = token_logprobs(policy.model, inputs, 1.0, contexts[0].vision.vision_token_ids)
    mask = inputs["loss_mask"].bool()
    assert mask.sum() == 4 * 4 * 6
    assert (recomputed[mask] - inputs["old_logprobs"][mask]).abs().max().item() < 1e-4


def test_finished_episodes_leave_the_batch(policy, tasks) -> None:
    def script(task, info):  # the first episode answers at once, the second zooms three times first
        return [answer_turn("red")] if task is tasks[0] else zoom_script(task, info)

    engine = HFEngine(policy.model, policy.processor)  # the default: per-episode caches, batched
    out = run_episodes(tasks, engine, policy.processor, sampling=PARAMS,
                       env_wrapper=lambda env: ScriptedActions(env, script))
    assert [t.n_turns for t in out] == [1, 4]
    assert [t.turns[0].metrics["batch_size"] for t in out] == [2, 2]
    assert [t.metrics["batch_size"] for t in out[1].turns[1:]] == [1, 1, 1]
    assert out[0].end_reason == "answer" and out[0].n_image_observations == 0
    assert engine.cached_tokens == 0  # both released as they ended
    contexts = [t.context for t in out]
    inputs = collate(contexts)
    with torch.no_grad():
        recomputed = token_logprobs(policy.model, inputs, 1.0, contexts[0].vision.vision_token_ids)
    mask = inputs["loss_mask"].bool()
    assert (recomputed[mask] - inputs["old_logprobs"][mask]).abs().max().item() < 1e-4


def test_observation_over_budget_truncates(policy, tasks, batch) -> None:
    ctx = batch[0].context
    first_obs = ctx.segments[2]
    budget = first_obs.end + 6 + 10  # the second observation (with its crop) cannot fit
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    (traj,) = run_episodes(tasks[:1], engine, policy.processor, sampling=PARAMS, env_wrapper=ScriptedActions,
                           max_total_tokens=budget)
    assert traj.end_reason == "token_budget" and traj.truncated and not traj.terminated
    assert traj.n_turns == 2 and traj.turns[-1].observation_dropped and traj.turns[-1].observation
    assert len(traj.images) == 2 and len(traj.token_ids) <= budget
    assert "acc" in traj.reward_parts and traj.reward_parts["tool"] == 0.0  # judged; no answer was given
    assert traj.reward_parts["formula"] == "visual"
    assert engine.cached_tokens == 0  # released when the episode ended
    # An env that prices its calls prices the cut-off episode as well: the outcome the loop builds carries it.
    (priced,) = run_episodes(tasks[:1], engine, policy.processor, sampling=PARAMS, env_wrapper=ScriptedActions,
                             max_total_tokens=budget, env_kwargs={"call_cost": 0.3})
    assert priced.end_reason == "token_budget" and priced.reward_parts["formula"] == "visual_priced"
    assert priced.reward == pytest.approx(0.8 * priced.reward_parts["acc"] - 0.3
                                          - 0.2 * priced.reward_parts["format_error"])


def test_plain_tasks_route_to_one_turn_env(policy, tasks) -> None:
    import dataclasses

    plain = dataclasses.replace(tasks[0], env_name="")
    out = run_episodes([plain], HFEngine(policy.model, policy.processor), policy.processor,
                       sampling=SamplingParams(max_tokens=4, stop=()))
    assert out[0].env_id == "plain" and out[0].n_turns == 1
