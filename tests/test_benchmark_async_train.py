"""benchmarks/async_train.py runs end to end (few iterations): both modes learn from the same number of episodes,
only the asynchronous one learns from stale episodes, and the RESULT line is the measured ratio."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_async_train_benchmark_small(tmp_path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "async_train.py"), "--iterations", "2",
                          "--turn-latency", "0.05", "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=850)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "rows.json").read_text())
    sync, stale = data["rows"]
    assert sync["mode"] == "synchronous" and stale["mode"] == "max_staleness 1"
    assert sync["episodes"] == stale["episodes"] == 2 * 4 * 2  # iterations x groups x rollouts
    assert sync["staleness"] == 0.0 and 0.0 < stale["staleness"] <= 1.0
    assert 1.0 <= sync["turns"] <= 5.0 and sync["per_s"] > 0 and stale["per_s"] > 0
    lines = out.stdout.strip().splitlines()
    assert len([line for line in lines if line.startswith("| ")]) == 3
    result = re.fullmatch(r"RESULT async_train: ([\d.]+)x \(target >= 1.4x\)", lines[-1])
    assert result and float(result.group(1)) == pytest.approx(data["ratio"], abs=0.006)
