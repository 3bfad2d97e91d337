"""What one training iteration reports: a pure function of what it played, what it learned from and how long
each part took, so that ``DeepEyesAlgorithm.training_step`` reads as its steps and the record can be tested alone.

Per-token learner statistics arrive as sums (``update_stats``: ``entropy_sum``, ``tokens``, ...) and leave as means;
PPO's critic numbers are added only when the critic was trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deepeyes_agent.rollout.metrics import batch_metrics
from deepeyes_agent.training.batch import PackedEpisode, padded, padded_loss_mask
from deepeyes_agent.training.masked import masked_var

PER_TOKEN = (("pg_loss", "pg_loss"), ("entropy", "entropy_sum"), ("clip_fraction", "clip_fraction_sum"),
             ("approx_kl", "approx_kl_sum"))
CRITIC_PER_TOKEN = (("value_loss", "value_loss"), ("vf_clip_fraction", "vf_clip_fraction_sum"),
                    ("value_mean", "value_sum"))


def explained_variance(episodes: Sequence[PackedEpisode]) -> float:
    """PPO: 1 - Var(returns - values) / Var(returns) over generated tokens (1: perfect critic, <= 0: useless)."""
    mask = padded_loss_mask(episodes)
    returns = padded(episodes, "returns")
    var_returns = float(masked_var(returns, mask))
    if var_returns == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(returns - padded(episodes, "values"), mask)) / var_returns


def iteration_metrics(*, played: Sequence[Any], learned: Sequence[PackedEpisode], results: Sequence[Any],
                      batch_stats: Mapping[str, float], update_stats: Mapping[str, float],
                      timings: Mapping[str, float], staleness: Sequence[int], lr: float, epochs: int,
                      env_runner_restarts: int, critic: bool) -> dict[str, Any]:
    """The iteration's record. ``played``: every episode the env runners returned (what the policy did, before any
    was left out); ``learned``: those the update used; ``results``: the runners' batches (timings, judge counts)."""
    tokens = max(1.0, update_stats.get("tokens", 0.0))
    stale_tokens = max(1.0, update_stats.get("stale_tokens", 0.0))
    timings = {**timings,
               "judge_s": max((r.timings.get("judge_s", 0.0) for r in results), default=0.0),
               "generate_s": max((r.timings.get("generate_s", 0.0) for r in results), default=0.0)}
    metrics: dict[str, Any] = {
        **batch_metrics([e.metrics for e in played]),
        **batch_stats,
        "episodes": float(len(learned)),
        **{name: update_stats.get(key, 0.0) / tokens for name, key in PER_TOKEN},
        "logprob_gap_mean": update_stats.get("logprob_gap_sum", 0.0) / max(1.0, update_stats.get("logprob_gap_tokens",
                                                                                                   0.0)),
        "logprob_gap_max": update_stats.get("logprob_gap_max", 0.0),
        "kl": update_stats.get("kl_sum", 0.0) / tokens,
        "grad_norm": update_stats.get("grad_norm", 0.0),
        "lr": lr,
        "learner_tokens_per_s": float(sum(len(e) for e in learned)) * epochs / max(timings.get("update_s", 0.0), 1e-9),
        "rollout_tokens_per_s": sum(r.timings.get("generated_tokens", 0.0) for r in results)
        / max(timings["rollout_s"], 1e-9),
        "env_runners": float(len(results)),
        "env_runner_restarts": float(env_runner_restarts),
        "async/staleness_mean": float(np.mean(staleness)) if len(staleness) else 0.0,
        "async/staleness_max": float(max(staleness, default=0)),
        "async/is_weight_mean": update_stats.get("is_weight_sum", 0.0) / stale_tokens,
        "async/is_truncated_fraction": update_stats.get("is_truncated", 0.0) / stale_tokens,
        **{f"time/{k}": v for k, v in timings.items()},
    }
    if critic and learned:
        metrics.update({name: update_stats.get(key, 0.0) / tokens for name, key in CRITIC_PER_TOKEN})
        metrics["explained_variance"] = explained_variance(learned)
    for r in results:
        for k, v in r.judge_stats.items():
            if isinstance(v, (int, float)):
                metrics[f"judge/{k}"] = metrics.get(f"judge/{k}", 0.0) + float(v)
    # Tuples, not lists: the record travels through RLlib's metrics logger, whose result unwraps one-element lists.
    metrics["env_runner_nodes"] = tuple(sorted({r.node_id for r in results}))
    metrics["env_runner_pids"] = tuple(sorted({r.pid for r in results}))
    return metrics
