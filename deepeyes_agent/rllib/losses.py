"""The training forward and the losses of one micro-batch, as plain functions (no Ray needed).

Read it top to bottom: a forward pass gives logits; logits become the log-probabilities of the tokens that
were sampled, under the same distribution the engine sampled from (temperature, vision tokens removed);
the clipped policy-gradient loss, the optional KL to a frozen reference and the optional entropy bonus
are taken over generated tokens only (``loss_mask`` 1). With PPO (``algorithm.advantage: gae``) a linear
value head reads the same forward's last hidden state and its clipped value loss joins the total. Every term
is divided by a ``normalizer`` that the caller computes over the whole optimizer step (all micro-batches, all
learners), so that summing the gradients of micro-batches and learners gives exactly the gradient of the
full-batch loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deepeyes_agent.algorithms import (
    aggregate_loss,
    entropy_from_logits,
    kl_penalty,
    masked_sum,
    policy_loss,
    value_loss,
)

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")
# A finite "minus infinity": removes suppressed tokens from softmax without 0 * inf = NaN in the entropy.
_SUPPRESSED = -1e9


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


def token_stats_from_logits(logits: Tensor, input_ids: Tensor, temperature: float,
                            suppress_token_ids: Sequence[int],
                            with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probabilities of ``input_ids`` (and entropies) from a forward's logits, both [B, T].

    Entry ``[b, i]`` scores token ``i`` given the tokens before it; entry ``[b, 0]`` is 0 (nothing
    predicts the first token). Same convention as ``models.token_logprobs`` and the engines.
    """
    logits = logits[:, :-1].float() / (temperature if temperature > 0 else 1.0)
    if suppress_token_ids:
        logits[..., list(suppress_token_ids)] = _SUPPRESSED
    logp_all = torch.log_softmax(logits, dim=-1)
    picked = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    zero = torch.zeros_like(picked[:, :1])
    logprobs = torch.cat([zero, picked], dim=1)
    entropy = torch.cat([zero, entropy_from_logits(logits)], dim=1) if with_entropy else None
    return logprobs, entropy


def forward_logits(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The training forward: logits [B, T, V] of a collated batch (mRoPE positions, pixels, grids)."""
    return model(**{k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}, use_cache=False).logits


def values_per_token(state_values: Tensor) -> Tensor:
    """Critic outputs ``[B, T]`` (entry i: value after reading token i) -> the value of the state each token
    was sampled in: entry i becomes V(tokens before i), entry 0 is 0. Same convention as the logprobs."""
    return torch.cat([torch.zeros_like(state_values[:, :1]), state_values[:, :-1]], dim=1)


def last_hidden_state(model: torch.nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The backbone alone (vision tower + language model, no LM head): the last, normed hidden state [B, T, H]."""
    inputs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
    return model.model(**inputs, use_cache=False).last_hidden_state


def critic_values(value_head: torch.nn.Module, hidden: Tensor) -> Tensor:
    """Per-token values [B, T] from the last hidden state (in float32 whatever the model's dtype)."""
    return values_per_token(value_head(hidden.float()).squeeze(-1))


def forward_with_values(model: torch.nn.Module, value_head: torch.nn.Module | None,
                        batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The training forward: logits [B, T, V] and, with a value head, per-token values [B, T] (else None).

    One pass through the backbone; the LM head and the value head both read its last hidden state.
    """
    hidden = last_hidden_state(model, batch)
    return model.lm_head(hidden), None if value_head is None else critic_values(value_head, hidden)


def sampled_token_stats(model: torch.nn.Module, batch: dict[str, Tensor], temperature: float,
                        suppress_token_ids: Sequence[int], with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """Forward pass + :func:`token_stats_from_logits`."""
    return token_stats_from_logits(forward_logits(model, batch), batch["input_ids"], temperature,
                                   suppress_token_ids, with_entropy)


def rl_loss_from_logits(logits: Tensor, batch: dict[str, Tensor], settings: LossSettings,
                        suppress_token_ids: Sequence[int], normalizer: float,
                        ref_logprobs: Tensor | None = None, values: Tensor | None = None,
                        ) -> tuple[Tensor, dict[str, float]]:
    """The loss of one micro-batch (a share of the full-batch loss) and its metrics (sums over tokens).

    loss = policy_loss + kl_coef * KL(policy || reference) - entropy_coef * entropy [+ vf_coef * value_loss],
    each aggregated with ``settings.loss_agg`` and divided by ``normalizer``. ``batch`` is ``collate_episodes``
    output (``loss_mask``, ``old_logprobs``, ``advantages``; with a critic also ``old_values``, ``returns``);
    ``ref_logprobs`` is needed when ``kl_coef`` is set; ``values`` (the critic's, with grad) add the clipped
    value loss of PPO.
    """
    mask = batch["loss_mask"]
    logprobs, entropy = token_stats_from_logits(logits, batch["input_ids"], settings.temperature, suppress_token_ids)
    loss, pg_metrics = policy_loss(
        logprobs, batch["old_logprobs"], batch["advantages"], mask, clip_ratio_low=settings.clip_ratio_low,
        clip_ratio_high=settings.clip_ratio_high, clip_ratio_c=settings.clip_ratio_c, agg_mode=settings.loss_agg,
        normalizer=normalizer,
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


def rl_loss(model: torch.nn.Module, batch: dict[str, Tensor], settings: LossSettings,
            suppress_token_ids: Sequence[int], normalizer: float, ref_model: torch.nn.Module | None = None,
            ) -> tuple[Tensor, dict[str, float]]:
    """Forward pass (and the reference's, for KL) + :func:`rl_loss_from_logits`."""
    ref_logprobs = None
    if settings.kl_coef != 0.0 and ref_model is not None:
        with torch.no_grad():
            ref_logprobs, _ = sampled_token_stats(ref_model, batch, settings.temperature, suppress_token_ids,
                                                  with_entropy=False)
    return rl_loss_from_logits(forward_logits(model, batch), batch, settings, suppress_token_ids, normalizer,
                               ref_logprobs)


def sft_loss(model: torch.nn.Module, batch: dict[str, Tensor], suppress_token_ids: Sequence[int],
             normalizer: float) -> tuple[Tensor, dict[str, float]]:
    """Negative log-likelihood of the demonstrated (loss-mask 1) tokens, summed and divided by ``normalizer``."""
    mask = batch["loss_mask"]
    logprobs, _ = sampled_token_stats(model, batch, 1.0, suppress_token_ids, with_entropy=False)
    nll = -masked_sum(logprobs, mask)
    return nll / normalizer, {"nll_sum": float(nll.detach()), "tokens": float(mask.sum())}


def token_count(episodes: Sequence[Any], loss_agg: str) -> float:
    """The normalizer of ``loss_agg`` for a set of episodes: generated tokens, or sequences with any."""
    if loss_agg == "token-mean":
        return float(sum(sum(e.loss_mask) for e in episodes))
    return float(sum(1 for e in episodes if any(e.loss_mask)))
