"""Finished episodes in the compact form that travels from env runners to learners, and their batching.

An ``EpisodeContext`` holds everything about an episode, including the tokenizer and the original images,
which a learner does not need and which would be pickled along with every batch. A :class:`PackedEpisode`
keeps only what the training forward reads (token ids, loss mask, sampling logprobs, mRoPE positions,
pixel patches and grids) plus the outcome (reward, group, advantages). ``chat.collate`` batches it
unchanged: it reads exactly these attributes, so the one batch builder of the project is reused.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepeyes_agent.policy.chat import collate
from deepeyes_agent.training.advantages import compute_advantages
from deepeyes_agent.training.masked import masked_whiten


@dataclass
class _Vision:
    """The one tokenizer fact ``chat.collate`` needs: which id pads a row."""

    pad_token_id: int


@dataclass
class PackedEpisode:
    """One trajectory, ready for a training forward. Quacks like ``EpisodeContext`` for ``chat.collate``."""

    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    mm_token_type_ids: list[int]
    position_ids: torch.Tensor  # (3, L)
    next_position: int
    pixel_values: torch.Tensor | None
    image_grid_thw: list[tuple[int, int, int]]
    vision: _Vision
    reward: float = 0.0
    group_id: Hashable = 0
    task_id: str = ""
    advantages: list[float] | None = None  # per token, filled by the driver
    values: list[float] | None = None  # PPO: the critic's per-token values before the update
    returns: list[float] | None = None  # PPO: per-token targets of the value loss
    policy_version: int = 0  # the policy version (learner updates so far) the env runner sampled with
    is_weights: list[float] | None = None  # per token: truncated importance weights of a stale episode
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return int(sum(self.loss_mask))

    @classmethod
    def from_context(cls, ctx: Any, *, reward: float = 0.0, group_id: Hashable = 0, task_id: str = "",
                     metrics: dict[str, float] | None = None) -> PackedEpisode:
        """Copy what training needs out of an ``EpisodeContext`` (pixels are shared, not copied)."""
        return cls(
            token_ids=list(ctx.token_ids), loss_mask=list(ctx.loss_mask), logprobs=list(ctx.logprobs),
            mm_token_type_ids=list(ctx.mm_token_type_ids), position_ids=ctx.position_ids.clone(),
            next_position=int(ctx.next_position), pixel_values=ctx.pixel_values,
            image_grid_thw=[tuple(int(x) for x in g) for g in ctx.image_grid_thw],
            vision=_Vision(int(ctx.vision.pad_token_id)), reward=float(reward), group_id=group_id,
            task_id=task_id, metrics=dict(metrics or {}),
        )


def padded_loss_mask(episodes: Sequence[PackedEpisode]) -> torch.Tensor:
    """[B, T] loss mask of a list of episodes, right-padded with 0."""
    length = max(len(e) for e in episodes)
    mask = torch.zeros(len(episodes), length, dtype=torch.long)
    for b, ep in enumerate(episodes):
        mask[b, :len(ep)] = torch.tensor(ep.loss_mask, dtype=torch.long)
    return mask


def padded(episodes: Sequence[PackedEpisode], attribute: str, fill: float = 0.0) -> torch.Tensor:
    """[B, T] float32 of a per-token attribute (``advantages``, ``values``, ``returns``, ``is_weights``),
    ``fill`` on padding and for episodes without it."""
    out = torch.full((len(episodes), max(len(e) for e in episodes)), fill, dtype=torch.float32)
    for b, ep in enumerate(episodes):
        if getattr(ep, attribute) is not None:
            out[b, :len(ep)] = torch.tensor(getattr(ep, attribute), dtype=torch.float32)
    return out


def assign_advantages(episodes: Sequence[PackedEpisode], estimator: str, *, norm_by_std: bool = True,
                      gamma: float = 1.0, lam: float = 1.0) -> None:
    """Compute advantages over the whole batch (groups need all their members) and store them per token.

    Runs on the driver, before the batch is split across learners: GRPO's group baseline and
    REINFORCE++'s batch whitening both need the full batch. ``gae`` (PPO) reads each episode's ``values``
    (the critic before the update) and puts the outcome reward on the last generated token; its returns
    are stored as the value targets, its advantages whitened over the batch's generated tokens (the critic
    starts at 0, so without it the first iterations would have no baseline at all).
    """
    mask = padded_loss_mask(episodes)
    scores = torch.tensor([e.reward for e in episodes], dtype=torch.float32)
    values = padded(episodes, "values") if estimator == "gae" else None
    advantages, returns = compute_advantages(estimator, loss_mask=mask, scores=scores,
                                             group_ids=[e.group_id for e in episodes], values=values,
                                             norm_by_std=norm_by_std, gamma=gamma, lam=lam)
    if estimator == "gae":
        advantages = masked_whiten(advantages, mask)
    for b, ep in enumerate(episodes):
        ep.advantages = advantages[b, :len(ep)].tolist()
        if estimator == "gae":
            ep.returns = returns[b, :len(ep)].tolist()


def collate_episodes(episodes: Sequence[PackedEpisode], device: str | torch.device | None = None) -> dict:
    """``chat.collate`` of the episodes plus their per-token ``advantages`` [B, T] (0 on padding), with stale
    episodes ``is_weights`` (1 for fresh ones), and with a critic the ``old_values`` and ``returns`` of PPO's
    value loss."""
    batch = collate(episodes, device=device)
    device = batch["input_ids"].device
    batch["advantages"] = padded(episodes, "advantages").to(device)
    if any(ep.is_weights is not None for ep in episodes):  # asynchronous training: some episodes are stale
        batch["is_weights"] = padded(episodes, "is_weights", fill=1.0).to(device)
    if all(ep.returns is not None for ep in episodes):
        batch["old_values"] = padded(episodes, "values").to(device)
        batch["returns"] = padded(episodes, "returns").to(device)
    return batch


def split_even(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` cut into ``parts`` contiguous pieces whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + base + (1 if k < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def micro_batches(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive chunks of at most ``size`` items."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]
