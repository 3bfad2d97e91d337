"""Where a run's numbers go: metrics.jsonl, TensorBoard, one readable line per iteration.

Resuming must continue the curves, not restart or duplicate them: :meth:`RunLog.truncate_after` drops the
records written after the checkpoint a run resumes from (the iterations that will be redone), and
TensorBoard's writer is opened with ``purge_step`` so its events after that step are discarded too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from deepeyes_agent.run_records import METRICS_FILE

LINE_KEYS = (("reward", "reward {:+.3f}"), ("acc", "acc {:.2f}"), ("tool_call_rate", "tool {:.2f}"),
             ("format_error", "fmt-err {:.2f}"), ("response_length", "len {:.0f}"), ("entropy", "H {:.2f}"),
             ("grad_norm", "|g| {:.2f}"), ("eval/acc", "eval-acc {:.2f}"), ("eval/tool_call_rate", "eval-tool {:.2f}"),
             ("health/dropped_groups", "dropped {:.0f}"))


def format_line(iteration: int, total: int, metrics: dict[str, Any]) -> str:
    """``it 12/100 | reward +0.812 | acc 0.81 | ... | 4.1 s (rollout 2.0, update 1.9)``."""
    parts = [f"it {iteration}/{total}"]
    for key, fmt in LINE_KEYS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(fmt.format(value))
    t = {k: metrics.get(f"time/{k}_s") for k in ("rollout", "update", "weight_sync")}
    if t["rollout"] is not None:
        total_s = sum(v for v in t.values() if v)
        parts.append(f"{total_s:.1f} s (rollout {t['rollout']:.1f}, update {t['update'] or 0.0:.1f})")
    return " | ".join(parts)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    """Appends one JSON record per event to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_iteration: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iteration is not None:
            self.truncate_after(resume_iteration)
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old directory starts clean curves
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            kwargs = {"purge_step": resume_iteration + 1} if resume_iteration is not None else {}
            self.writer = SummaryWriter(str(Path(run_dir) / "tb"), **kwargs)

    def truncate_after(self, iteration: int) -> None:
        """Keep only records up to ``iteration`` (those after it are redone from the checkpoint)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, iteration: int, metrics: dict[str, Any], kind: str = "train") -> None:
        record = {"iteration": iteration, "kind": kind, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    tag = key if "/" in key else f"{kind}/{key}"
                    self.writer.add_scalar(tag, value, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
