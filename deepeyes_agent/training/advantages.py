"""Advantage estimators for multi-turn VLM trajectories, as pure torch functions over ``[B, T]`` batches.

GRPO (and Dr. GRPO), RLOO, REINFORCE++ and PPO's GAE; ``compute_advantages`` picks one by name. Outcome
rewards (one scalar per trajectory, from the judge) sit on the *last generated token* of the trajectory, the
last position whose ``loss_mask`` is 1; outputs are exactly 0 at masked-out positions (see ``masked.py``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

from deepeyes_agent.training.choices import ADVANTAGE_ESTIMATORS
from deepeyes_agent.training.masked import as_bool, masked_whiten, zero_masked

# ---------------------------------------------------------------------------------------------------------
# 3. Outcome rewards <-> tokens
# ---------------------------------------------------------------------------------------------------------


def outcome_token_rewards(scores: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-token rewards ``[B, T]``: each trajectory's score on its last generated token, 0 elsewhere.

    Rows without any generated token get no reward at all.
    """
    mask = as_bool(loss_mask)
    batch, length = mask.shape
    positions = torch.arange(1, length + 1, device=mask.device).expand(batch, length)
    last = torch.where(mask, positions, 0).argmax(dim=1)  # index of the last 1 in each row
    rewards = torch.zeros(batch, length, dtype=torch.float32, device=mask.device)
    has_tokens = mask.any(dim=1)
    rows = torch.arange(batch, device=mask.device)
    rewards[rows, last] = torch.where(has_tokens, scores.float(), 0.0)
    return rewards


def broadcast_sequence_advantage(seq_advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """``[B]`` -> ``[B, T]``: every generated token of a trajectory gets the trajectory's advantage."""
    return zero_masked(seq_advantages.float().unsqueeze(1).expand(loss_mask.shape), loss_mask)


# ---------------------------------------------------------------------------------------------------------
# 4. Advantage estimators. Each returns (advantages [B, T], returns [B, T]), zero at masked-out positions.
# They are regression/weighting targets, so they run under no_grad (a critic's values come out detached).
# ---------------------------------------------------------------------------------------------------------


def _group_index(group_ids: Tensor | Sequence[Hashable], device: torch.device) -> tuple[Tensor, int]:
    """Map arbitrary group ids (ints, prompt uids, ...) to ``0..G-1``; returns (index ``[B]``, G)."""
    if isinstance(group_ids, Tensor):
        unique_ids, index = torch.unique(group_ids, return_inverse=True)
        return index.to(device), unique_ids.numel()
    first_seen: dict[Hashable, int] = {}
    index = [first_seen.setdefault(g, len(first_seen)) for g in group_ids]
    return torch.tensor(index, dtype=torch.long, device=device), len(first_seen)


def _group_stats(scores: Tensor, index: Tensor, n_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample group size, group sum and group (Bessel-corrected) std, each ``[B]``."""
    zeros = torch.zeros(n_groups, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, index, torch.ones_like(scores))
    total = zeros.index_add(0, index, scores)
    mean = total / count
    sq_dev = zeros.index_add(0, index, (scores - mean[index]) ** 2)
    std = torch.sqrt(sq_dev / (count - 1).clamp(min=1))
    return count[index], total[index], std[index]


@torch.no_grad()
def grpo_advantages(
    scores: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    loss_mask: Tensor,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO: A_i = (r_i - mean(group)) / (std(group) + eps), broadcast to the trajectory's generated tokens.

    A group is the set of rollouts of the same prompt (``group_ids`` equal), so the group mean is a
    baseline that needs no critic. ``norm_by_std=False`` is the Dr. GRPO variant: dividing by the group std
    up-weights prompts that are almost always solved or almost always failed (tiny std), a difficulty bias
    that Dr. GRPO removes. The std is Bessel-corrected. A group of one has no baseline: its advantage is 0.
    Returns are the advantages (there is no critic to regress).
    """
    scores = scores.float()
    index, n_groups = _group_index(group_ids, scores.device)
    count, total, std = _group_stats(scores, index, n_groups)
    centred = scores - total / count
    seq_adv = centred / (std + eps) if norm_by_std else centred
    seq_adv = torch.where(count > 1, seq_adv, 0.0)
    advantages = broadcast_sequence_advantage(seq_adv, loss_mask)
    return advantages, advantages.clone()


@torch.no_grad()
def rloo_advantages(scores: Tensor, group_ids: Tensor | Sequence[Hashable], loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """RLOO: A_i = r_i - mean of the *other* rollouts of the same prompt, broadcast to generated tokens.

    Leaving sample i out of its own baseline keeps the estimator unbiased; with n rollouts it equals
    n / (n - 1) * (r_i - group mean). A group of one has no baseline: its advantage is 0.
    """
    scores = scores.float()
    index, n_groups = _group_index(group_ids, scores.device)
    count, total, _ = _group_stats(scores, index, n_groups)
    baseline = (total - scores) / (count - 1).clamp(min=1)
    seq_adv = torch.where(count > 1, scores - baseline, 0.0)
    advantages = broadcast_sequence_advantage(seq_adv, loss_mask)
    return advantages, advantages.clone()


@torch.no_grad()
def discounted_returns(token_rewards: Tensor, loss_mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = r_t + gamma * G_next over the generated tokens of each row, skipping masked-out tokens.

    "next" is the next *generated* token, so an observation between two assistant turns neither adds
    reward nor costs a discount step. Same chain as ``gae_advantages`` (with zero values, lambda = 1).
    """
    mask = as_bool(loss_mask)
    rewards = zero_masked(token_rewards.float(), mask)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        candidate = rewards[:, t] + gamma * running
        running = torch.where(mask[:, t], candidate, running)
        returns[:, t] = torch.where(mask[:, t], candidate, 0.0)
    return returns


def _shaped_token_rewards(
    scores: Tensor | None, token_rewards: Tensor | None, loss_mask: Tensor, kl: Tensor | None, kl_coef: float
) -> Tensor:
    """Per-token rewards: given ones, or the outcome score on the last token; minus ``kl_coef * kl``."""
    if token_rewards is None:
        if scores is None:
            raise ValueError("need `scores` [B] (outcome rewards) or `token_rewards` [B, T]")
        token_rewards = outcome_token_rewards(scores, loss_mask)
    rewards = zero_masked(token_rewards.float(), loss_mask)
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * zero_masked(kl.float(), loss_mask)
    return rewards


@torch.no_grad()
def reinforce_plus_plus_advantages(
    scores: Tensor | None,
    loss_mask: Tensor,
    token_rewards: Tensor | None = None,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted returns of (outcome reward - kl_coef * per-token KL), whitened over the batch.

    The token-level KL penalty (``kl`` = a per-token estimate such as ``kl_penalty(..., "k1")``) is folded
    into the reward, so each token's return carries the KL cost of the tokens after it. There is no group
    baseline: normalising the returns over all generated tokens of the batch (``masked_whiten``) plays that
    role, which is what makes the method critic-free and prompt-grouping-free. Returns are the raw returns.
    """
    rewards = _shaped_token_rewards(scores, token_rewards, loss_mask, kl, kl_coef)
    returns = discounted_returns(rewards, loss_mask, gamma)
    return masked_whiten(returns, loss_mask), returns


@torch.no_grad()
def gae_advantages(
    token_rewards: Tensor,
    values: Tensor,
    loss_mask: Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """PPO's generalised advantage estimation over per-token rewards and critic values.

    delta_t = r_t + gamma * V(next) - V(t);  A_t = delta_t + gamma * lam * A(next);  returns = A + V.

    Multi-turn choice: "next" is the next *generated* token of the same row, not position t + 1. Observation
    tokens (tool output, images) are not actions, so the value chain jumps over them and links the last token
    of assistant turn k to the first token of turn k + 1; the environment's response is part of that one
    transition (it only conditions V(next)). Discounting therefore counts generated tokens only, and rewards
    or values at masked-out positions are ignored. After the last generated token the episode is over:
    V(next) = 0, A(next) = 0.
    """
    mask = as_bool(loss_mask)
    rewards = zero_masked(token_rewards.float(), mask)
    values = zero_masked(values.float(), mask)
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        is_action = mask[:, t]
        advantages[:, t] = torch.where(is_action, advantage, 0.0)
        next_value = torch.where(is_action, values[:, t], next_value)  # masked token: carry the link over it
        next_advantage = torch.where(is_action, advantage, next_advantage)
    returns = zero_masked(advantages + values, mask)
    return advantages, returns


def _require(name: str, **inputs: Tensor | Sequence[Hashable] | None) -> None:
    missing = [key for key, value in inputs.items() if value is None]
    if missing:
        raise ValueError(f"advantage estimator {name!r} needs {', '.join(missing)}")


def compute_advantages(
    name: str,
    *,
    loss_mask: Tensor,
    scores: Tensor | None = None,
    group_ids: Tensor | Sequence[Hashable] | None = None,
    token_rewards: Tensor | None = None,
    values: Tensor | None = None,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Run the advantage estimator a config names; returns ``(advantages [B, T], returns [B, T])``.

    Names: ``grpo`` (``norm_by_std`` switch), ``dr_grpo`` (= grpo without std), ``rloo``,
    ``reinforce_plus_plus`` and ``gae``. ``scores`` are outcome rewards ``[B]``; ``group_ids`` say which
    rollouts share a prompt. For ``gae`` and ``reinforce_plus_plus`` the per-token rewards are
    ``token_rewards`` if given, else the score on the last generated token, minus ``kl_coef * kl``.
    Inputs an estimator does not use are ignored.
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {list(ADVANTAGE_ESTIMATORS)}")
    if name in ("grpo", "dr_grpo", "rloo"):
        _require(name, scores=scores, group_ids=group_ids)
        if name == "rloo":
            return rloo_advantages(scores, group_ids, loss_mask)
        return grpo_advantages(scores, group_ids, loss_mask, norm_by_std=norm_by_std and name == "grpo", eps=eps)
    if name == "reinforce_plus_plus":
        return reinforce_plus_plus_advantages(scores, loss_mask, token_rewards, kl, kl_coef, gamma)
    _require(name, values=values)
    rewards = _shaped_token_rewards(scores, token_rewards, loss_mask, kl, kl_coef)
    return gae_advantages(rewards, values, loss_mask, gamma=gamma, lam=lam)
