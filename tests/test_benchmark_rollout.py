"""benchmarks/rollout.py runs end to end (small) and its table carries every mode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.mark.slow
def test_rollout_benchmark_small(tiny_model_dir) -> None:
    import rollout

    rows = rollout.run_benchmark(tiny_model_dir, episodes=2, n_tasks=1, max_tokens=3)
    assert [(r["mode"], r["kv_reuse"]) for r in rows] == list(rollout.MODES)
    for row in rows:  # every mode played the same scripted episodes: 2 x 4 turns, 3 zooms each
        assert row["episodes"] == 2 and row["turns"] == 8 and row["images"] == 8
        assert row["generated_tokens"] == 2 * 4 * 3 and row["tokens_per_s"] > 0
    assert rows[0]["speedup"] == 1.0
    table = rollout.format_table(rows)
    assert table.count("\n") == 5 and "batched" in table and "one-at-a-time" in table
