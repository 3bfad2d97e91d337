"""Tool-use health: the three guards the strongest DeepEyes successors train with, as small pure pieces.

- **Dynamic sampling** (DAPO, Mini-o3): a GRPO group whose rollouts all scored the same has zero advantage
  everywhere, so it costs a forward and backward and teaches nothing; :func:`informative_groups` drops such
  groups and the algorithm samples more prompts to refill the batch.
- **Over-turn masking** (Mini-o3): an episode cut off at ``max_turns`` did not fail, it ran out of turns;
  scoring it 0 punishes long searches. :func:`without_over_turn` leaves such episodes out of the loss and of
  their group's baseline instead.
- **Tool-call collapse alarm** (the most reported failure of tool RL): :class:`CollapseAlarm` warns when the
  tool-call rate stays below a share of its running maximum for several iterations in a row.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol


class Scored(Protocol):
    """What these guards read of a packed episode."""

    reward: float
    group_id: Hashable
    metrics: dict[str, float]


def informative_groups(episodes: Sequence[Scored]) -> tuple[list[Scored], int]:
    """The episodes of groups whose rewards are not all equal, in order, and how many groups were dropped.

    A group of one has no baseline either (GRPO gives it advantage 0), so it is dropped too.
    """
    rewards: dict[Hashable, set[float]] = {}
    sizes: dict[Hashable, int] = {}
    for episode in episodes:
        rewards.setdefault(episode.group_id, set()).add(float(episode.reward))
        sizes[episode.group_id] = sizes.get(episode.group_id, 0) + 1
    keep = {g for g, values in rewards.items() if len(values) > 1 and sizes[g] > 1}
    return [e for e in episodes if e.group_id in keep], len(rewards) - len(keep)


def without_over_turn(episodes: Sequence[Scored]) -> tuple[list[Scored], int]:
    """The episodes that did not end by running out of turns (``metrics["over_turn"]``), and how many did."""
    kept = [e for e in episodes if not e.metrics.get("over_turn")]
    return kept, len(episodes) - len(kept)


def trainable_episodes(episodes: Sequence[Scored], *, mask_over_turn: bool, dynamic_sampling: bool
                       ) -> tuple[list[Scored], dict[str, float]]:
    """The episodes a batch learns from, and what was left out under its ``health/`` metric name: the one filter of
    the synchronous and the asynchronous sampler. Over-turn episodes go first, so a group is judged informative
    on the episodes that are kept."""
    counts: dict[str, float] = {}
    kept = list(episodes)
    if mask_over_turn:
        kept, masked = without_over_turn(kept)
        counts["health/over_turn_masked"] = float(masked)
    if dynamic_sampling:
        kept, dropped = informative_groups(kept)
        counts["health/dropped_groups"] = float(dropped)
    return kept, counts


class CollapseAlarm:
    """Fires when the tool-call rate stays below ``share`` of its running maximum for ``patience`` iterations.

    A rate that was never above zero cannot collapse, so the alarm waits for the first tool call.
    """

    def __init__(self, share: float, patience: int) -> None:
        if not 0.0 < share < 1.0 or patience < 1:
            raise ValueError(f"need 0 < share < 1 and patience >= 1, got {share} and {patience}")
        self.share, self.patience = share, patience
        self.best = 0.0
        self.low_streak = 0

    def update(self, rate: float) -> bool:
        """Record one iteration's tool-call rate; True when the alarm fires (then on every further low one)."""
        self.best = max(self.best, rate)
        self.low_streak = self.low_streak + 1 if self.best > 0 and rate < self.share * self.best else 0
        return self.low_streak >= self.patience

    def record(self, rate: float) -> dict[str, float]:
        """:meth:`update`, as the iteration's ``health/`` metrics: whether the alarm fired, and the best rate and the
        low streak its warning quotes."""
        fired = self.update(rate)
        return {"health/tool_collapse": float(fired), "health/tool_call_rate_best": self.best,
                "health/tool_call_low_streak": float(self.low_streak)}

    def get_state(self) -> dict[str, float]:
        return {"best": self.best, "low_streak": self.low_streak}

    def set_state(self, state: dict[str, float]) -> None:
        self.best, self.low_streak = float(state["best"]), int(state["low_streak"])
