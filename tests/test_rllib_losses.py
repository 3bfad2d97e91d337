"""The learner's loss on real tiny-model batches: micro-batching is exact, masked tokens are inert,
recomputed logprobs match the engine's, SFT demonstrations tokenize like generations, PPO's value head
learns from generated tokens only with the loss composed as documented, and the memory-lean loss head (the
LM head on generated tokens only, chunked) gives the values and gradients of the full-logits one."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from deepeyes_agent.policy import logprobs as logprobs_module
from deepeyes_agent.policy.chat import EpisodeContext, VisionTokenizer
from deepeyes_agent.policy.logprobs import entropy_from_logits, sampling_logits, token_logprobs, token_stats
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine
from deepeyes_agent.rollout.loop import run_episodes
from deepeyes_agent.rollout.scripted import ScriptedActions
from deepeyes_agent.training import losses
from deepeyes_agent.training.batch import PackedEpisode, assign_advantages, collate_episodes, micro_batches
from deepeyes_agent.training.config import EnvConfig
from deepeyes_agent.training.demonstrations import demonstration, demonstrations
from deepeyes_agent.training.losses import (
    LossSettings,
    critic_values,
    forward_with_values,
    last_hidden_state,
    rl_loss,
    sampled_token_stats,
    token_count,
    value_loss,
)
from deepeyes_agent.training.tasks import TaskSchedule
from deepeyes_envs.messages import image_part, message
from deepeyes_envs.synthetic import SyntheticTaskSource

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def episodes(policy):
    """Six sampled one-turn episodes over images of different sizes, in 3 groups with made-up rewards (sampled by
    ``model.generate``: the engine's re-encoding mode, the multi-turn tests use the cached one)."""
    model, processor = policy
    engine = HFEngine(model, processor, reuse_kv_cache=False)
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


def policy_loss_of(model, batch, settings, suppress, normalizer):
    return rl_loss(model.lm_head, last_hidden_state(model, batch), batch, settings, suppress, normalizer)


def _grads(model, batches, normalizer, settings, suppress):
    model.zero_grad(set_to_none=True)
    for chunk in batches:
        loss, _ = policy_loss_of(model, collate_episodes(chunk), settings, suppress, normalizer)
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
    loss, metrics = policy_loss_of(model, batch, settings, suppress, normalizer)
    poisoned = dict(batch)
    off = batch["loss_mask"] == 0
    poisoned["old_logprobs"] = torch.where(off, torch.full_like(batch["old_logprobs"], float("nan")),
                                           batch["old_logprobs"])
    poisoned["advantages"] = torch.where(off, torch.full_like(batch["advantages"], 1e6), batch["advantages"])
    loss2, _ = policy_loss_of(model, poisoned, settings, suppress, normalizer)
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


def test_demonstration_mix_zooms_in_a_seeded_share_of_episodes(policy):
    _, processor = policy
    tasks = [SyntheticTaskSource(n=8, seed=0, kind="toy_zoom")[i] for i in range(8)]
    env = EnvConfig(env_id="visual_toolbox")

    def zoomed(contexts):
        return [len(c.generated_turns()) == 2 and len(c.images) == 2 for c in contexts]

    mix = zoomed(demonstrations(tasks, env, processor, max_total_tokens=4000, zoom_fraction=0.25, seed=3))
    assert sum(mix) == 2  # 2 of 8 zoom, the other 6 answer in one turn
    assert mix == zoomed(demonstrations(tasks, env, processor, max_total_tokens=4000, zoom_fraction=0.25, seed=3))
    assert all(zoomed(demonstrations(tasks[:3], env, processor, max_total_tokens=4000)))  # default: all zoom
    assert not any(zoomed(demonstrations(tasks[:3], env, processor, max_total_tokens=4000, include_zoom=False)))
    with pytest.raises(ValueError, match="zoom_fraction"):
        demonstrations(tasks[:1], env, processor, zoom_fraction=1.5)


def test_task_schedule_walks_epochs_and_restores():
    schedule = TaskSchedule(n=5, seed=1)
    first = schedule.take(3)
    state = schedule.get_state()
    rest = schedule.take(4)
    assert sorted(first + rest[:2]) == list(range(5))  # one full epoch, no repeats
    again = TaskSchedule(n=5, seed=1)
    again.set_state(state)
    assert again.take(4) == rest


# ---------------------------------------------------------------------------------------------- PPO's critic
def _ppo_setup(model, episodes, vf_clip, lam=0.9):
    """Copies of the episodes with a (random, nonzero) value head's old values, GAE advantages and returns."""
    torch.manual_seed(0)
    head = torch.nn.Linear(model.lm_head.in_features, 1)
    ppo = [copy.copy(ep) for ep in episodes]
    with torch.no_grad():
        old = critic_values(head, last_hidden_state(model, collate_episodes(ppo)))
    for b, ep in enumerate(ppo):
        ep.values = old[b, :len(ep)].tolist()
    assign_advantages(ppo, "gae", gamma=1.0, lam=lam)
    settings = LossSettings(vf_coef=0.7, vf_clip=vf_clip)
    return head, ppo, settings


def test_gae_returns_are_the_outcome_and_advantages_are_whitened(policy, episodes):
    model, _ = policy
    _, ppo, _ = _ppo_setup(model, episodes, None, lam=1.0)
    batch = collate_episodes(ppo)
    mask = batch["loss_mask"].bool()
    for b, ep in enumerate(ppo):  # gamma = lam = 1: every generated token's return is the trajectory's reward
        assert torch.allclose(batch["returns"][b][mask[b]], torch.tensor(ep.reward), atol=1e-6)
    assert (batch["returns"][~mask] == 0).all() and (batch["advantages"][~mask] == 0).all()
    assert abs(float(batch["advantages"][mask].mean())) < 1e-5
    assert float(batch["advantages"][mask].std()) == pytest.approx(1.0, abs=1e-3)


def test_value_head_learns_only_from_generated_tokens(policy, episodes):
    model, processor = policy
    suppress = VisionTokenizer(processor).vision_token_ids
    head, ppo, settings = _ppo_setup(model, episodes, vf_clip=None)
    batch = collate_episodes(ppo)
    normalizer = token_count(ppo, "token-mean")

    def head_grad(b):
        head.zero_grad(set_to_none=True)
        hidden, values = forward_with_values(model, head, b)
        loss, metrics = rl_loss(model.lm_head, hidden, b, settings, suppress, normalizer, values=values)
        loss.backward()
        return loss.detach(), torch.cat([head.weight.grad.flatten(), head.bias.grad]), metrics

    loss, grad, metrics = head_grad(batch)
    assert metrics["value_loss"] > 0 and grad.abs().sum() > 0
    # by hand: d/dw of vf_coef * 0.5 * sum_masked (V_t - R_t)^2 / N, V_t = w . h_{t-1} + b
    with torch.no_grad():
        hidden = last_hidden_state(model, batch)
        hidden = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], dim=1)  # the state of token t
        error = (batch["old_values"] - batch["returns"]) * batch["loss_mask"]  # new values = old before a step
        features = torch.cat([hidden, torch.ones_like(hidden[..., :1])], dim=-1)
        expected = settings.vf_coef * torch.einsum("bt,bth->h", error, features) / normalizer
    assert torch.allclose(grad, expected, atol=1e-5, rtol=1e-4)
    # targets at masked-out positions (prompt, padding) change nothing
    poisoned = dict(batch)
    off = batch["loss_mask"] == 0
    poisoned["old_values"] = batch["old_values"].masked_fill(off, float("nan"))
    poisoned["returns"] = batch["returns"].masked_fill(off, 1e6)
    loss2, grad2, _ = head_grad(poisoned)
    assert torch.isfinite(loss2) and torch.allclose(loss, loss2) and torch.allclose(grad, grad2)


def test_ppo_loss_is_policy_loss_plus_weighted_value_loss(policy, episodes):
    model, processor = policy
    suppress = VisionTokenizer(processor).vision_token_ids
    head, ppo, settings = _ppo_setup(model, episodes, vf_clip=0.01)
    batch = collate_episodes(ppo)
    normalizer = token_count(ppo, "token-mean")
    with torch.no_grad():
        hidden, values = forward_with_values(model, head, batch)
        values = values + 0.05 * torch.randn_like(values)  # as after some steps: the clip is active somewhere
        total, metrics = rl_loss(model.lm_head, hidden, batch, settings, suppress, normalizer, values=values)
        policy_only, _ = rl_loss(model.lm_head, hidden, batch, settings, suppress, normalizer)
        v_loss, v_metrics = value_loss(values, batch["old_values"], batch["returns"], batch["loss_mask"],
                                       clip_range=0.01, normalizer=normalizer)
    assert float(v_metrics["vf_clip_fraction"]) > 0
    assert torch.allclose(total, policy_only + settings.vf_coef * v_loss, atol=1e-6)
    assert metrics["value_loss"] == pytest.approx(float(v_loss) * normalizer, rel=1e-5)
    # micro-batches still sum to the full-batch gradient, value head included
    grads = []
    for chunks in ([ppo], micro_batches(ppo, 4)):
        model.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        for chunk in chunks:
            b = collate_episodes(chunk)
            hidden, values = forward_with_values(model, head, b)
            loss, _ = rl_loss(model.lm_head, hidden, b, settings, suppress, normalizer, values=values)
            loss.backward()
        grads.append([p.grad.clone() for p in (head.weight, head.bias, model.lm_head.weight)])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------- the memory-lean loss head
TOL = 1e-5  # float32: the chunked head must equal the full-logits one to rounding


def full_logits_token_stats(hidden, lm_head, input_ids, scored=None, temperature=1.0, suppress_token_ids=(),
                            chunk_size=None):
    """The loss head as it was (the oracle): logits at every position, a float32 log-softmax over [B, T, V]."""
    scaled = sampling_logits(lm_head(hidden)[:, :-1], temperature, suppress_token_ids)
    picked = torch.log_softmax(scaled, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    zero = torch.zeros_like(picked[:, :1])
    return torch.cat([zero, picked], dim=1), torch.cat([zero, entropy_from_logits(scaled)], dim=1)


@pytest.fixture(scope="module")
def multi_turn(policy):
    """Four 4-turn zoom episodes: generated turns between observations that carry crops, two groups."""
    model, processor = policy
    source = SyntheticTaskSource(n=2, seed=0, kind="toy_zoom")
    out = run_episodes([source[0], source[1]], HFEngine(model, processor, reuse_kv_cache=True), processor,
                       n_per_task=2, sampling=SamplingParams(max_tokens=5, stop=()), seed=1,
                       env_wrapper=ScriptedActions, max_total_tokens=4096)
    packed = [PackedEpisode.from_context(t.context, reward=0.5 * (i % 2) + 0.1 * i, group_id=t.group_id)
              for i, t in enumerate(out)]
    assign_advantages(packed, "grpo")
    return packed


def _step(model, head, ref, batch, settings, suppress, normalizer):
    """One micro-batch's loss, metrics and the gradients of every parameter (policy and value head)."""
    params = list(model.parameters()) + ([] if head is None else list(head.parameters()))
    for p in params:
        p.grad = None
    ref_logprobs = None
    if settings.kl_coef:
        with torch.no_grad():
            ref_logprobs = losses.sampled_token_stats(ref, batch, settings.temperature, suppress)[0]
    hidden, values = forward_with_values(model, head, batch)
    loss, metrics = rl_loss(model.lm_head, hidden, batch, settings, suppress, normalizer, ref_logprobs, values)
    loss.backward()
    return loss.detach(), metrics, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


@pytest.mark.parametrize("advantage", ["grpo", "gae"])
def test_chunked_loss_head_equals_the_full_logits_head(policy, multi_turn, advantage, monkeypatch):
    model, processor = policy
    suppress = VisionTokenizer(processor).vision_token_ids
    episodes = multi_turn
    head = ref = None
    if advantage == "grpo":  # KL to a reference that differs from the policy, entropy bonus, another temperature
        settings = LossSettings(temperature=0.7, entropy_coef=0.01, kl_coef=0.1, loss_agg="seq-mean-token-mean")
        ref = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            ref.lm_head.weight.add_(0.05 * torch.randn_like(ref.lm_head.weight))
    else:
        head, episodes, settings = _ppo_setup(model, multi_turn, vf_clip=0.2)
    batch = collate_episodes(episodes)
    normalizer = token_count(episodes, settings.loss_agg)
    vocab = model.lm_head.out_features
    monkeypatch.setattr(logprobs_module, "CHUNK_BYTES", 3 * 4 * vocab)  # 3 positions per chunk: many chunks
    lean = _step(model, head, ref, batch, settings, suppress, normalizer)
    monkeypatch.setattr(losses, "token_stats", full_logits_token_stats)
    full = _step(model, head, ref, batch, settings, suppress, normalizer)
    assert int(batch["loss_mask"].sum()) > 3 * 5  # several chunks, across turns and rows
    assert abs(float(lean[0] - full[0])) < TOL and float(full[0]) != 0.0
    for key in ("pg_loss", "entropy_sum", "kl_sum", "value_loss", "logprob_gap_max"):
        if key in full[1]:
            assert lean[1][key] == pytest.approx(full[1][key], rel=1e-6, abs=TOL), key  # sums over ~100 tokens
    assert sum(float(g.abs().sum()) for g in full[2]) > 0
    for a, b in zip(lean[2], full[2], strict=True):
        assert float((a - b).abs().max()) < TOL


def test_token_stats_score_only_the_asked_positions(policy, multi_turn):
    model, processor = policy
    suppress = VisionTokenizer(processor).vision_token_ids
    batch = collate_episodes(multi_turn)
    mask = batch["loss_mask"].bool()
    with torch.no_grad():
        hidden = losses.last_hidden_state(model, batch)
    hidden.requires_grad_(True)
    logprobs, entropy = token_stats(hidden, model.lm_head, batch["input_ids"], mask, 1.3, suppress, chunk_size=4)
    full_lp, full_ent = full_logits_token_stats(hidden, model.lm_head, batch["input_ids"], None, 1.3, suppress)
    for lean, full in ((logprobs, full_lp), (entropy, full_ent)):
        assert float((lean - full).detach()[mask].abs().max()) < TOL
    assert (logprobs[~mask] == 0).all() and (entropy[~mask] == 0).all() and (entropy[mask] > 0).all()
    (logprobs.sum() + entropy.sum()).backward()
    predicts_scored = torch.zeros_like(mask)
    predicts_scored[:, :-1] = mask[:, 1:]  # hidden state i predicts token i + 1
    assert (hidden.grad[~predicts_scored] == 0).all()
    assert (hidden.grad[predicts_scored].abs().sum(-1) > 0).all()


def test_a_batch_without_generated_tokens_scores_nothing(policy, multi_turn):
    """The FSDP2 vision filler alone in a micro-batch: the head still runs (collectives pair up), on no token."""
    model, processor = policy
    batch = collate_episodes(multi_turn[:1])
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    model.zero_grad(set_to_none=True)
    loss, metrics = rl_loss(model.lm_head, losses.last_hidden_state(model, batch), batch, LossSettings(entropy_coef=0.1),
                            VisionTokenizer(processor).vision_token_ids, 1.0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and metrics["tokens"] == 0.0
    assert float(model.lm_head.weight.grad.abs().sum()) == 0.0


def test_token_logprobs_scores_every_token_like_the_full_logits(policy, multi_turn):
    model, processor = policy
    suppress = VisionTokenizer(processor).vision_token_ids
    batch = collate_episodes(multi_turn)
    with torch.no_grad():
        lean = token_logprobs(model, batch, 0.8, suppress)
        full = full_logits_token_stats(losses.last_hidden_state(model, batch), model.lm_head, batch["input_ids"],
                                       None, 0.8, suppress)[0]
    vision = torch.isin(batch["input_ids"], torch.tensor(suppress))  # scored out of the distribution: ~ -1e9
    vision[:, 0] = False
    assert float((lean - full)[~vision].abs().max()) < TOL
    assert vision.any() and (lean[vision] < -1e8).all() and (full[vision] < -1e8).all()
