"""The learner's loss on real tiny-model batches: micro-batching is exact, masked tokens are inert,
recomputed logprobs match the engine's, and SFT demonstrations tokenize like generations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepeyes_agent.chat import EpisodeContext, VisionTokenizer
from deepeyes_agent.data import TaskSchedule, demonstration
from deepeyes_agent.models import load_policy
from deepeyes_agent.rllib.batch import PackedEpisode, assign_advantages, collate_episodes, micro_batches
from deepeyes_agent.rllib.losses import LossSettings, rl_loss, sampled_token_stats, token_count
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine
from deepeyes_agent.train_config import EnvConfig
from deepeyes_envs.messages import image_part, message
from deepeyes_envs.synthetic import SyntheticTaskSource

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


@pytest.fixture(scope="module")
def episodes(policy):
    """Six sampled one-turn episodes over images of different sizes, in 3 groups with made-up rewards."""
    model, processor = policy
    engine = HFEngine(model, processor)
    rng = np.random.default_rng(0)
    contexts = []
    for i in range(6):
        image = rng.integers(0, 255, (56 + 28 * (i % 3), 84, 3), dtype=np.uint8)
        msgs = (message("system", "You are a helpful assistant."),
                message("user", image_part(image), f"\nWhat is the color of the square? {i}"))
        contexts.append(EpisodeContext(processor, msgs, max_total_tokens=400))
    gens = engine.generate(contexts, SamplingParams(max_tokens=10 + 3 * 1, temperature=1.0, seed=3))
    packed = []
    for i, (ctx, gen) in enumerate(zip(contexts, gens, strict=True)):
        ctx.append_generated(gen.token_ids, gen.logprobs)
        packed.append(PackedEpisode.from_context(ctx, reward=float(i % 2) - 0.2 * (i % 3 == 0), group_id=i // 2))
    assign_advantages(packed, "grpo")
    return packed


def _grads(model, batches, normalizer, settings, suppress):
    model.zero_grad(set_to_none=True)
    for chunk in batches:
        loss, _ = rl_loss(model, collate_episodes(chunk), settings, suppress, normalizer)
        loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_recomputed_logprobs_match_the_engine(policy, episodes):
    model, processor = policy
    suppress = VisionTokenizer(processor).vision_token_ids
    batch = collate_episodes(episodes)
    with torch.no_grad():
        logprobs, entropy = sampled_token_stats(model, batch, 1.0, suppress)
    mask = batch["loss_mask"].bool()
    assert torch.allclose(logprobs[mask], batch["old_logprobs"][mask], atol=1e-3)
    assert (entropy[mask] > 0).all()


def test_micro_batches_sum_to_the_full_batch_gradient(policy, episodes):
    model, processor = policy
    suppress = VisionTokenizer(processor).vision_token_ids
    for agg in ("token-mean", "seq-mean-token-mean"):
        settings = LossSettings(loss_agg=agg, entropy_coef=0.01)
        normalizer = token_count(episodes, agg)
        full = _grads(model, [episodes], normalizer, settings, suppress)
        split = _grads(model, micro_batches(episodes, 4), normalizer, settings, suppress)
        assert any(g.abs().sum() > 0 for g in full)
        for a, b in zip(full, split, strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), agg


def test_tokens_outside_the_loss_mask_do_not_matter(policy, episodes):
    model, processor = policy
    suppress = VisionTokenizer(processor).vision_token_ids
    batch = collate_episodes(episodes)
    settings = LossSettings()
    normalizer = token_count(episodes, "token-mean")
    loss, metrics = rl_loss(model, batch, settings, suppress, normalizer)
    poisoned = dict(batch)
    off = batch["loss_mask"] == 0
    poisoned["old_logprobs"] = torch.where(off, torch.full_like(batch["old_logprobs"], float("nan")),
                                           batch["old_logprobs"])
    poisoned["advantages"] = torch.where(off, torch.full_like(batch["advantages"], 1e6), batch["advantages"])
    loss2, _ = rl_loss(model, poisoned, settings, suppress, normalizer)
    assert torch.isfinite(loss2) and torch.allclose(loss, loss2)
    assert metrics["tokens"] == float(batch["loss_mask"].sum())


def test_grpo_advantages_are_group_relative(episodes):
    by_group: dict[int, list[float]] = {}
    for ep in episodes:
        generated = [a for a, m in zip(ep.advantages, ep.loss_mask, strict=True) if m]
        assert len(set(np.round(generated, 6))) == 1  # one advantage per trajectory
        assert all(a == 0 for a, m in zip(ep.advantages, ep.loss_mask, strict=True) if not m)
        by_group.setdefault(ep.group_id, []).append(generated[0])
    for values in by_group.values():
        assert abs(sum(values)) < 1e-5


def test_demonstration_tokens_read_back_as_the_scripted_turns(policy):
    _, processor = policy
    task = SyntheticTaskSource(n=4, seed=0, kind="toy_zoom")[1]
    ctx = demonstration(task, EnvConfig(env_id="visual_toolbox_v2"), processor, max_total_tokens=4000)
    turns = ctx.generated_turns()
    assert len(turns) == 2 and len(ctx.images) == 2  # a zoom, its crop, then the answer
    texts = [ctx.decode(t) for t in turns]
    assert texts[0].endswith("</tool_call>") and '"image_zoom_in_tool"' in texts[0]
    assert texts[1].endswith(f"<answer>{task.answer}</answer><|im_end|>")


def test_task_schedule_walks_epochs_and_restores():
    schedule = TaskSchedule(n=5, seed=1)
    first = schedule.take(3)
    state = schedule.get_state()
    rest = schedule.take(4)
    assert sorted(first + rest[:2]) == list(range(5))  # one full epoch, no repeats
    again = TaskSchedule(n=5, seed=1)
    again.set_state(state)
    assert again.take(4) == rest
