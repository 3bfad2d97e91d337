"""benchmarks/judge_throughput.py runs (small) against its own fake-latency server and reports the ratio."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_small() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "judge_throughput.py"), "--n", "256", "--sample",
                          "16", "--concurrency", "32", "--delay", "0.02"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "sequential (DeepEyes)" in text and "extrapolated from 16 timed" in text
    assert "max in flight seen 32" in text
    ratio = re.search(r"\| ratio \| \| \*\*([\d.]+)x\*\*", text)
    result = re.fullmatch(r"RESULT judge_throughput: ([\d.]+)x \(target >= 30x\)", text.strip().splitlines()[-1])
    assert ratio and result and result.group(1) == ratio.group(1)
