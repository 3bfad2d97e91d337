"""benchmarks/rollout.py runs end to end (small): its table carries every mode and its RESULT line the ratio."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rollout_benchmark_small(tiny_model_dir, tmp_path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--model-dir", str(tiny_model_dir),
                          "--episodes", "2", "--tasks", "1", "--max-tokens", "3", "--repeats", "2",
                          "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["mode"], r["kv_reuse"]) for r in rows] == [("one-at-a-time", False), ("one-at-a-time", True),
                                                          ("batched", False), ("batched", True)]
    for row in rows:  # every mode played the same scripted episodes: 2 x 4 turns, 3 zooms each
        assert row["episodes"] == 2 and row["turns"] == 8 and row["images"] == 8
        assert row["generated_tokens"] == 2 * 4 * 3 and row["tokens_per_s"] > 0
    assert rows[0]["speedup"] == 1.0
    lines = out.stdout.strip().splitlines()
    assert len([line for line in lines if line.startswith("| ")]) == 5 and "batched" in out.stdout
    versus = re.fullmatch(r"batched with KV reuse / one-at-a-time with KV reuse: ([\d.]+)x \(target >= 1.5x\)",
                          lines[-2])
    assert versus and float(versus.group(1)) == pytest.approx(rows[-1]["speedup"] / rows[1]["speedup"], abs=0.01)
    result = re.fullmatch(r"RESULT rollout: ([\d.]+)x \(target >= 6x\)", lines[-1])
    assert result and float(result.group(1)) == pytest.approx(rows[-1]["speedup"], abs=0.01)
