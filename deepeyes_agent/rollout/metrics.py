"""Per-episode metrics: one definition, read the same way by the training log and the evaluation report.

- ``tool_calls``: tool calls the env parsed and ran (successful or not);
- ``invalid_calls``: calls the env rejected (a bad box, an unknown tool, bad arguments) plus turns whose
  tool-call text could not be parsed at all (bad JSON): DeepEyes' ``ZOOM IN ARGUMENTS ARE INVALID`` family;
- ``image_observations``: images the tools returned that made it into the model's context;
- ``iou``: mean grounding IoU of the episode's zoom boxes against the ground-truth boxes (None without one);
- ``box_centre_hit``: the share of the episode's zoom boxes whose centre lies inside a ground-truth box (None
  without a zoom or a ground truth): did it look where the target is;
- ``first_box``: the episode's first zoom box as the model wrote it (a tuple, None without one), only for
  ``top_box_share`` below;
- ``over_turn``: 1 when the episode ran out of turns (``max_turns``) rather than ending itself;
- ``needs_zoom``: the task's ``extra["needs_zoom"]`` (1 or 0; None where a task does not say), which the toy zoom
  mix of readable and unreadable tasks sets (``ToyConfig.readable_share``).

Over a batch (:func:`batch_metrics`) every metric is a mean over episodes, plus ``tool_call_rate`` (the share
of episodes with at least one tool call), ``invalid_call_rate`` (invalid calls / calls), and the accuracy of the
episodes that got a tool's image (``acc_with_tool``) beside that of the others (``acc_without_tool``): the control
that says whether using the tool is what makes the answers right, and ``top_box_share``, the share of the zooming
episodes whose first box is the batch's most common one: a policy that writes one box for every image has 1.0.
Where tasks say whether they need a zoom, ``tool_call_rate`` and ``acc`` are also given apart for the tasks that
need one (``_needed``) and those that do not (``_needless``): does it zoom only when it must.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from deepeyes_envs.rewards import box_centre_inside

if TYPE_CHECKING:  # the trajectory's batch summary is built from these metrics
    from deepeyes_agent.rollout.trajectory import Trajectory


def episode_metrics(traj: Trajectory) -> dict[str, float | None]:
    """The numbers of one played episode (see the module docstring)."""
    parts = traj.reward_parts
    calls = [c for turn in traj.turns for c in turn.tool_calls]
    unparsed = sum(1 for turn in traj.turns if turn.error and not turn.tool_calls)
    ious = [float(c["iou"]) for c in calls if isinstance(c.get("iou"), (int, float))]
    gt = traj.task.gt_boxes if traj.task is not None else ()
    hits = [box_centre_inside(c["bbox_original"], gt) for c in calls if "bbox_original" in c] if gt else []
    written = [c["arguments"]["bbox_2d"] for c in calls if _written_box(c)]
    return {
        "reward": float(traj.reward), "acc": float(parts.get("acc", 0.0)),
        "format_error": float(bool(parts.get("format_error", False))), "tool_bonus": float(parts.get("tool", 0.0)),
        "tool_calls": float(len(calls)), "invalid_calls": float(sum(1 for c in calls if not c.get("ok")) + unparsed),
        "image_observations": float(traj.n_image_observations),
        "iou": sum(ious) / len(ious) if ious else None,
        "box_centre_hit": sum(hits) / len(hits) if hits else None,
        "first_box": tuple(written[0]) if written else None,
        "response_length": float(traj.n_generated_tokens), "turns": float(traj.n_turns),
        "truncated": float(traj.truncated), "tokens": float(len(traj.token_ids)),
        "over_turn": float(traj.end_reason == "max_turns"),
        "needs_zoom": _needs_zoom(traj),
    }


def _needs_zoom(traj: Trajectory) -> float | None:
    needs = traj.task.extra.get("needs_zoom") if traj.task is not None else None
    return None if needs is None else float(bool(needs))


def batch_metrics(episodes: Sequence[Mapping[str, float | None]], prefix: str = "") -> dict[str, float]:
    """Means of per-episode metrics over a batch (None, e.g. IoU without a zoom, left out), plus the rates."""
    if not episodes:
        return {}
    out = {f"{prefix}{key}": _mean([e[key] for e in episodes]) for key in episodes[0] if key != "first_box"}
    counts = _first_box_counts(episodes)
    out[f"{prefix}top_box_share"] = counts.most_common(1)[0][1] / counts.total() if counts else float("nan")
    out[f"{prefix}tool_call_rate"] = _mean([float(e.get("tool_calls", 0.0) > 0) for e in episodes])
    calls = sum(e.get("tool_calls", 0.0) for e in episodes)
    out[f"{prefix}invalid_call_rate"] = sum(e.get("invalid_calls", 0.0) for e in episodes) / calls if calls else 0.0
    out[f"{prefix}acc_with_tool"] = _mean([e["acc"] for e in episodes if e.get("image_observations", 0.0) > 0])
    out[f"{prefix}acc_without_tool"] = _mean([e["acc"] for e in episodes if not e.get("image_observations", 0.0)])
    for suffix, needs in (("needed", 1.0), ("needless", 0.0)):
        kind = [e for e in episodes if e.get("needs_zoom") == needs]
        if kind:
            out[f"{prefix}tool_call_rate_{suffix}"] = _mean([float(e.get("tool_calls", 0.0) > 0) for e in kind])
            out[f"{prefix}acc_{suffix}"] = _mean([e["acc"] for e in kind])
    return out


def most_common_box(episodes: Sequence[Mapping[str, float | None]]) -> tuple | None:
    """The first zoom box written most often in a batch (the fixed-box control zooms there on every image)."""
    counts = _first_box_counts(episodes)
    return counts.most_common(1)[0][0] if counts else None


def _first_box_counts(episodes: Sequence[Mapping[str, float | None]]) -> Counter:
    return Counter(e["first_box"] for e in episodes if e.get("first_box") is not None)


def _written_box(call: Mapping) -> bool:
    arguments = call.get("arguments")
    box = arguments.get("bbox_2d") if isinstance(arguments, Mapping) else None
    return isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)


def _mean(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else float("nan")
