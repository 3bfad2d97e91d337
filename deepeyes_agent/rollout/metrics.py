"""Per-episode metrics: one definition, read the same way by the training log and the evaluation report.

- ``tool_calls``: tool calls the env parsed and ran (successful or not);
- ``invalid_calls``: calls the env rejected (a bad box, an unknown tool, bad arguments) plus turns whose
  tool-call text could not be parsed at all (bad JSON): DeepEyes' ``ZOOM IN ARGUMENTS ARE INVALID`` family;
- ``image_observations``: images the tools returned that made it into the model's context;
- ``iou``: mean grounding IoU of the episode's zoom boxes against the ground-truth boxes (None without one);
- ``over_turn``: 1 when the episode ran out of turns (``max_turns``) rather than ending itself.

Over a batch (:func:`batch_metrics`) every metric is a mean over episodes, plus ``tool_call_rate`` (the share
of episodes with at least one tool call), ``invalid_call_rate`` (invalid calls / calls), and the accuracy of the
episodes that got a tool's image (``acc_with_tool``) beside that of the others (``acc_without_tool``): the control
that says whether using the tool is what makes the answers right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from deepeyes_agent.rollout.trajectory import Trajectory


def episode_metrics(traj: Trajectory) -> dict[str, float | None]:
    """The numbers of one played episode (see the module docstring)."""
    parts = traj.reward_parts
    calls = [c for turn in traj.turns for c in turn.tool_calls]
    unparsed = sum(1 for turn in traj.turns if turn.error and not turn.tool_calls)
    ious = [float(c["iou"]) for c in calls if isinstance(c.get("iou"), (int, float))]
    return {
        "reward": float(traj.reward), "acc": float(parts.get("acc", 0.0)),
        "format_error": float(bool(parts.get("format_error", False))), "tool_bonus": float(parts.get("tool", 0.0)),
        "tool_calls": float(len(calls)), "invalid_calls": float(sum(1 for c in calls if not c.get("ok")) + unparsed),
        "image_observations": float(traj.n_image_observations),
        "iou": sum(ious) / len(ious) if ious else None,
        "response_length": float(traj.n_generated_tokens), "turns": float(traj.n_turns),
        "truncated": float(traj.truncated), "tokens": float(len(traj.token_ids)),
        "over_turn": float(traj.end_reason == "max_turns"),
    }


def batch_metrics(episodes: Sequence[Mapping[str, float | None]], prefix: str = "") -> dict[str, float]:
    """Means of per-episode metrics over a batch (None, e.g. IoU without a zoom, left out), plus the rates."""
    if not episodes:
        return {}
    out = {f"{prefix}{key}": _mean([e[key] for e in episodes]) for key in episodes[0]}
    out[f"{prefix}tool_call_rate"] = _mean([float(e.get("tool_calls", 0.0) > 0) for e in episodes])
    calls = sum(e.get("tool_calls", 0.0) for e in episodes)
    out[f"{prefix}invalid_call_rate"] = sum(e.get("invalid_calls", 0.0) for e in episodes) / calls if calls else 0.0
    out[f"{prefix}acc_with_tool"] = _mean([e["acc"] for e in episodes if e.get("image_observations", 0.0) > 0])
    out[f"{prefix}acc_without_tool"] = _mean([e["acc"] for e in episodes if not e.get("image_observations", 0.0)])
    return out


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
