"""Losses of the learner: the token-level PPO/GRPO terms and the training forward that feeds them.

The token-level terms (``aggregate_loss``, ``policy_loss``, ``kl_penalty``, ``value_loss``) are pure functions
over padded ``[B, T]`` tensors that touch only tokens whose ``loss_mask`` is 1 (``masked.py``).
:func:`rl_loss` assembles them for one micro-batch from the backbone's last hidden state: log-probabilities
and entropies are recomputed in the distribution the engine sampled from (``policy.logprobs.token_stats``),
for the generated tokens only (their hidden states are gathered before the LM head, which never builds the
[B, T, V] logits), the clipped policy-gradient loss, the optional KL to a frozen reference and the optional
entropy bonus are taken over those tokens, and with PPO (``algorithm.advantage: gae``) a linear value head
reads the same hidden state and its clipped value loss joins the total. Every term is divided by a
``normalizer`` that the caller computes over the whole optimizer step (all micro-batches, all learners), so
that summing the gradients of micro-batches and learners gives exactly the gradient of the full-batch loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deepeyes_agent.policy.logprobs import last_hidden_state, token_stats
from deepeyes_agent.training.choices import KL_ESTIMATORS, LOSS_AGG_MODES
from deepeyes_agent.training.masked import as_bool, masked_mean, masked_sum, zero_masked


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
    mask = as_bool(loss_mask)
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
    is_weights: Tensor | None = None,
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

    ``is_weights`` (asynchronous training, decoupled PPO): for an episode sampled by a policy older than the one
    about to be updated, ``old_logprobs`` are the current (proximal) policy's and each token's loss is scaled by
    its truncated importance weight min(pi_proximal / pi_behaviour, c), which corrects for the stale sampler
    without letting one unlikely token dominate; the clip then bounds the update around the proximal policy.

    Metrics (detached scalars over generated tokens): ``clip_fraction`` (the clip bound is active),
    ``dual_clip_fraction``, ``approx_kl`` (k3 of old vs new, always >= 0), ``approx_kl_k1``,
    ``ratio_mean``, ``ratio_min``, ``ratio_max``.
    """
    if clip_ratio_high is None:
        clip_ratio_high = clip_ratio_low
    mask = as_bool(loss_mask)
    # Zero before exp: garbage at masked positions must give neither inf outputs nor NaN gradients.
    log_ratio = zero_masked(logprobs - old_logprobs, mask).clamp(-20.0, 20.0)
    adv = zero_masked(advantages, mask)
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
    if is_weights is not None:
        token_loss = token_loss * zero_masked(is_weights, mask)

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
    log_r = zero_masked(ref_logprobs - logprobs, loss_mask).float()
    if kind == "k1":
        kl = -log_r
    elif kind == "k2":
        kl = 0.5 * log_r**2
    else:
        kl = torch.exp(log_r.clamp(max=20.0)) - 1.0 - log_r
        if kind == "low_var_kl":
            kl = kl.clamp(-10.0, 10.0)
    return zero_masked(kl, loss_mask)


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
    mask = as_bool(loss_mask)
    values = zero_masked(values, mask)
    old_values = zero_masked(old_values, mask)
    returns = zero_masked(returns, mask)
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


@dataclass(frozen=True)
class LossSettings:
    """What the loss needs from the config (a plain record so learners can be built without train.py)."""

    temperature: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float | None = None
    clip_ratio_c: float | None = 3.0
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    vf_coef: float = 0.5
    vf_clip: float | None = 0.2


def values_per_token(state_values: Tensor) -> Tensor:
    """Critic outputs ``[B, T]`` (entry i: value after reading token i) -> the value of the state each token
    was sampled in: entry i becomes V(tokens before i), entry 0 is 0. Same convention as the logprobs."""
    return torch.cat([torch.zeros_like(state_values[:, :1]), state_values[:, :-1]], dim=1)


def critic_values(value_head: torch.nn.Module, hidden: Tensor) -> Tensor:
    """Per-token values [B, T] from the last hidden state (in float32 whatever the model's dtype)."""
    return values_per_token(value_head(hidden.float()).squeeze(-1))


def forward_with_values(model: torch.nn.Module, value_head: torch.nn.Module | None,
                        batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The training forward: the last hidden state [B, T, H] and, with a value head, per-token values [B, T]
    (else None). One pass through the backbone; :func:`rl_loss` runs the LM head on the hidden state."""
    hidden = last_hidden_state(model, batch)
    return hidden, None if value_head is None else critic_values(value_head, hidden)


def sampled_token_stats(model: torch.nn.Module, batch: dict[str, Tensor], temperature: float,
                        suppress_token_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Logprobs and entropies [B, T] of the batch's generated (loss-mask 1) tokens under ``model``, 0 elsewhere:
    the KL reference's pass and SFT's."""
    return token_stats(last_hidden_state(model, batch), model.lm_head, batch["input_ids"], batch["loss_mask"],
                       temperature, suppress_token_ids)


def rl_loss(lm_head: torch.nn.Module, hidden: Tensor, batch: dict[str, Tensor], settings: LossSettings,
            suppress_token_ids: Sequence[int], normalizer: float, ref_logprobs: Tensor | None = None,
            values: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """The loss of one micro-batch (a share of the full-batch loss) and its metrics (sums over tokens).

    loss = policy_loss + kl_coef * KL(policy || reference) - entropy_coef * entropy [+ vf_coef * value_loss],
    each aggregated with ``settings.loss_agg`` and divided by ``normalizer``. ``hidden`` is the backbone's last
    hidden state (:func:`forward_with_values`) and ``lm_head`` the policy's; ``batch`` is ``collate_episodes``
    output (``loss_mask``, ``old_logprobs``, ``advantages``, with stale episodes ``is_weights``; with a critic
    also ``old_values``, ``returns``);
    ``ref_logprobs`` is needed when ``kl_coef`` is set; ``values`` (the critic's, with grad) add the clipped
    value loss of PPO.
    """
    mask = batch["loss_mask"]
    logprobs, entropy = token_stats(hidden, lm_head, batch["input_ids"], mask, settings.temperature,
                                    suppress_token_ids)
    loss, pg_metrics = policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"], mask, clip_ratio_low=settings.clip_ratio_low,
        clip_ratio_high=settings.clip_ratio_high, clip_ratio_c=settings.clip_ratio_c, agg_mode=settings.loss_agg,
        normalizer=normalizer, is_weights=batch.get("is_weights"),
    )
    n_tokens = float(mask.sum())
    gap = (logprobs.detach() - batch["old_logprobs"]).abs() * mask
    metrics = {
        "pg_loss": float(loss.detach()) * normalizer,  # un-normalised: the caller sums micro-batches
        "logprob_gap_sum": float(gap.sum()),  # engine vs this forward (see LLMLearner.update_from_packed)
        "logprob_gap_max": float(gap.max()) if gap.numel() else 0.0,
        "clip_fraction_sum": float(pg_metrics["clip_fraction"]) * n_tokens,
        "approx_kl_sum": float(pg_metrics["approx_kl"]) * n_tokens,
        "entropy_sum": float(masked_sum(entropy.detach(), mask)),
        "tokens": n_tokens,
    }
    if settings.entropy_coef != 0.0:
        loss = loss - settings.entropy_coef * aggregate_loss(entropy, mask, settings.loss_agg, normalizer)
    if settings.kl_coef != 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_coef is set but no reference logprobs were given")
        kl = kl_penalty(logprobs, ref_logprobs, mask, settings.kl_estimator)
        loss = loss + settings.kl_coef * aggregate_loss(kl, mask, settings.loss_agg, normalizer)
        metrics["kl_sum"] = float(masked_sum(kl.detach(), mask))
    if values is not None:
        v_loss, v_metrics = value_loss(values, batch["old_values"], batch["returns"], mask,
                                       clip_range=settings.vf_clip, agg_mode=settings.loss_agg, normalizer=normalizer)
        loss = loss + settings.vf_coef * v_loss
        metrics["value_loss"] = float(v_loss.detach()) * normalizer
        metrics["vf_clip_fraction_sum"] = float(v_metrics["vf_clip_fraction"]) * n_tokens
        metrics["value_sum"] = float(v_metrics["value_mean"]) * n_tokens
    return loss, metrics


def sft_loss(model: torch.nn.Module, batch: dict[str, Tensor], suppress_token_ids: Sequence[int],
             normalizer: float) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of the demonstrated (loss-mask 1) tokens, summed and divided by ``normalizer``."""
    mask = batch["loss_mask"]
    logprobs, _ = sampled_token_stats(model, batch, 1.0, suppress_token_ids)
    nll = -masked_sum(logprobs, mask)
    return nll / normalizer, {"nll_sum": float(nll.detach()), "tokens": float(mask.sum())}


def token_count(episodes: Sequence[Any], loss_agg: str) -> float:
    """The normalizer of ``loss_agg`` for a set of episodes: generated tokens, or sequences with any."""
    if loss_agg == "token-mean":
        return float(sum(sum(e.loss_mask) for e in episodes))
    return float(sum(1 for e in episodes if any(e.loss_mask)))
