"""Proof that it thinks with images, where the target is: the README's main job (configs/zoom_cpu.yaml), shortened.

From the tiny base pretrained on perception (never on tool calls), a short cold start leaves greedy decoding
answering directly, at chance; GRPO with the DeepEyes reward must then raise the held-out tool-call rate by at
least 0.4 and accuracy by at least 0.3, to the grounding bar (accuracy >= 0.8, tool-call rate >= 0.9, the zoom box's
centre inside the frame >= 0.8, no box for a quarter of the images), with the frame placed anywhere. Controls: the
same run with the tool disabled stays near chance (1 in 4 colours), the trained policy with one box for every image
falls back near chance (it is *where* it looks that makes it right), and an oracle first zoom is right. Runs the
real ``train.py`` in a subprocess: Ray, the RLlib algorithm, the rule judge, the controls, the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def evals(run_dir: Path) -> list[dict]:
    return [r for r in records(run_dir) if r["kind"] == "eval"]


@pytest.mark.timeout(1800)
def test_rl_learns_to_zoom_where_the_target_is_and_that_is_what_makes_it_right(tmp_path):
    run_dir = tmp_path / "zoom"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "iterations=12", f"logging.run_dir={run_dir}",
                           "logging.progress=false", "logging.tensorboard=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=1700,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run, control = evals(run_dir), evals(run_dir / "no_tool")
    start, end = run[0], run[-1]
    controls = {r["control"]: r for r in records(run_dir) if r["kind"] == "control"}
    print(f"held-out accuracy {start['acc']:.3f} -> {end['acc']:.3f}, tool-call rate {start['tool_call_rate']:.3f} "
          f"-> {end['tool_call_rate']:.3f}, box centre in the frame {end['box_centre_hit']:.3f}, top box share "
          f"{end['top_box_share']:.3f}; tools disabled: {control[-1]['acc']:.3f}; controls "
          + str({name: round(r["acc"], 3) for name, r in controls.items()}))
    assert start["tool_call_rate"] <= 0.2 and start["acc"] <= 0.35, "the cold start alone already zooms or reads"
    assert end["tool_call_rate"] - start["tool_call_rate"] >= 0.4 and end["acc"] - start["acc"] >= 0.3
    assert end["acc"] >= 0.8 and end["tool_call_rate"] >= 0.9
    assert end["box_centre_hit"] >= 0.8 and end["top_box_share"] < 0.25  # on the frame, and it follows the image
    assert control[-1]["acc"] <= 0.4 and control[-1]["tool_call_rate"] == 0.0
    assert set(controls) == {"fixed_box_common", "fixed_box_centre", "oracle_zoom"}
    for fixed in ("fixed_box_common", "fixed_box_centre"):  # one box for every image: back near chance
        assert controls[fixed]["acc"] <= 0.45 and controls[fixed]["top_box_share"] == 1.0
    assert controls["oracle_zoom"]["acc"] >= 0.8 and controls["oracle_zoom"]["box_centre_hit"] == 1.0
    report = (run_dir / "report" / "report.md").read_text()
    assert "end, tools disabled (control)" in report and "(transcript.html)" in report
    assert "control: first turn an oracle zoom on the target" in report
    assert "In the sampled training batches" in report and "accuracy when it zoomed" in report
    assert "held-out evaluation (greedy):" in done.stdout and "| control: its most common box" in done.stdout
    transcript = (run_dir / "report" / "transcript.html").read_text()
    assert "<svg" in transcript or "<img" in transcript
    for plot in ("accuracy.png", "tool_calls.png", "accuracy_by_tool.png", "iou.png", "grounding.png"):
        assert (run_dir / "report" / plot).stat().st_size > 1000


@pytest.mark.timeout(1800)
def test_asynchronous_training_learns_to_zoom_as_well(tmp_path):
    """The same run with two env runners sampling during updates (algorithm.max_staleness=1), at half the learning
    rate, reaches the same held-out bar, learning from episodes one update old (no control run: the one above is
    the control)."""
    run_dir = tmp_path / "zoom_async"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "iterations=12", f"logging.run_dir={run_dir}",
                           "logging.progress=false", "logging.tensorboard=false", "logging.no_tool_control=false",
                           "logging.zoom_controls=false",
                           "algorithm.max_staleness=1", "resources.num_env_runners=2",
                           "resources.num_cpus_per_env_runner=1", "resources.torch_threads=1",
                           "optim.lr=1.5e-4"],  # at 3e-4 one run in two drifted after iteration 6 (docs/training.md)
                          capture_output=True, text=True, cwd=tmp_path, timeout=1700,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train = [r for r in records(run_dir) if r["kind"] == "train"]
    start, end = evals(run_dir)[0], evals(run_dir)[-1]
    print(f"asynchronous: held-out accuracy {start['acc']:.3f} -> {end['acc']:.3f}, tool-call rate "
          f"{start['tool_call_rate']:.3f} -> {end['tool_call_rate']:.3f}")
    assert max(r["async/staleness_max"] for r in train) == 1.0  # it did learn from stale episodes
    assert end["tool_call_rate"] - start["tool_call_rate"] >= 0.4
    assert end["acc"] >= 0.8 and end["acc"] - start["acc"] >= 0.3 and end["box_centre_hit"] >= 0.8
