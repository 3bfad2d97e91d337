"""Trajectories: save/load round trip with images stored once, context rebuild, replay, HTML display."""

from __future__ import annotations

import pytest
import torch

from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine
from deepeyes_agent.rollout.loop import run_episodes
from deepeyes_agent.rollout.scripted import ScriptedActions, scripted_env, zoom_script
from deepeyes_agent.rollout.trajectory import load_trajectories, messages_equal, replay, save_trajectories
from deepeyes_envs.synthetic import SyntheticTaskSource

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def batch(policy):
    task = SyntheticTaskSource(n=1, seed=1, kind="toy_zoom")[0]
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    return run_episodes([task], engine, policy.processor, n_per_task=2, sampling=SamplingParams(max_tokens=5, stop=()),
                        env_wrapper=ScriptedActions, max_total_tokens=4096)


@pytest.fixture(scope="module")
def loaded(batch, tmp_path_factory):
    folder = save_trajectories(batch, tmp_path_factory.mktemp("saved"))
    return folder, load_trajectories(folder)


def test_round_trip(batch, loaded) -> None:
    folder, back = loaded
    assert len(back) == len(batch) == 2
    for a, b in zip(batch, back, strict=True):
        assert (a.token_ids, a.loss_mask, a.logprobs, a.group_id, a.task_id) == (b.token_ids, b.loss_mask, b.logprobs,
                                                                                 b.group_id, b.task_id)
        assert a.reward == b.reward and a.reward_parts["acc"] == b.reward_parts["acc"]
        assert [tuple(g) for g in a.image_grid_thw] == b.image_grid_thw and b.context is None
        assert all((x == y).all() for x, y in zip(a.images, b.images, strict=True))
        for ta, tb in zip(a.turns, b.turns, strict=True):
            assert ta.token_ids == tb.token_ids and messages_equal(ta.observation, tb.observation)
        assert b.task.gt_boxes == a.task.gt_boxes and b.n_tool_calls == a.n_tool_calls == 3
    # Images are stored once each: the group shares its task image and its scripted crops.
    distinct = {im.tobytes() + str(im.shape).encode() for t in batch for im in t.images}
    assert len(list((folder / "images").glob("*.png"))) == len(distinct) < sum(len(t.images) for t in batch)


def test_rebuild_context(policy, batch, loaded) -> None:
    ctx = loaded[1][0].rebuild_context(policy.processor)
    assert ctx.token_ids == batch[0].token_ids and ctx.loss_mask == batch[0].loss_mask
    assert torch.equal(ctx.position_ids, batch[0].context.position_ids)


def test_replay_reproduces_observations(loaded) -> None:
    traj = loaded[1][0]
    result = replay(traj, env=scripted_env())
    assert result.ok, result.mismatches
    assert len(result.observations) == traj.n_turns == 4 and result.end_reason == "answer"
    # A different script zooms elsewhere: replay notices.
    other = replay(traj, env=scripted_env(script=lambda task, info: zoom_script(task, info, zooms=((0.1, 0.1, 0.6, 0.6),) * 3)))
    assert not other.ok and "turn 0: observation differs" in other.mismatches


def test_replay_without_wrapper_uses_recorded_actions(policy) -> None:
    task = SyntheticTaskSource(n=1, seed=2, kind="toy_zoom")[0]
    (traj,) = run_episodes([task], HFEngine(policy.model, policy.processor), policy.processor,
                           sampling=SamplingParams(max_tokens=4, stop=()))
    result = replay(traj)
    assert result.ok and result.end_reason == traj.end_reason == "length"


def test_html(batch) -> None:
    traj = batch[0]
    page = traj._repr_html_()
    assert page.count("class='tok'") == traj.n_generated_tokens  # one shaded span per generated token
    assert "loss mask 0" in page and "observation" in page and "reward parts" in page
    assert page.count("<img") == len(traj.images) + 1  # every context image, plus the boxed first image
    assert "turn 4" in page and "ground truth" in page and "IoU" in page and "scripted turn" in page
    table = batch._repr_html_()
    assert table.count("<details><summary>#") == len(batch) and "tool calls" in table and traj.uid in table


def test_batch_summary_reads_like_the_training_log(batch) -> None:
    summary = batch.summary()
    assert summary["episodes"] == len(batch) == 2
    assert summary["tool_calls"] == sum(t.n_tool_calls for t in batch) / 2 > 0  # the scripted turns zoom
    assert summary["tool_call_rate"] == 1.0 and summary["response_length"] == sum(t.n_generated_tokens for t in batch) / 2
    assert "iou" in summary and "acc_with_tool" in summary  # the grounding and control numbers of the run log
