"""Unit tests for the advantage estimators, losses and masked reductions against small hand-computed examples.

Expected numbers are written out by hand, with the arithmetic in a comment next to them.
"""

from __future__ import annotations

import math

import pytest
import torch

from deepeyes_agent.policy.logprobs import entropy_from_logits
from deepeyes_agent.training import advantages, losses, masked

torch.set_num_threads(1)


def close(actual: torch.Tensor, expected, atol: float = 1e-4) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, expected, atol=atol), f"\n{actual}\n!=\n{expected}"


# A two-turn trajectory and a one-turn one:  G = generated, O = observation (tool output), P = padding.
#   row 0:  G G O G P
#   row 1:  G G P P P
MASK = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 0, 0, 0]])


def garbage_like(x: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x`` with masked-out positions overwritten by large random values."""
    g = torch.Generator().manual_seed(seed)
    noise = 1e3 * torch.randn(x.shape, generator=g)
    return torch.where(mask.bool(), x, noise)


def random_mask(batch: int, length: int, seed: int) -> torch.Tensor:
    """Random multi-turn masks: a prompt, alternating generated / observation segments, padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        t = int(torch.randint(0, 3, (1,), generator=g))  # prompt
        while t < length:
            seg = int(torch.randint(1, 4, (1,), generator=g))
            mask[row, t : t + seg] = 1
            t += seg + int(torch.randint(1, 4, (1,), generator=g))  # observation or padding gap
    return mask


# --------------------------------------------------------------------------------------------------------
# masked utilities
# --------------------------------------------------------------------------------------------------------


def test_masked_mean_sum_var_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked.masked_sum(x, mask), 6.0)  # 1 + 2 + 3
    close(masked.masked_mean(x, mask), 2.0)  # 6 / 3
    close(masked.masked_mean(x, mask, dim=1), [1.5, 3.0])  # (1 + 2) / 2, 3 / 1
    close(masked.masked_var(x, mask), 1.0)  # ((1-2)^2 + 0 + (3-2)^2) / (3 - 1)
    close(masked.masked_whiten(x, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], atol=1e-3)  # (x - 2) / 1
    close(masked.masked_mean(x, torch.zeros_like(mask)), 0.0)  # no tokens: 0, not NaN


# --------------------------------------------------------------------------------------------------------
# outcome reward placement
# --------------------------------------------------------------------------------------------------------


def test_outcome_reward_sits_on_last_generated_token():
    rewards = advantages.outcome_token_rewards(torch.tensor([1.0, 0.5, 7.0]), torch.cat([MASK, torch.zeros(1, 5)]))
    close(rewards, [[0, 0, 0, 1.0, 0], [0, 0.5, 0, 0, 0], [0, 0, 0, 0, 0]])  # empty row: no reward anywhere


# --------------------------------------------------------------------------------------------------------
# GRPO / Dr. GRPO / RLOO
# --------------------------------------------------------------------------------------------------------

SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 5.0])
GROUPS = ["a", "a", "a", "a", "b", "b", "c"]  # prompt uids; "c" is a group of one


def test_grpo_hand_computed():
    mask = torch.ones(7, 2)
    adv, returns = advantages.grpo_advantages(SCORES, GROUPS, mask)
    # group a: mean 0.5, Bessel std = sqrt(4 * 0.25 / 3) = 0.57735  ->  +-0.5 / 0.57735 = +-0.86603
    # group b: std 0 -> (1 - 1) / (0 + eps) = 0 ;  group c: a single rollout has no baseline -> 0
    expected = [0.86603, -0.86603, -0.86603, 0.86603, 0.0, 0.0, 0.0]
    close(adv[:, 0], expected)
    close(adv[:, 1], expected)  # broadcast to every generated token
    close(returns, adv)


def test_dr_grpo_without_std():
    adv, _ = advantages.grpo_advantages(SCORES, GROUPS, torch.ones(7, 1), norm_by_std=False)
    close(adv[:, 0], [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0])  # r - group mean, no division


def test_grpo_accepts_tensor_group_ids_and_broadcasts_to_mask_only():
    adv, _ = advantages.grpo_advantages(torch.tensor([2.0, 0.0]), torch.tensor([7, 7]), MASK)
    # mean 1, Bessel std = sqrt((1 + 1) / 1) = 1.41421 -> +-1 / 1.41421 = +-0.70711
    close(adv, [[0.70711, 0.70711, 0, 0.70711, 0], [-0.70711, -0.70711, 0, 0, 0]])


def test_rloo_hand_computed():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 9.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    adv, _ = advantages.rloo_advantages(scores, groups, torch.ones(6, 1))
    # group 0: 1 - (0 + 0) / 2 = 1 ;  0 - (1 + 0) / 2 = -0.5 (twice)
    # group 1: 2 - 4 = -2 ;  4 - 2 = 2 ;  group 2 (single): 0
    close(adv[:, 0], [1.0, -0.5, -0.5, -2.0, 2.0, 0.0])


# --------------------------------------------------------------------------------------------------------
# REINFORCE++
# --------------------------------------------------------------------------------------------------------


def test_reinforce_plus_plus_hand_computed():
    adv, returns = advantages.reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0]), MASK, gamma=0.5)
    # row 0: reward 1 on t=3; the observation at t=2 costs no discount step:
    #   G3 = 1, G1 = 0.5 * 1 = 0.5, G0 = 0.5 * 0.5 = 0.25 ;  row 1: all 0
    close(returns, [[0.25, 0.5, 0, 1.0, 0], [0, 0, 0, 0, 0]])
    # whiten over the 5 generated tokens [0.25, 0.5, 1, 0, 0]: mean 0.35,
    #   deviations [-0.1, 0.15, 0.65, -0.35, -0.35], squares sum 0.7, Bessel var 0.7 / 4 = 0.175, std 0.41833
    #   -> [-0.23905, 0.35857, 1.55380, -0.83666, -0.83666]
    close(adv, [[-0.23905, 0.35857, 0, 1.55380, 0], [-0.83666, -0.83666, 0, 0, 0]])


def test_reinforce_plus_plus_token_level_kl_penalty():
    kl = torch.full((2, 5), 0.1)
    _, returns = advantages.reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0]), MASK, kl=kl, kl_coef=1.0)
    # row 0 token rewards: [-0.1, -0.1, (obs), 1 - 0.1, (pad)], gamma 1:
    #   G3 = 0.9, G1 = -0.1 + 0.9 = 0.8, G0 = -0.1 + 0.8 = 0.7 ;  row 1: G1 = -0.1, G0 = -0.2
    close(returns, [[0.7, 0.8, 0, 0.9, 0], [-0.2, -0.1, 0, 0, 0]])


# --------------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------------


def test_gae_hand_computed_skips_observation_tokens():
    rewards = torch.tensor([[0.0, 0.0, 55.0, 1.0, 66.0]])  # 55, 66 sit on masked tokens: ignored
    values = torch.tensor([[0.5, 0.6, 99.0, 0.8, 77.0]])
    adv, returns = advantages.gae_advantages(rewards, values, MASK[:1], gamma=1.0, lam=0.5)
    # t=3 (last generated): delta = 1 + 1 * 0 - 0.8 = 0.2 ;            A3 = 0.2
    # t=1: next generated token is t=3:  delta = 0 + 0.8 - 0.6 = 0.2 ;  A1 = 0.2 + 0.5 * 0.2 = 0.3
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1 ;                               A0 = 0.1 + 0.5 * 0.3 = 0.25
    close(adv, [[0.25, 0.3, 0, 0.2, 0]])
    close(returns, [[0.75, 0.9, 0, 1.0, 0]])  # A + V


def reference_gae(rewards, values, mask, gamma, lam):
    """Plain-Python GAE: pull out each row's generated tokens, run textbook GAE on them, scatter back."""
    adv = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[row, t]]
        last = 0.0
        for k in reversed(range(len(idx))):
            next_v = values[row, idx[k + 1]].item() if k + 1 < len(idx) else 0.0
            delta = rewards[row, idx[k]].item() + gamma * next_v - values[row, idx[k]].item()
            last = delta + gamma * lam * last
            adv[row, idx[k]] = last
    return adv


def test_gae_matches_reference_loop():
    g = torch.Generator().manual_seed(1)
    mask = random_mask(6, 20, seed=1)
    rewards = torch.randn(6, 20, generator=g)
    values = torch.randn(6, 20, generator=g)
    adv, returns = advantages.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    expected = reference_gae(rewards, values, mask, 0.9, 0.8)
    close(adv, expected, atol=1e-5)
    close(returns, torch.where(mask.bool(), expected + values, 0.0), atol=1e-5)


def test_advantages_are_detached_targets():
    values = torch.rand(2, 5, requires_grad=True)
    adv, returns = advantages.gae_advantages(torch.rand(2, 5), values, MASK)
    assert not adv.requires_grad and not returns.requires_grad


def test_gae_with_zero_values_and_lambda_one_is_discounted_return():
    mask = random_mask(4, 15, seed=2)
    rewards = torch.randn(4, 15, generator=torch.Generator().manual_seed(2))
    adv, _ = advantages.gae_advantages(rewards, torch.zeros(4, 15), mask, gamma=0.7, lam=1.0)
    close(adv, advantages.discounted_returns(rewards, mask, gamma=0.7), atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------------------


def test_dispatcher_selects_by_name():
    scores = torch.tensor([2.0, 0.0])
    for name, direct in [
        ("grpo", advantages.grpo_advantages(scores, [0, 0], MASK)),
        ("dr_grpo", advantages.grpo_advantages(scores, [0, 0], MASK, norm_by_std=False)),
        ("rloo", advantages.rloo_advantages(scores, [0, 0], MASK)),
        ("reinforce_plus_plus", advantages.reinforce_plus_plus_advantages(scores, MASK, gamma=0.9)),
    ]:
        out = advantages.compute_advantages(name, loss_mask=MASK, scores=scores, group_ids=[0, 0], gamma=0.9)
        close(out[0], direct[0])
        close(out[1], direct[1])
    values = torch.rand(2, 5)
    out = advantages.compute_advantages("gae", loss_mask=MASK, scores=scores, values=values, gamma=0.9, lam=0.95)
    expected = advantages.gae_advantages(advantages.outcome_token_rewards(scores, MASK), values, MASK, gamma=0.9, lam=0.95)
    close(out[0], expected[0])


def test_dispatcher_errors_list_choices_and_missing_inputs():
    with pytest.raises(ValueError, match="grpo.*rloo.*reinforce_plus_plus.*gae"):
        advantages.compute_advantages("ppo2", loss_mask=MASK, scores=torch.zeros(2))
    with pytest.raises(ValueError, match="group_ids"):
        advantages.compute_advantages("grpo", loss_mask=MASK, scores=torch.zeros(2))
    with pytest.raises(ValueError, match="values"):
        advantages.compute_advantages("gae", loss_mask=MASK, scores=torch.zeros(2))


# --------------------------------------------------------------------------------------------------------
# mask handling: values at masked-out positions change nothing
# --------------------------------------------------------------------------------------------------------


def test_masked_positions_change_no_advantage():
    mask = random_mask(4, 12, seed=3)
    g = torch.Generator().manual_seed(3)
    rewards, values, kl = (torch.randn(4, 12, generator=g) for _ in range(3))

    def outputs(r: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
        return [
            *advantages.gae_advantages(r, v, mask, gamma=0.9, lam=0.9),
            *advantages.reinforce_plus_plus_advantages(None, mask, token_rewards=r, kl=k, kl_coef=0.1),
            advantages.discounted_returns(r, mask, 0.9),
        ]

    clean = outputs(rewards, values, kl)
    dirty = outputs(garbage_like(rewards, mask, 1), garbage_like(values, mask, 2), garbage_like(kl, mask, 3))
    for a, b in zip(clean, dirty, strict=True):
        assert torch.equal(a, b)
        assert torch.all(a[mask == 0] == 0)


def test_masked_positions_change_no_loss():
    mask = random_mask(3, 10, seed=4)
    g = torch.Generator().manual_seed(4)
    logp, old, ref, adv, v, old_v, ret = (torch.randn(3, 10, generator=g) * 0.3 for _ in range(7))

    def all_losses(logp, old, ref, adv, v, old_v, ret):
        pl, _ = losses.policy_loss(logp, old, adv, mask, clip_ratio_c=3.0)
        vl, _ = losses.value_loss(v, old_v, ret, mask)
        kls = [losses.aggregate_loss(losses.kl_penalty(logp, ref, mask, kind), mask) for kind in ("k3", "k1")]
        return pl, vl, *kls

    clean = all_losses(logp, old, ref, adv, v, old_v, ret)
    dirty_inputs = [garbage_like(x, mask, i) for i, x in enumerate([logp, old, ref, adv, v, old_v, ret])]
    dirty_inputs[0] = torch.where(mask.bool(), logp, float("nan"))  # even NaN at masked positions is fine
    dirty = all_losses(*dirty_inputs)
    for a, b in zip(clean, dirty, strict=True):
        assert torch.isfinite(b)
        close(b, a, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# clipped surrogate, dual clip, aggregation
# --------------------------------------------------------------------------------------------------------


def one_token_loss(ratio: float, advantage: float, clip_c: float | None = None) -> float:
    mask = torch.ones(1, 1)
    loss, _ = losses.policy_loss(
        torch.tensor([[math.log(ratio)]]), torch.zeros(1, 1), torch.tensor([[advantage]]), mask, 0.2, 0.2, clip_c
    )
    return loss.item()


def test_clipped_surrogate_hand_computed():
    # loss = max(-A r, -A clip(r, 0.8, 1.2))
    assert one_token_loss(1.5, 1.0) == pytest.approx(-1.2)  # max(-1.5, -1.2): clipped, no push past 1.2
    assert one_token_loss(0.5, 1.0) == pytest.approx(-0.5)  # max(-0.5, -0.8): unclipped, keep raising it
    assert one_token_loss(0.5, -1.0) == pytest.approx(0.8)  # max(0.5, 0.8): clipped
    assert one_token_loss(1.1, -2.0) == pytest.approx(2.2)  # max(2.2, 2.2): inside the trust region


def test_clip_higher_bounds_are_asymmetric():
    loss, _ = losses.policy_loss(
        torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2, 0.28
    )
    assert loss.item() == pytest.approx(-1.28)  # max(-1.5, -clip(1.5, 0.8, 1.28)) = -1.28


def test_dual_clip_engaged_and_disengaged():
    # A = -1, ratio 5: standard clip gives max(5, 1.2) = 5; dual clip caps at -A * c = 3
    assert one_token_loss(5.0, -1.0) == pytest.approx(5.0)
    assert one_token_loss(5.0, -1.0, clip_c=3.0) == pytest.approx(3.0)
    # disengaged: A < 0 with ratio 2 -> max(2, 1.2) = 2 < 3 ;  A > 0 is never dual-clipped
    assert one_token_loss(2.0, -1.0, clip_c=3.0) == pytest.approx(2.0)
    assert one_token_loss(5.0, 1.0, clip_c=3.0) == pytest.approx(-1.2)
    with pytest.raises(ValueError):
        one_token_loss(1.0, 1.0, clip_c=0.5)


def test_dual_clip_zeroes_gradient_of_capped_token():
    logp = torch.tensor([[math.log(5.0), math.log(2.0)]], requires_grad=True)
    loss, metrics = losses.policy_loss(logp, torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2), clip_ratio_c=3.0)
    loss.backward()
    # token 0 capped at constant 3 -> grad 0 ;  token 1: d/dlogp (-A e^logp) / 2 tokens = 2 / 2 = 1
    close(logp.grad, [[0.0, 1.0]])
    close(metrics["dual_clip_fraction"], 0.5)


def test_policy_metrics_hand_computed():
    ratios = torch.tensor([[1.5, 0.5, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    _, m = losses.policy_loss(ratios.log(), torch.zeros(1, 4), torch.ones(1, 4), mask)
    close(m["clip_fraction"], 1 / 3)  # only ratio 1.5 with A > 0 is clipped; 9.0 is masked out
    close(m["ratio_mean"], 1.0)  # (1.5 + 0.5 + 1) / 3
    close(m["ratio_min"], 0.5)
    close(m["ratio_max"], 1.5)
    # k3 = r - 1 - log r: (0.5 - 0.405465) + (-0.5 + 0.693147) + 0 = 0.287682 ; / 3 = 0.095894
    close(m["approx_kl"], 0.095894)
    # k1 = -log r: (-0.405465 + 0.693147 + 0) / 3 = 0.095894 as well, by coincidence of these ratios
    close(m["approx_kl_k1"], 0.095894)


def test_aggregation_modes_on_ragged_lengths():
    token_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(losses.aggregate_loss(token_loss, mask, "token-mean"), 2.5)  # (1 + 2 + 3 + 4) / 4 tokens
    close(losses.aggregate_loss(token_loss, mask, "seq-mean-token-sum"), 5.0)  # (6 + 4) / 2 sequences
    close(losses.aggregate_loss(token_loss, mask, "seq-mean-token-mean"), 3.0)  # (6 / 3 + 4 / 1) / 2
    close(losses.aggregate_loss(token_loss, mask, "token-mean", normalizer=8), 1.25)  # 10 / global count 8
    with pytest.raises(ValueError, match="token-mean"):
        losses.aggregate_loss(token_loss, mask, "sum")


def test_aggregation_sequence_modes_skip_empty_rows():
    token_loss = torch.tensor([[1.0, 3.0], [9.0, 9.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    close(losses.aggregate_loss(token_loss, mask, "seq-mean-token-mean"), 2.0)  # (1 + 3) / 2, the empty row ignored


def test_micro_batches_with_global_normalizer_sum_to_full_batch_loss():
    mask = random_mask(4, 9, seed=5)
    token_loss = torch.randn(4, 9, generator=torch.Generator().manual_seed(5))
    full = losses.aggregate_loss(token_loss, mask, "token-mean")
    n_tokens = mask.sum()
    parts = [losses.aggregate_loss(token_loss[i : i + 2], mask[i : i + 2], "token-mean", n_tokens) for i in (0, 2)]
    close(sum(parts), full, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# gradients reach masked-in tokens only
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg_mode", losses.LOSS_AGG_MODES)
def test_gradient_only_through_masked_in_tokens(agg_mode):
    mask = random_mask(3, 10, seed=6)
    g = torch.Generator().manual_seed(6)
    logp = (0.1 * torch.randn(3, 10, generator=g)).requires_grad_()
    values = torch.randn(3, 10, generator=g).requires_grad_()
    logits = torch.randn(3, 10, 7, generator=g).requires_grad_()
    adv = torch.randn(3, 10, generator=g)
    ref = 0.1 * torch.randn(3, 10, generator=g)

    entropy = entropy_from_logits(logits, chunk_size=4)
    loss = (
        losses.policy_loss(logp, logp.detach() + 0.05, adv, mask, clip_ratio_c=3.0, agg_mode=agg_mode)[0]
        + 0.1 * losses.aggregate_loss(losses.kl_penalty(logp, ref, mask, "k3"), mask, agg_mode)
        + losses.value_loss(values, values.detach() + 0.1, adv, mask, agg_mode=agg_mode)[0]
        - 0.01 * losses.aggregate_loss(entropy, mask, agg_mode)
    )
    loss.backward()
    out = mask == 0
    assert torch.all(logp.grad[out] == 0) and torch.all(logp.grad[~out] != 0)
    assert torch.all(values.grad[out] == 0) and torch.all(values.grad[~out] != 0)
    assert torch.all(logits.grad[out] == 0) and torch.any(logits.grad[~out] != 0)


# --------------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------------


def test_kl_estimators_single_token():
    # policy prob 0.5, reference prob 0.25: log r = ln(0.25 / 0.5) = -0.693147
    logp, ref, mask = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]]), torch.ones(1, 1)
    close(losses.kl_penalty(logp, ref, mask, "k1"), [[0.693147]])  # -log r
    close(losses.kl_penalty(logp, ref, mask, "k2"), [[0.240227]])  # 0.5 * 0.693147^2
    close(losses.kl_penalty(logp, ref, mask, "k3"), [[0.193147]])  # r - 1 - log r = 0.5 - 1 + 0.693147
    close(losses.kl_penalty(logp, ref, mask, "low_var_kl"), [[0.193147]])
    with pytest.raises(ValueError, match="k3"):
        losses.kl_penalty(logp, ref, mask, "k4")


def test_k1_and_k3_are_unbiased_on_known_distributions():
    # p = [0.2, 0.3, 0.5] (policy), q = [0.4, 0.4, 0.2] (reference)
    # KL(p || q) = 0.2 ln(0.2/0.4) + 0.3 ln(0.3/0.4) + 0.5 ln(0.5/0.2)
    #            = 0.2 (-0.693147) + 0.3 (-0.287682) + 0.5 (0.916291) = -0.138629 - 0.086305 + 0.458145 = 0.233211
    p, q = torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([[0.4, 0.4, 0.2]])
    mask = torch.ones(1, 3)
    for kind in ("k1", "k3"):
        per_token = losses.kl_penalty(p.log(), q.log(), mask, kind)
        close((p * per_token).sum(), 0.233211)  # exact expectation over the tokens the policy samples
    k3 = losses.kl_penalty(p.log(), q.log(), mask, "k3")
    k1 = losses.kl_penalty(p.log(), q.log(), mask, "k1")
    assert torch.all(k3 >= 0) and torch.any(k1 < 0)  # k3 is never negative per token; k1 can be


# --------------------------------------------------------------------------------------------------------
# value loss, entropy, logprobs
# --------------------------------------------------------------------------------------------------------


def test_value_loss_clipped_hand_computed():
    values = torch.tensor([[1.0, 0.6]])
    old = torch.tensor([[0.5, 0.5]])
    returns = torch.tensor([[1.0, 0.0]])
    loss, m = losses.value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: unclipped (1 - 1)^2 = 0 ; clipped V = 0.5 + 0.2 = 0.7 -> (0.7 - 1)^2 = 0.09 ; max 0.09
    # token 1: unclipped (0.6 - 0)^2 = 0.36 ; 0.6 is within 0.5 +- 0.2 -> same 0.36
    # 0.5 * (0.09 + 0.36) / 2 = 0.1125
    close(loss, 0.1125)
    close(m["vf_clip_fraction"], 0.5)
    plain, _ = losses.value_loss(values, old, returns, torch.ones(1, 2), clip_range=None)
    close(plain, 0.09)  # 0.5 * (0 + 0.36) / 2


def test_entropy_from_logits_known_values_and_chunking():
    logits = torch.zeros(2, 3, 8)  # uniform over 8 -> ln 8 = 2.079442
    logits[1, 2] = torch.tensor([100.0, 0, 0, 0, 0, 0, 0, 0])  # one-hot -> ~0
    entropy = entropy_from_logits(logits)
    close(entropy, [[2.079442] * 3, [2.079442, 2.079442, 0.0]])
    # two-way [ln 3, 0] -> p = [0.75, 0.25]: H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335
    close(entropy_from_logits(torch.tensor([[[math.log(3.0), 0.0]]])), [[0.562335]])
    random_logits = torch.randn(3, 11, 50, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    close(entropy_from_logits(random_logits, chunk_size=4), entropy_from_logits(random_logits, None))
    close(masked.masked_mean(entropy, torch.tensor([[0, 0, 0], [0, 0, 1]])), 0.0)  # only the one-hot token
