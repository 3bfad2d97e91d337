"""The one definition of a token's log-probability: engines record it while sampling, learners recompute it.

Rollout and training agree only if both score a token in the same distribution: the logits divided by the
sampling temperature, with the vision tokens (which a policy must never generate) removed. Every engine
records :func:`sampling_logprobs` of the sampled token, and every training forward goes through
:func:`token_stats`, so the two can be compared token for token (``logprob_gap_*`` in training).

A training forward scores only the tokens that need a logprob (the generated ones): their hidden states are
gathered before the LM head, which then runs a chunk of positions at a time (:func:`score_tokens`). With the
7B's vocabulary of 151,936 a float32 [T, V] logits tensor at DeepEyes' 28,672-token budget is 17.4 GB; the
chunked head holds a few [chunk, V] blocks instead (``benchmarks/loss_memory.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
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


# Positions scored together: one float32 [chunk, V] block of logits takes at most this many bytes (the 7B's
# V = 151,936 gives chunks of 441 positions, 256 MiB per block).
CHUNK_BYTES = 256 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk for a vocabulary of ``vocab_size`` (see :data:`CHUNK_BYTES`)."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class _ChunkedHeadStats(torch.autograd.Function):
    """logprob of the target and entropy of the sampling distribution at N positions, from their hidden states.

    The [N, V] logits never exist: the forward runs the LM head ``chunk_size`` positions at a time and keeps only
    the per-position log-normaliser and entropy, and the backward runs each chunk's LM head again to form the
    gradient of its logits in place. Memory is O(chunk_size * V) whatever N (plain chunking under autograd would
    keep every chunk's logits until the backward).
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                suppress_token_ids: tuple[int, ...], chunk_size: int) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        entropy = torch.empty_like(logprobs)
        log_norm = torch.empty_like(logprobs)
        for start in range(0, n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = sampling_logits(F.linear(hidden[rows], weight, bias), temperature, suppress_token_ids)
            log_norm[rows] = torch.logsumexp(z, dim=-1)
            logprobs[rows] = z.gather(-1, targets[rows, None]).squeeze(-1) - log_norm[rows]
            entropy[rows] = entropy_from_logits(z, chunk_size=None)
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm, entropy)
        ctx.settings = (temperature, suppress_token_ids, chunk_size)
        return logprobs, entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: Tensor, grad_entropy: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, log_norm, entropy = ctx.saved_tensors
        temperature, suppress_token_ids, chunk_size = ctx.settings
        scale = 1.0 / (temperature if temperature > 0 else 1.0)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            log_p = sampling_logits(F.linear(h, weight, bias), temperature, suppress_token_ids)
            log_p.sub_(log_norm[rows, None])  # log-softmax, in place
            p = log_p.exp()
            # d logprob / dz = onehot(target) - p  and  d entropy / dz = -p * (log p + entropy), z = logits / T
            g_lp, g_ent = grad_logprobs[rows, None], grad_entropy[rows, None]
            grad_z = p.mul_(log_p.add_(entropy[rows, None]).mul_(g_ent).add_(g_lp)).neg_()
            grad_z.scatter_add_(-1, targets[rows, None], g_lp)
            if suppress_token_ids:
                grad_z[:, list(suppress_token_ids)] = 0.0  # constants in the forward
            grad_logits = grad_z.mul_(scale).to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight.addmm_(grad_logits.T, h)
            if need_bias:
                grad_bias.add_(grad_logits.sum(0))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


SCORE_METHOD = "score_tokens"  # a sharded LM head's own entry point (see :func:`shard_aware_scoring`)


def score_tokens(lm_head: nn.Linear, hidden: Tensor, targets: Tensor, temperature: float = 1.0,
                 suppress_token_ids: Sequence[int] = (), chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The LM head on hidden states ``[N, H]``: the logprob of each ``targets [N]`` token and the entropy of the
    distribution, both ``[N]`` float32, in the sampling distribution (:func:`sampling_logprobs`), memory-lean.

    Same values and gradients as ``log_softmax(sampling_logits(lm_head(hidden)))`` gathered at the targets (and
    :func:`entropy_from_logits` of it), but the logits are computed ``chunk_size`` positions at a time, in the
    backward again (default: :func:`default_chunk_size`).
    """
    chunk = chunk_size or default_chunk_size(lm_head.out_features)
    return _ChunkedHeadStats.apply(hidden, lm_head.weight, lm_head.bias, targets, float(temperature),
                                   tuple(int(t) for t in suppress_token_ids), chunk)


def shard_aware_scoring(lm_head: nn.Module) -> None:
    """Make an FSDP2-sharded LM head gather its weight around :func:`score_tokens` as it does around its forward.

    :func:`score_tokens` reads the head's weight directly, never calling the module, so FSDP2's hooks (all-gather
    before, reshard after, gather again for the backward and reduce-scatter the gradient) would not run. This
    gives the head a ``score_tokens`` method registered as an FSDP2 forward method; :func:`token_stats` calls it
    when present. Call it once, after ``fully_shard(lm_head)``.
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(lm_head, SCORE_METHOD, functools.partial(score_tokens, lm_head))
    register_fsdp_forward_method(lm_head, SCORE_METHOD)


def token_stats(hidden: Tensor, lm_head: nn.Module, input_ids: Tensor, scored: Tensor | None = None,
                temperature: float = 1.0, suppress_token_ids: Sequence[int] = (),
                chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Per-token logprobs of ``input_ids`` and entropies, both [B, T] float32, from the last hidden state [B, T, H].

    Entry ``[b, i]`` scores token ``i`` given the tokens before it (read from ``hidden[b, i - 1]``), and only
    where ``scored[b, i]`` is set (default: every token); other entries, and ``[b, 0]`` (nothing predicts the
    first token), are 0 and get no gradient. The hidden states of the scored tokens are gathered before the
    LM head (a DeepEyes episode is mostly prompt and image tokens with nothing to score), and the head runs
    through :func:`score_tokens`: memory O(chunk * V) instead of several float32 [B, T, V] tensors.
    """
    batch, length = input_ids.shape
    wanted = torch.ones_like(input_ids, dtype=torch.bool) if scored is None else scored.bool()
    rows, cols = wanted[:, 1:].nonzero(as_tuple=True)
    scorer = getattr(lm_head, SCORE_METHOD, None) or functools.partial(score_tokens, lm_head)
    logprobs, entropy = scorer(hidden[rows, cols], input_ids[rows, cols + 1], temperature, suppress_token_ids,
                               chunk_size)
    zeros = hidden.new_zeros((batch, length), dtype=torch.float32)
    where = (rows, cols + 1)
    return zeros.index_put(where, logprobs), zeros.index_put(where, entropy)


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a collated batch that the model's forward takes (the rest is training data)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}


def last_hidden_state(model: PreTrainedModel, batch: dict[str, Tensor]) -> Tensor:
    """The backbone alone (vision tower + language model, no LM head): the last, normed hidden state [B, T, H]."""
    return model.model(**model_inputs(batch), use_cache=False).last_hidden_state


def token_logprobs(model: PreTrainedModel, inputs: dict[str, Tensor], temperature: float = 1.0,
                   suppress_token_ids: Sequence[int] = ()) -> Tensor:
    """Per-token log-probabilities of ``inputs["input_ids"]`` under ``model`` (the training forward), [B, T].

    ``inputs`` is what ``EpisodeContext.to_model_inputs`` or ``collate`` returns (extra keys are ignored);
    pass ``suppress_token_ids=VisionTokenizer.vision_token_ids`` to match the engines. Every token is scored
    (padding included), through the same chunked LM head as the learner's loss.
    """
    hidden = last_hidden_state(model, inputs)
    return token_stats(hidden, model.lm_head, inputs["input_ids"], None, temperature, suppress_token_ids)[0]
