"""The end-of-run report: report.md with the headline numbers, the controls and PNG plots of the main curves.

For a tool run the headline is whether using the tool is what made the answers right, so the report puts the
controls beside the curves: the accuracy of episodes that got a tool's image against those that did not, the
zoom boxes' IoU with the ground truth over iterations, the same run with the tools disabled (when
``logging.no_tool_control`` trained it), and one learned held-out episode as an HTML transcript with its box drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from deepeyes_agent.run_records import metric_cell, read_metrics

Line = tuple[str, str, str]  # (which run: "run" or "control", record kind, metric)
PLOTS: tuple[tuple[str, str, list[Line]], ...] = (
    ("accuracy.png", "Held-out accuracy (greedy)", [("run", "eval", "acc"), ("control", "eval", "acc")]),
    ("tool_calls.png", "Tool-call rate", [("run", "train", "tool_call_rate"), ("run", "eval", "tool_call_rate")]),
    ("accuracy_by_tool.png", "Held-out accuracy by tool use", [("run", "eval", "acc_with_tool"),
                                                                 ("run", "eval", "acc_without_tool")]),
    ("iou.png", "Zoom-box IoU with the ground truth", [("run", "train", "iou"), ("run", "eval", "iou")]),
    ("grounding.png", "Zoom boxes centred inside the target", [("run", "train", "box_centre_hit"),
                                                                 ("run", "eval", "box_centre_hit")]),
    ("reward.png", "Reward", [("run", "train", "reward"), ("run", "eval", "reward"), ("control", "train", "reward")]),
    ("response_length.png", "Response length (tokens)", [("run", "train", "response_length")]),
    ("entropy.png", "Entropy", [("run", "train", "entropy")]),
    ("timing.png", "Seconds per iteration", [("run", "train", "time/rollout_s"), ("run", "train", "time/update_s"),
                                             ("run", "train", "time/weight_sync_s")]),
)
HEADLINE = (("acc", "accuracy"), ("tool_call_rate", "tool-call rate"), ("acc_with_tool", "accuracy with the tool"),
            ("acc_without_tool", "accuracy without"), ("iou", "zoom IoU"),
            ("box_centre_hit", "box centre in the target"), ("top_box_share", "top box share"), ("reward", "reward"))
CONTROL_LABELS = {"fixed_box_common": "control: its most common box on every image",
                  "fixed_box_centre": "control: the centre box on every image",
                  "oracle_zoom": "control: first turn an oracle zoom on the target"}
EDGE = 3  # iterations averaged at each end of the training curves


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if r.get("kind") == kind and isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["iteration"]))
            ys.append(float(v))
    return xs, ys


def write_report(run_dir: str | Path, config: dict[str, Any] | None = None,
                 control_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, the plots and the transcript under ``run_dir/report/``; returns the report path."""
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    runs = {"run": read_metrics(run_dir), "control": read_metrics(control_dir) if control_dir else []}
    images = _plots(runs, out)
    lines = [f"# Run report: {run_dir.name}", ""]
    lines += _headline(runs) + _when_needed(runs)
    train = [r for r in runs["run"] if r.get("kind") == "train"]
    sft = [r for r in runs["run"] if r.get("kind") == "sft"]
    if sft:
        lines += [f"SFT warm start: {len(sft)} steps, final NLL {sft[-1].get('sft_nll', float('nan')):.3f}.", ""]
    if train:
        seconds = sum(sum((r.get(f"time/{k}_s") or 0.0) for k in ("rollout", "update", "weight_sync")) for r in train)
        lines += [f"{len(train)} RL iterations in {seconds:.0f} s ({seconds / len(train):.1f} s each on average).", ""]
        lines += _grounding_under_rl(train)
        alarms = [r["iteration"] for r in train if r.get("health/tool_collapse")]
        if alarms:
            lines += [f"Tool-call collapse alarm at iterations {alarms}.", ""]
    skipped = run_dir / "skipped_rows.jsonl"
    if skipped.is_file():
        n = sum(1 for line in skipped.read_text().splitlines() if line.strip())
        lines += [f"{n} data row(s) could not be played and were skipped: [skipped_rows.jsonl](../skipped_rows.jsonl)"
                  " lists each with its reason.", ""]
    transcript = _transcript(run_dir, out)
    if transcript:
        lines += [f"A learned held-out episode: [{transcript}]({transcript}) (its first image with the zoom box "
                  "drawn).", ""]
    lines += [f"![{name}]({name})" for name in images]
    if config:
        import yaml

        lines += ["", "## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def headline_table(run_dir: str | Path, control_dir: str | Path | None = None) -> str:
    """The report's held-out table (start, end, the controls) as markdown, for the end of ``train.py``'s output."""
    runs = {"run": read_metrics(run_dir), "control": read_metrics(control_dir) if control_dir else []}
    return "\n".join(_headline(runs)[2:]).rstrip()


def _headline(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Held-out numbers at the first and last evaluation, and the control's last, as a table."""
    evals = [r for r in runs["run"] if r.get("kind") == "eval"]
    if not evals:
        return []
    rows = [("start", evals[0]), ("end", evals[-1])]
    control = [r for r in runs["control"] if r.get("kind") == "eval"]
    if control:
        rows.append(("end, tools disabled (control)", control[-1]))
    rows += [(CONTROL_LABELS.get(r["control"], r["control"]) + (f" {r['box']}" if r.get("box") else ""), r)
             for r in runs["run"] if r.get("kind") == "control"]
    lines = ["## Held-out evaluation", "", "| | iteration | " + " | ".join(h for _, h in HEADLINE) + " |",
             "|---|---|" + "---|" * len(HEADLINE)]
    for label, record in rows:
        cells = [metric_cell(record.get(key)) for key, _ in HEADLINE]
        lines.append(f"| {label} | {record['iteration']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _when_needed(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Where the tasks say whether they need a zoom (the toy zoom mix): zoom rate and accuracy of each kind,
    held out, at the first and last evaluation."""
    evals = [r for r in runs["run"] if r.get("kind") == "eval" and "tool_call_rate_needed" in r]
    if not evals:
        return []
    lines = ["| held out | iteration | tool-call rate, zoom needed | accuracy, zoom needed | "
             "tool-call rate, zoom needless | accuracy, zoom needless |", "|---|---|---|---|---|---|"]
    for label, r in (("start", evals[0]), ("end", evals[-1])):
        cells = [metric_cell(r.get(k)) for k in ("tool_call_rate_needed", "acc_needed", "tool_call_rate_needless",
                                           "acc_needless")]
        lines.append(f"| {label} | {r['iteration']} | " + " | ".join(cells) + " |")
    return ["Zoom only when needed:", "", *lines, ""]


def _grounding_under_rl(train: list[dict[str, Any]]) -> list[str]:
    """Zoom-box IoU and box-centre hits in the sampled training batches, first iterations against last: does
    RL improve where the policy looks, not only the cold start?"""
    def mean(records: list[dict[str, Any]], key: str) -> float:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return sum(values) / len(values) if values else float("nan")

    if len(train) < 2 * EDGE or not any(isinstance(r.get("iou"), (int, float)) for r in train):
        return []
    edge = max(EDGE, len(train) // 6)  # a sixth of the run a side: three sampled batches alone are noisy
    first, last = train[:edge], train[-edge:]
    changes = ", ".join(f"{label} {metric_cell(mean(first, key))} -> {metric_cell(mean(last, key))}" for key, label in
                        (("iou", "zoom IoU"), ("box_centre_hit", "box centre in the target"),
                         ("acc_with_tool", "accuracy when it zoomed"), ("tool_call_rate", "tool-call rate")))
    return [f"In the sampled training batches, iterations {first[0]['iteration']}-{first[-1]['iteration']} against "
            f"{last[0]['iteration']}-{last[-1]['iteration']}: {changes} ('-': no zoom).", ""]


def _plots(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    for name, title, lines in PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        drawn = False
        for which, kind, key in lines:
            xs, ys = _series(runs[which], kind, key)
            if xs:
                label = f"{kind} {key}" + (" (tools disabled)" if which == "control" else "")
                ax.plot(xs, ys, marker="o" if kind == "eval" else None, markersize=3, label=label,
                        linestyle="--" if which == "control" else "-")
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        images.append(name)
    return images


def _transcript(run_dir: Path, out: Path) -> str | None:
    """``transcript.html``: the last evaluation's first episode that got a tool's image and answered right."""
    folders = sorted((run_dir / "trajectories").glob("eval_*"), key=lambda p: int(p.name.split("_")[1]))
    if not folders:
        return None
    from deepeyes_agent.rollout.trajectory import load_trajectories
    from deepeyes_agent.rollout.trajectory_html import trajectory_html

    learned = [t for t in load_trajectories(folders[-1]) if t.n_image_observations and t.acc == 1.0]
    if not learned:
        return None
    (out / "transcript.html").write_text(trajectory_html(learned[0]), encoding="utf-8")
    return "transcript.html"
