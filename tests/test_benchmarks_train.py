"""benchmarks/train_step.py, benchmarks/learner_mfu.py and scripts/zoom_probe.py run end to end on the CPU (small)
and report sane numbers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script: str, *args: str, folder: str = "benchmarks") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / folder / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


def test_learner_mfu_wiring_on_the_cpu() -> None:
    args = ["--tiny", "--device", "cpu", "--dtype", "float32", "--batch", "2", "--seq-len", "256",
            "--image-side", "112", "--steps", "2", "--warmup", "1", "--matmul-size", "256"]
    done = _run("learner_mfu.py", *args, "--json", "--peak-tflops", "2.0")
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert r["tokens_per_step"] == 512 and r["step_s"] > 0 and r["matmul_tflops_per_s"] > 0
    assert r["vs_matmul"] == pytest.approx(r["model_tflops_per_s"] / r["matmul_tflops_per_s"])
    assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / 2.0)
    table = _run("learner_mfu.py", *args)
    assert table.returncode == 0 and "model / matmul" in table.stdout and "MFU (vs spec)" in table.stdout
    assert re.fullmatch(r"RESULT learner_mfu: [\d.]+x \(target >= 0.5x\)", table.stdout.strip().splitlines()[-1])
    too_short = _run("learner_mfu.py", "--tiny", "--device", "cpu", "--seq-len", "64")
    assert too_short.returncode != 0 and "cannot hold" in too_short.stderr


def test_train_step_phases(tiny_model_dir) -> None:
    done = _run("train_step.py", "--iterations", "2", "--warmup", "1", "rollout.prompts_per_iteration=2",
                "rollout.rollouts_per_prompt=2", "model.build_tiny=false", f"model.path={tiny_model_dir}")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("tiny_cpu, 4 trajectories")
    phases = {row[0]: (float(row[1]), float(row[2])) for row in (line.split() for line in lines[2:8])}
    assert set(phases) == {"rollout_s", "generate_s", "judge_s", "update_s", "weight_sync_s", "wall_s"}
    assert 0 < phases["generate_s"][0] <= phases["rollout_s"][0] <= phases["wall_s"][0]
    assert phases["wall_s"][1] == 1.0 and phases["update_s"][0] > 0
    result = re.fullmatch(r"RESULT train_step: ([\d.]+)x \(target >= 0.9x\)", lines[-1])
    shares = sum(phases[k][1] for k in ("rollout_s", "update_s", "weight_sync_s"))
    assert result and float(result.group(1)) == pytest.approx(shares, abs=0.02)


def test_zoom_probe_measures_both_views_three_ways(tiny_model_dir) -> None:
    done = _run("zoom_probe.py", "--model", str(tiny_model_dir), "--n", "64", "--n-test", "16", "--epochs", "1",
                folder="scripts")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    full = next(line for line in lines if line.startswith("full view")).split()
    zoom = next(line for line in lines if line.startswith("zoomed crop")).split()
    assert full[2] == "224x224" and zoom[2] == "60x60"  # the demonstrations' zoom: the 60 px frame's own box
    assert all(0.0 <= float(a) <= 1.0 for a in full[3:6] + zoom[3:6])  # base answer, frozen eyes, eyes trained
    assert "chance 0.25" in lines[0]
