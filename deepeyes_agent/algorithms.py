"""RL algorithms for multi-turn VLM trajectories: advantage estimators, losses and small utilities.

Everything here is a pure torch function over padded batches of shape ``[B, T]``, read top to bottom:

1. masked utilities (``masked_sum``, ``masked_mean``, ``masked_var``, ``masked_whiten``)
2. token-level quantities from logits (``logprobs_from_logits``, ``entropy_from_logits``)
3. placing outcome rewards on tokens (``outcome_token_rewards``, ``broadcast_sequence_advantage``)
4. advantage estimators (``grpo_advantages``, ``rloo_advantages``, ``reinforce_plus_plus_advantages``,
   ``gae_advantages``) and the by-name dispatcher ``compute_advantages``
5. losses (``aggregate_loss``, ``policy_loss``, ``kl_penalty``, ``kl_loss``, ``value_loss``)

The one convention everywhere is the ``loss_mask``: 1 on tokens the policy generated, 0 on everything else
(prompt, tool responses, image tokens, padding). A DeepEyes trajectory interleaves assistant turns with
observations; the observations stay in the context the model attends to, but they were not sampled from the
policy, so no loss, KL, entropy or advantage may ever touch them. Every function below treats values at
masked-out positions as garbage: changing them (even to NaN or inf) changes no output and no gradient.
Outputs that are ``[B, T]`` are exactly 0 at masked-out positions.

Outcome rewards (one scalar per trajectory, from the judge) sit on the *last generated token* of the
trajectory, i.e. the last position whose mask is 1.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "broadcast_sequence_advantage",
    "compute_advantages",
    "discounted_returns",
    "entropy_from_logits",
    "gae_advantages",
    "grpo_advantages",
    "kl_loss",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "outcome_token_rewards",
    "policy_loss",
    "reinforce_plus_plus_advantages",
    "rloo_advantages",
    "value_loss",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "gae")


# ---------------------------------------------------------------------------------------------------------
# 1. Masked utilities
# ---------------------------------------------------------------------------------------------------------


def _as_bool(loss_mask: Tensor) -> Tensor:
    return loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0


def _zero_masked(x: Tensor, loss_mask: Tensor) -> Tensor:
    """``x`` with masked-out positions replaced by 0.

    ``torch.where`` (not ``x * mask``) so that NaN/inf at masked positions cannot leak into outputs, and so
    that the gradient reaching masked-out positions is exactly 0.
    """
    return torch.where(_as_bool(loss_mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, loss_mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``loss_mask`` is 1 (over everything, or along ``dim``)."""
    x = _zero_masked(x, loss_mask)
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, loss_mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``loss_mask`` is 1; 0 (not NaN) where there are none."""
    count = _as_bool(loss_mask).to(x.dtype if x.is_floating_point() else torch.float32)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, loss_mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, loss_mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all masked-in positions (Bessel-corrected by default); 0 with < 2 tokens."""
    mean = masked_mean(x, loss_mask)
    count = _as_bool(loss_mask).sum()
    sq_dev = masked_sum((x - mean) ** 2, loss_mask)
    denom = (count - 1) if unbiased else count
    return sq_dev / denom.clamp(min=1)


def masked_whiten(x: Tensor, loss_mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over the masked-in tokens.

    Statistics are taken over *all* masked-in tokens of the batch, so every generated token counts once.
    The result is 0 at masked-out positions.
    """
    mean = masked_mean(x, loss_mask)
    var = masked_var(x, loss_mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_masked(whitened, loss_mask)


# ---------------------------------------------------------------------------------------------------------
# 2. Token-level quantities from logits
# ---------------------------------------------------------------------------------------------------------


def _chunks(n: int, chunk_size: int | None) -> list[slice]:
    step = chunk_size if chunk_size and chunk_size > 0 else max(n, 1)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int | None = 1024) -> Tensor:
    """log p(label) for every position: ``logits [..., V]``, ``labels [...]`` -> ``[...]`` (float32).

    Computed ``chunk_size`` tokens at a time in float32: a full ``log_softmax`` over a 150k vocabulary for a
    10k-token trajectory would otherwise materialise a second ``[T, V]`` float32 tensor at once.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    out = []
    for sl in _chunks(flat_logits.shape[0], chunk_size):
        chunk = flat_logits[sl].float()
        picked = chunk.gather(-1, flat_labels[sl].unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out:
        return flat_logits.new_zeros(labels.shape, dtype=torch.float32)
    return torch.cat(out).reshape(labels.shape)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = 1024) -> Tensor:
    """Entropy of the softmax distribution at every position: ``logits [..., V]`` -> ``[...]`` (float32).

    Uses H = logsumexp(z) - sum_v softmax(z)_v z_v, ``chunk_size`` tokens at a time, so the float32
    softmax temporaries are ``[chunk_size, V]`` instead of ``[T, V]``. As a pure metric, call it under
    ``torch.no_grad()``; with grad (an entropy bonus) autograd still keeps each chunk's softmax.
    Reduce it with ``masked_mean(entropy, loss_mask)`` to count generated tokens only.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for sl in _chunks(flat.shape[0], chunk_size):
        chunk = flat[sl].float()
        probs = torch.softmax(chunk, dim=-1)
        out.append(torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(dim=-1))
    if not out:
        return flat.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(out).reshape(logits.shape[:-1])


# ---------------------------------------------------------------------------------------------------------
# 3. Outcome rewards <-> tokens
# ---------------------------------------------------------------------------------------------------------


def outcome_token_rewards(scores: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-token rewards ``[B, T]``: each trajectory's score on its last generated token, 0 elsewhere.

    Rows without any generated token get no reward at all.
    """
    mask = _as_bool(loss_mask)
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
    return _zero_masked(seq_advantages.float().unsqueeze(1).expand(loss_mask.shape), loss_mask)


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
    mask = _as_bool(loss_mask)
    rewards = _zero_masked(token_rewards.float(), mask)
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
    rewards = _zero_masked(token_rewards.float(), loss_mask)
    if kl is not None and kl_coef != 0.0:
        rewards = rewards - kl_coef * _zero_masked(kl.float(), loss_mask)
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
    mask = _as_bool(loss_mask)
    rewards = _zero_masked(token_rewards.float(), mask)
    values = _zero_masked(values.float(), mask)
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
    returns = _zero_masked(advantages + values, mask)
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


# ---------------------------------------------------------------------------------------------------------
# 5. Losses. Inputs are [B, T]; every loss returns a scalar and touches only tokens whose mask is 1.
# ---------------------------------------------------------------------------------------------------------


def aggregate_loss(
    token_loss: Tensor, loss_mask: Tensor, mode: str = "token-mean", normalizer: float | Tensor | None = None
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar.

    - ``token-mean`` (DeepEyes recipe, the default): sum over all generated tokens of the batch / their
      count. Every token weighs the same, so a long multi-turn trajectory is not down-weighted per token and
      long failures are penalised as strongly as they are frequent.
    - ``seq-mean-token-sum``: per-trajectory sum, then mean over trajectories (a long trajectory weighs more).
    - ``seq-mean-token-mean``: per-trajectory mean, then mean over trajectories (the original GRPO; each
      trajectory weighs the same whatever its length).

    Sequence means count only rows that contain at least one generated token. ``normalizer`` replaces the
    denominator (the token count, or the sequence count), e.g. the global count across gradient-accumulation
    micro-batches and data-parallel ranks, so the sum of micro-batch losses equals the full-batch loss.
    """
    mask = _as_bool(loss_mask)
    if mode == "token-mean":
        denominator = mask.sum().clamp(min=1) if normalizer is None else normalizer
        return masked_sum(token_loss, mask) / denominator
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        per_seq = masked_sum(token_loss, mask, dim=1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / mask.sum(dim=1).clamp(min=1)
        denominator = mask.any(dim=1).sum().clamp(min=1) if normalizer is None else normalizer
        return per_seq.sum() / denominator
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {list(LOSS_AGG_MODES)}")


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float | None = None,
    agg_mode: str = "token-mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, optionally dual-clipped; returns (loss, metrics).

    ratio = exp(logprobs - old_logprobs) and per token
        loss = max(-A * ratio, -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)).
    The clip removes the incentive to move a token's probability further than the trust region in the
    direction its advantage pushes. ``clip_ratio_high`` defaults to ``clip_ratio_low``; a larger upper bound
    ("clip-higher") leaves more room to raise unlikely tokens, which helps keep entropy from collapsing.

    Dual clip (``clip_ratio_c``, e.g. 3.0, must be > 1): for A < 0 the max above is unbounded in the ratio,
    so one stale token whose probability grew a lot since sampling can produce a huge loss and gradient.
    The dual clip caps that token's loss at -A * clip_ratio_c (its gradient becomes 0).

    Metrics (detached scalars over generated tokens): ``clip_fraction`` (the clip bound is active),
    ``dual_clip_fraction``, ``approx_kl`` (k3 of old vs new, always >= 0), ``approx_kl_k1``,
    ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    if clip_ratio_high is None:
        clip_ratio_high = clip_ratio_low
    mask = _as_bool(loss_mask)
    # Zero before exp: garbage at masked positions must give neither inf outputs nor NaN gradients.
    log_ratio = _zero_masked(logprobs - old_logprobs, mask).clamp(-20.0, 20.0)
    adv = _zero_masked(advantages, mask)
    ratio = torch.exp(log_ratio)

    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    token_loss = torch.maximum(unclipped, clipped)
    is_clipped = clipped > unclipped
    is_dual_clipped = torch.zeros_like(mask)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1, got {clip_ratio_c}")
        cap = -adv * clip_ratio_c
        is_dual_clipped = (adv < 0) & (token_loss > cap)
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, cap), token_loss)

    loss = aggregate_loss(token_loss, mask, agg_mode, normalizer)
    with torch.no_grad():
        ratio_d = ratio.detach()
        any_token = mask.any()
        big = torch.tensor(float("inf"), dtype=ratio_d.dtype, device=ratio_d.device)
        metrics = {
            "clip_fraction": masked_mean(is_clipped.float(), mask),
            "dual_clip_fraction": masked_mean(is_dual_clipped.float(), mask),
            "approx_kl": masked_mean(ratio_d - 1.0 - log_ratio.detach(), mask),
            "approx_kl_k1": masked_mean(-log_ratio.detach(), mask),
            "ratio_mean": masked_mean(ratio_d, mask),
            "ratio_min": torch.where(mask, ratio_d, big).min() if any_token else ratio_d.new_ones(()),
            "ratio_max": torch.where(mask, ratio_d, -big).max() if any_token else ratio_d.new_ones(()),
        }
    return loss, metrics


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, loss_mask: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens; 0 at masked-out positions.

    With log r = ref_logprobs - logprobs (tokens sampled from the policy):
    - ``k1`` = -log r: unbiased, high variance, can be negative per token (use it as a reward penalty).
    - ``k2`` = (log r)^2 / 2: biased but low variance; its gradient is the true KL's gradient to first order.
    - ``k3`` = r - 1 - log r: unbiased and always >= 0 (Schulman's estimator); the usual KL *loss*.
    - ``low_var_kl``: k3 clamped to [-10, 10] for numerical safety with far-apart policies.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {list(KL_ESTIMATORS)}")
    log_r = _zero_masked(ref_logprobs - logprobs, loss_mask).float()
    if kind == "k1":
        kl = -log_r
    elif kind == "k2":
        kl = 0.5 * log_r**2
    else:
        kl = torch.exp(log_r.clamp(max=20.0)) - 1.0 - log_r
        if kind == "low_var_kl":
            kl = kl.clamp(-10.0, 10.0)
    return _zero_masked(kl, loss_mask)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    loss_mask: Tensor,
    kind: str = "k3",
    agg_mode: str = "token-mean",
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """KL to a frozen reference as a loss term (GRPO style): ``aggregate_loss(kl_penalty(...))``.

    The DeepEyes recipe uses no KL; configs that want one add ``kl_coef * kl_loss(...)`` to the loss.
    """
    return aggregate_loss(kl_penalty(logprobs, ref_logprobs, loss_mask, kind), loss_mask, agg_mode, normalizer)


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    loss_mask: Tensor,
    clip_range: float | None = 0.2,
    agg_mode: str = "token-mean",
    normalizer: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO critic loss 0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2); returns (loss, metrics).

    Clipping the new value around the value at sampling time stops one update from moving the critic far
    from the estimates the advantages were computed with. ``clip_range=None`` gives the plain squared error.
    Metrics: ``vf_clip_fraction`` (the clipped term is the larger), ``value_mean``, ``value_error``.
    """
    mask = _as_bool(loss_mask)
    values = _zero_masked(values, mask)
    old_values = _zero_masked(old_values, mask)
    returns = _zero_masked(returns, mask)
    unclipped = (values - returns) ** 2
    if clip_range is None:
        token_loss, is_clipped = unclipped, torch.zeros_like(mask)
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        token_loss, is_clipped = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * aggregate_loss(token_loss, mask, agg_mode, normalizer)
    with torch.no_grad():
        metrics = {
            "vf_clip_fraction": masked_mean(is_clipped.float(), mask),
            "value_mean": masked_mean(values.detach(), mask),
            "value_error": masked_mean(unclipped.detach(), mask),
        }
    return loss, metrics
