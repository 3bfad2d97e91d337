"""benchmarks/loss_memory.py runs end to end (small sizes): both heads measured, the FakeTensorMode estimate matches
the measured peak, the chunked head uses less memory, and a head that does not fit is estimated instead of run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "64", "--vocab", "4096", "--threads", "1"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loss_memory.py"), *SMALL, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_loss_memory_benchmark_small(tmp_path) -> None:
    out = _run("--lengths", "256,1024", "--json", str(tmp_path / "rows.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "rows.json").read_text())
    rows = data["rows"]
    assert [(r["tokens"], r["path"]) for r in rows] == [(256, "full logits"), (256, "chunked"),
                                                        (1024, "full logits"), (1024, "chunked")]
    assert all(r["how"] == "measured" and r["seconds"] > 0 for r in rows)
    assert all(r["generated"] == pytest.approx(0.15 * r["tokens"], rel=0.1) for r in rows)
    check = data["estimator_check"]
    assert check["tokens"] == 256 and check["measured_bytes"] > 0  # the estimate is off by a few scalars at most
    assert check["estimated_bytes"] == pytest.approx(check["measured_bytes"], rel=1e-4)
    lean = [r for r in rows if r["path"] == "chunked"]
    assert all(r["memory_ratio"] > 1 and r["time_ratio"] > 0 for r in lean)
    lines = out.stdout.strip().splitlines()
    assert len([line for line in lines if line.startswith("| ")]) == 5 and "estimator check" in out.stdout
    result = re.fullmatch(r"RESULT loss_memory: ([\d.]+)x \(target >= 8x\)", lines[-1])
    assert result and float(result.group(1)) == pytest.approx(lean[-1]["memory_ratio"], abs=0.05)


@pytest.mark.slow
def test_a_head_over_the_memory_cap_is_estimated_not_run(tmp_path) -> None:
    out = _run("--lengths", "256", "--max-gb", "0.001", "--json", str(tmp_path / "rows.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    full, lean = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert full["how"] == "estimated (FakeTensorMode)" and full["seconds"] is None and full["peak_bytes"] > 0
    assert lean["how"] == "measured" and "time_ratio" not in lean and lean["memory_ratio"] > 1
    assert "no full-logits run fitted" in out.stdout and out.stdout.strip().splitlines()[-1].startswith("RESULT")
