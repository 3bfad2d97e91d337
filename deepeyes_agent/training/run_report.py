"""The end-of-run report: report.md with the headline numbers and PNG plots of the main curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from deepeyes_agent.training.run_log import read_metrics

PLOTS = (
    ("reward.png", "Reward", [("train", "reward"), ("eval", "reward")]),
    ("accuracy.png", "Accuracy", [("train", "acc"), ("eval", "acc")]),
    ("tool_calls.png", "Tool-call rate", [("train", "tool_call_rate"), ("eval", "tool_call_rate")]),
    ("response_length.png", "Response length (tokens)", [("train", "response_length")]),
    ("entropy.png", "Entropy", [("train", "entropy")]),
    ("timing.png", "Seconds per iteration", [("train", "time/rollout_s"), ("train", "time/update_s"),
                                             ("train", "time/weight_sync_s")]),
)


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if r.get("kind") == kind and isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(int(r["iteration"]))
            ys.append(float(v))
    return xs, ys


def write_report(run_dir: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write ``report.md`` and the plots under ``run_dir/report/``; returns the report path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = read_metrics(run_dir)
    images = []
    for name, title, lines in PLOTS:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        drawn = False
        for kind, key in lines:
            xs, ys = _series(records, kind, key)
            if xs:
                ax.plot(xs, ys, marker="o" if kind == "eval" else None, markersize=3, label=f"{kind} {key}")
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

    evals = [r for r in records if r.get("kind") == "eval"]
    lines = [f"# Run report: {run_dir.name}", ""]
    if evals:
        first, last = evals[0], evals[-1]
        lines += ["## Held-out evaluation", "", "| | iteration | accuracy | tool-call rate | reward |",
                  "|---|---|---|---|---|"]
        for label, r in (("start", first), ("end", last)):
            lines.append(f"| {label} | {r['iteration']} | {r.get('acc', float('nan')):.3f} | "
                         f"{r.get('tool_call_rate', float('nan')):.3f} | {r.get('reward', float('nan')):.3f} |")
        lines.append("")
    sft = [r for r in records if r.get("kind") == "sft"]
    if sft:
        lines += [f"SFT warm start: {len(sft)} steps, final NLL {sft[-1].get('sft_nll', float('nan')):.3f}.", ""]
    train = [r for r in records if r.get("kind") == "train"]
    if train:
        mean_t = sum(sum((r.get(f"time/{k}_s") or 0.0) for k in ("rollout", "update", "weight_sync"))
                     for r in train) / len(train)
        lines += [f"{len(train)} RL iterations, {mean_t:.1f} s each on average.", ""]
    lines += [f"![{name}]({name})" for name in images]
    if config:
        import yaml

        lines += ["", "## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
