"""Trajectories as HTML for notebooks and run directories: images with their zoom boxes, tokens shaded by logprob.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from deepeyes_envs.messages import Message
from deepeyes_envs.render import image_tag

if TYPE_CHECKING:  # the records import this module to display themselves
    from deepeyes_agent.rollout.trajectory import Trajectory, Turn

_CSS = """<style>
.dt{font-family:sans-serif;font-size:13px;max-width:1000px}
.dt .turn{border-left:3px solid #f0a030;margin:8px 0;padding:2px 8px}
.dt .obs{border-left:3px solid #6b8fd6;margin:8px 0;padding:2px 8px;background:#f4f6fb;color:#556}
.dt .obs.dropped{border-left-color:#c33;text-decoration:line-through}
.dt .tok{font-family:monospace;white-space:pre-wrap;border-radius:2px}
.dt .masked{font-family:monospace;white-space:pre-wrap;color:#778}
.dt .lbl{font-size:11px;color:#666;font-weight:bold}
.dt img{max-width:320px;border:1px solid #bbb;margin:2px}
.dt table{border-collapse:collapse}.dt td,.dt th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
</style>"""


def logprob_colour(logprob: float) -> str:
    """Background colour of a generated token: green when the policy was sure of it, red when it was a
    long shot (probability on a log scale, -6 and below is full red)."""
    certainty = min(1.0, max(0.0, 1.0 + logprob / 6.0))
    red, green = int(255 - 120 * certainty), int(140 + 115 * certainty)
    blue = int(140 + 40 * certainty)
    return f"#{min(255, red + 20):02x}{green:02x}{blue:02x}" if certainty < 1 else "#c8f0c8"


def _messages_html(messages: Sequence[Message]) -> str:
    out = []
    for msg in messages:
        out.append(f"<div class='lbl'>{html.escape(msg['role'])}</div>")
        for part in msg["content"]:
            if part["type"] == "text":
                out.append(f"<span class='masked'>{html.escape(part['text'])}</span>")
            else:
                out.append(image_tag(part["image"]))
    return "".join(out)


def _tokens_html(turn: Turn) -> str:
    texts = turn.token_texts or [str(t) for t in turn.token_ids]
    spans = []
    for text, token_id, lp in zip(texts, turn.token_ids, turn.logprobs, strict=False):
        title = f"id {token_id} · logprob {lp:.3f} · p {math.exp(lp):.3f}"
        spans.append(f"<span class='tok' style='background:{logprob_colour(lp)}' title='{html.escape(title)}'>"
                     f"{html.escape(text)}</span>")
    return "".join(spans)


def _scripted_html(turn: Turn) -> str:
    if turn.scripted_action is None:
        return ""
    return (f"<div class='lbl'>the env played the scripted turn instead:</div>"
            f"<span class='masked'>{html.escape(turn.scripted_action)}</span>")


def _tool_calls_html(calls: Sequence[dict[str, Any]]) -> str:
    rows = []
    for call in calls:
        status = "ok" if call.get("ok") else f"error: {call.get('error')}"
        box = call.get("bbox_original") or call.get("bbox_image")
        extra = f" box {[round(float(v), 1) for v in box]}" if box else ""
        iou = f" IoU {call['iou']:.2f}" if isinstance(call.get("iou"), (int, float)) else ""
        rows.append(f"<div class='lbl'>tool call {html.escape(str(call.get('name')))}: "
                    f"{html.escape(status)}{html.escape(extra)}{iou}</div>")
    return "".join(rows)


def _reward_table(traj: Trajectory) -> str:
    parts = {"reward": traj.reward, **{k: v for k, v in traj.reward_parts.items() if k != "score"}}
    cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in parts.items())
    return f"<table><tr><th colspan=2>reward parts</th></tr>{cells}</table>"


def trajectory_html(traj: Trajectory) -> str:
    """One trajectory as HTML: header, the first image with zoom (and ground-truth) boxes, the prompt
    (collapsed), then each turn's generated tokens shaded by logprob, tool calls, and the observation
    tokens marked as masked (loss mask 0), then the reward parts."""
    rows = [_CSS, "<div class='dt'>"]
    rows.append(f"<div><b>{html.escape(traj.uid)}</b> · env {html.escape(traj.env_id)} · end "
                f"<code>{html.escape(traj.end_reason)}</code>{' · truncated' if traj.truncated else ''} · "
                f"{len(traj.token_ids)} tokens ({traj.n_generated_tokens} generated) · "
                f"{len(traj.images)} images</div>")
    if traj.task is not None:
        rows.append(f"<div>Q: {html.escape(traj.question)}<br>ground truth: <code>{html.escape(traj.ground_truth)}"
                    f"</code> · answer: <code>{html.escape(traj.answer)}</code></div>")
    if traj.task_images:
        rows.append(image_tag(traj.task_images[0], "first image · zoom boxes in turn colours · ground truth in green",
                              traj.zoom_boxes, traj.gt_boxes))
    rows.append(f"<details><summary class='lbl'>prompt (loss mask 0)</summary>{_messages_html(traj.prompt)}</details>")
    for i, turn in enumerate(traj.turns):
        rows.append(f"<div class='turn'><div class='lbl'>turn {i + 1} · generated {len(turn.token_ids)} tokens "
                    f"(loss mask 1) · finish {html.escape(turn.finish_reason)} · {turn.generate_s:.2f} s</div>"
                    f"{_tokens_html(turn)}{_scripted_html(turn)}{_tool_calls_html(turn.tool_calls)}</div>")
        if turn.observation:
            cls = "obs dropped" if turn.observation_dropped else "obs"
            note = "dropped: over the token budget" if turn.observation_dropped else "observation (loss mask 0, masked)"
            rows.append(f"<div class='{cls}'><div class='lbl'>{note}</div>{_messages_html(turn.observation)}</div>")
    rows.append(_reward_table(traj))
    if traj.timings:
        timings = ", ".join(f"{k} {v:.3f}" for k, v in traj.timings.items())
        rows.append(f"<div class='lbl'>timings: {html.escape(timings)}</div>")
    rows.append("</div>")
    return "".join(rows)


def batch_html(trajectories: Sequence[Trajectory], summary: dict[str, float] | None = None) -> str:
    """A summary table (reward, acc, tool calls, turns per trajectory) with each trajectory expandable."""
    header = "".join(f"<th>{h}</th>" for h in ("#", "uid", "reward", "acc", "tool calls", "turns", "gen tokens", "end"))
    rows = [_CSS, "<div class='dt'>"]
    if summary:
        stats = " · ".join(f"{k} {v:.3g}" for k, v in summary.items())
        rows.append(f"<div class='lbl'>{html.escape(stats)}</div>")
    rows.append(f"<table><tr>{header}</tr>")
    for i, traj in enumerate(trajectories):
        cells = (i, traj.uid, f"{traj.reward:.2f}", f"{traj.acc:.0f}", traj.n_tool_calls, traj.n_turns,
                 traj.n_generated_tokens, traj.end_reason)
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    rows.append("</table>")
    for i, traj in enumerate(trajectories):
        rows.append(f"<details><summary>#{i} {html.escape(traj.uid)} · reward {traj.reward:.2f}</summary>"
                    f"{trajectory_html(traj)}</details>")
    rows.append("</div>")
    return "".join(rows)

