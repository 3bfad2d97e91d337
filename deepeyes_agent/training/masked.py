"""Masked reductions over padded ``[B, T]`` batches: the one convention every loss and estimator shares.

The ``loss_mask`` is 1 on tokens the policy generated and 0 on everything else (prompt, tool responses,
image tokens, padding). A DeepEyes trajectory interleaves assistant turns with observations; the
observations stay in the context the model attends to, but they were not sampled from the policy, so no
loss, KL, entropy or advantage may ever touch them. Every function here treats values at masked-out
positions as garbage: changing them (even to NaN or inf) changes no output and no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool(loss_mask: Tensor) -> Tensor:
    return loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0


def zero_masked(x: Tensor, loss_mask: Tensor) -> Tensor:
    """``x`` with masked-out positions replaced by 0.

    ``torch.where`` (not ``x * mask``) so that NaN/inf at masked positions cannot leak into outputs, and so
    that the gradient reaching masked-out positions is exactly 0.
    """
    return torch.where(as_bool(loss_mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, loss_mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``loss_mask`` is 1 (over everything, or along ``dim``)."""
    x = zero_masked(x, loss_mask)
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, loss_mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``loss_mask`` is 1; 0 (not NaN) where there are none."""
    count = as_bool(loss_mask).to(x.dtype if x.is_floating_point() else torch.float32)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, loss_mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, loss_mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all masked-in positions (Bessel-corrected by default); 0 with < 2 tokens."""
    mean = masked_mean(x, loss_mask)
    count = as_bool(loss_mask).sum()
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
    return zero_masked(whitened, loss_mask)

