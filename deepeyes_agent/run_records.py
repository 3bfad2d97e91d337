"""A run's records as the layers above read them: the ``metrics.jsonl`` file, its records, their table cells.

The trainer writes the file (``training.run_log.RunLog``); the export's model card and the run report both read
it, and the export sits in the policy layer, below training: so the reading lives here, under both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics file, in order (none if the run has not logged yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric_cell(value: Any) -> str:
    """A number as a markdown table shows it (three decimals); ``-`` for a missing or non-finite one."""
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"
