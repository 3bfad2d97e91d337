"""The judge throughput benchmark runs, and concurrency pays off even at a small size."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import judge_throughput  # noqa: E402


def test_benchmark_small(capsys) -> None:
    result = judge_throughput.main(["--n", "256", "--sample", "16", "--concurrency", "32", "--delay", "0.02"])
    out = capsys.readouterr().out
    assert "sequential (DeepEyes)" in out and "extrapolated from 16 timed" in out
    assert result["in_flight_max"] == 32
    assert result["speedup"] > 5  # 32 in flight: ideally 32x; a loaded 2-core machine still gives far more than 5
