"""benchmarks/env_step.py runs in quick mode and prints both tables with their targets."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_env_step_benchmark_quick():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "env_step.py"), "--quick"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "== one zoom step, visual_toolbox_v2" in text and "== peak RSS" in text
    rows = re.findall(r"^(\d+x\d+)\s+(\d+x\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(\d+)x\s+"
                      r"(met|MISSED)$", text, re.MULTILINE)
    assert [r[:2] for r in rows] == [("1920x1080", "480x270"), ("3840x2160", "960x540")]
    for _, _, step, _, floor, png, ratio, png_ratio, _ in rows:
        assert float(ratio) == pytest.approx(float(step) / float(floor), rel=0.05, abs=0.01)
        assert float(png_ratio) == pytest.approx(float(png) / float(step), rel=0.05, abs=1)
        assert float(png) > float(step)  # a PNG round trip can never beat a zoom step
    rss = re.search(r"^\s+8 3840x2160 .* (\d+)\s+[\d.]+\s+[\d.]+\s+< 1536 MB (met|MISSED)$", text, re.MULTILINE)
    assert rss, text
    assert 50 < int(rss.group(1)) < 4096  # a peak RSS in MB, not KB or bytes
    result = re.fullmatch(r"RESULT env_step: (\d+)x \(target >= 5x\)", text.strip().splitlines()[-1])
    assert result and int(result.group(1)) == pytest.approx(float(rows[-1][5]) / float(rows[-1][2]), rel=0.05)
