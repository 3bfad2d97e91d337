"""scripts/gpu_check.sh --cpu: the GPU check's own commands, shrunk to a CPU, run end to end and print its table
(MFU wiring, the HF and vLLM engines' logprob gaps from real training runs, the vLLM GRPO iterations)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_gpu_check_runs_on_a_cpu(tmp_path, vllm_python):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_OUT": str(tmp_path), "GPU_CHECK_VLLM_PYTHON": vllm_python}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=850)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 6 and "learner MFU" in rows[1] and "a plain matmul's FLOP rate" in rows[1]
    for engine, iterations in (("hf", 2), ("vllm", 3)):
        gap_row = next(r for r in rows if r.startswith(f"| {engine}: logprob gap"))
        gaps = [float(g) for g in re.findall(r"\d\.\de[-+]\d\d", gap_row)]
        assert len(gaps) == iterations + 1 and max(gaps) < 1e-4, gap_row  # float32: engine and learner agree
        assert f"| {engine}: {iterations} GRPO iterations" in done.stdout
