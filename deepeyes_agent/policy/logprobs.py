"""The one definition of a token's log-probability: engines record it while sampling, learners recompute it.

Rollout and training agree only if both score a token in the same distribution: the logits divided by the
sampling temperature, with the vision tokens (which a policy must never generate) removed. Every engine
records :func:`sampling_logprobs` of the sampled token, and every training forward goes through
:func:`shifted_token_stats`, so the two can be compared token for token (``logprob_gap_*`` in training).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedModel

from deepeyes_agent.policy.chat import MODEL_INPUT_KEYS

# A finite "minus infinity": removes suppressed tokens from the softmax without 0 * inf = NaN in the entropy.
SUPPRESSED_LOGIT = -1e9


def sampling_logits(logits: Tensor, temperature: float = 1.0, suppress_token_ids: Sequence[int] = ()) -> Tensor:
    """``logits / temperature`` in float32 with the suppressed tokens pushed out of the distribution.

    A temperature of 0 (greedy) scores with temperature 1. Always returns a new tensor.
    """
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    if suppress_token_ids:
        scaled[..., list(suppress_token_ids)] = SUPPRESSED_LOGIT
    return scaled


def sampling_logprobs(logits: Tensor, temperature: float = 1.0, suppress_token_ids: Sequence[int] = ()) -> Tensor:
    """Log-probabilities of the distribution a policy samples from (see the module docstring)."""
    return torch.log_softmax(sampling_logits(logits, temperature, suppress_token_ids), dim=-1)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = 1024) -> Tensor:
    """Entropy of the softmax distribution at every position: ``logits [..., V]`` -> ``[...]`` (float32).

    Uses H = logsumexp(z) - sum_v softmax(z)_v z_v, ``chunk_size`` positions at a time, so the float32
    softmax temporaries are ``[chunk_size, V]`` instead of ``[T, V]``.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    step = chunk_size if chunk_size and chunk_size > 0 else max(flat.shape[0], 1)
    out = []
    for start in range(0, flat.shape[0], step):
        chunk = flat[start:start + step].float()
        out.append(torch.logsumexp(chunk, dim=-1) - (torch.softmax(chunk, dim=-1) * chunk).sum(dim=-1))
    if not out:
        return flat.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(out).reshape(logits.shape[:-1])


def shifted_token_stats(logits: Tensor, input_ids: Tensor, temperature: float, suppress_token_ids: Sequence[int],
                        with_entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probabilities of ``input_ids`` (and entropies) from a forward's logits, both [B, T].

    Entry ``[b, i]`` scores token ``i`` given the tokens before it; entry ``[b, 0]`` is 0 (nothing
    predicts the first token).
    """
    scaled = sampling_logits(logits[:, :-1], temperature, suppress_token_ids)
    picked = torch.log_softmax(scaled, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    zero = torch.zeros_like(picked[:, :1])
    logprobs = torch.cat([zero, picked], dim=1)
    entropy = torch.cat([zero, entropy_from_logits(scaled)], dim=1) if with_entropy else None
    return logprobs, entropy


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a collated batch that the model's forward takes (the rest is training data)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}


def token_logprobs(model: PreTrainedModel, inputs: dict[str, Tensor], temperature: float = 1.0,
                   suppress_token_ids: Sequence[int] = ()) -> Tensor:
    """Per-token log-probabilities of ``inputs["input_ids"]`` under ``model`` (the training forward), [B, T].

    ``inputs`` is what ``EpisodeContext.to_model_inputs`` or ``collate`` returns (extra keys are ignored);
    pass ``suppress_token_ids=VisionTokenizer.vision_token_ids`` to match the engines.
    """
    logits = model(**model_inputs(inputs), use_cache=False).logits
    return shifted_token_stats(logits, inputs["input_ids"], temperature, suppress_token_ids, with_entropy=False)[0]
