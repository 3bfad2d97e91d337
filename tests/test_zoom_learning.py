"""Proof that it thinks with images: the README's main job (configs/zoom_cpu.yaml), shortened.

From the tiny base pretrained on perception (never on tool calls), a short cold start leaves the held-out
tool-call rate at 0.3 or below; GRPO with the DeepEyes reward must then raise it by at least 0.4 and held-out
accuracy by at least 0.3, to 0.8 or more, while the same run with the tool disabled stays near chance (1 in 4
colours), and an oracle first zoom on the frame is right too. Runs the real ``train.py`` in a subprocess: Ray, the
RLlib algorithm, the rule judge, the controls, the report. The last test runs configs/zoom_anywhere_cpu.yaml
(the frame anywhere), shortened: there it is *where* it zooms that makes it right.
"""

from __future__ import annotations

import json
import math
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
def test_rl_learns_to_zoom_and_zooming_is_what_makes_it_right(tmp_path):
    run_dir = tmp_path / "zoom"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "iterations=9", f"logging.run_dir={run_dir}",
                           "logging.progress=false", "logging.tensorboard=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=1700,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run, control = evals(run_dir), evals(run_dir / "no_tool")
    start, end = run[0], run[-1]
    print(f"held-out accuracy {start['acc']:.3f} -> {end['acc']:.3f}, tool-call rate {start['tool_call_rate']:.3f} "
          f"-> {end['tool_call_rate']:.3f}; tools disabled: {control[-1]['acc']:.3f}")
    assert start["tool_call_rate"] <= 0.3, "the cold start alone already zooms too often to measure RL's gain"
    assert end["tool_call_rate"] - start["tool_call_rate"] >= 0.4
    assert end["acc"] >= 0.8 and end["acc"] - start["acc"] >= 0.3
    assert end["acc_with_tool"] >= 0.8  # the episodes that zoomed are the ones that are right
    assert control[-1]["acc"] <= 0.4 and control[-1]["tool_call_rate"] == 0.0
    controls = {r["control"]: r for r in records(run_dir) if r["kind"] == "control"}
    print({name: round(r["acc"], 3) for name, r in controls.items()})
    assert set(controls) == {"fixed_box_common", "fixed_box_centre", "oracle_zoom"}
    assert controls["oracle_zoom"]["acc"] >= 0.8 and controls["oracle_zoom"]["box_centre_hit"] == 1.0
    # The centre layout has one right box for every image: fixing it changes nothing, which is why this run
    # proves *that* zooming pays and not *where* to look (configs/zoom_anywhere_cpu.yaml is that target).
    assert end["top_box_share"] >= 0.9 and controls["fixed_box_common"]["acc"] >= end["acc"] - 0.1
    report = (run_dir / "report" / "report.md").read_text()
    assert "end, tools disabled (control)" in report and "(transcript.html)" in report
    assert "control: first turn an oracle zoom on the target" in report
    transcript = (run_dir / "report" / "transcript.html").read_text()
    assert "<svg" in transcript or "<img" in transcript
    for plot in ("accuracy.png", "tool_calls.png", "accuracy_by_tool.png", "iou.png", "grounding.png"):
        assert (run_dir / "report" / plot).stat().st_size > 1000


@pytest.mark.timeout(1800)
def test_asynchronous_training_learns_to_zoom_as_well(tmp_path):
    """The same run with two env runners sampling during updates (algorithm.max_staleness=1) reaches the same
    held-out bar, learning from episodes one update old (no control run: the one above is the control)."""
    run_dir = tmp_path / "zoom_async"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "iterations=9", f"logging.run_dir={run_dir}",
                           "logging.progress=false", "logging.tensorboard=false", "logging.no_tool_control=false",
                           "logging.zoom_controls=false",
                           "algorithm.max_staleness=1", "resources.num_env_runners=2",
                           "resources.num_cpus_per_env_runner=1", "resources.torch_threads=1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=1700,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train = [r for r in records(run_dir) if r["kind"] == "train"]
    start, end = evals(run_dir)[0], evals(run_dir)[-1]
    print(f"asynchronous: held-out accuracy {start['acc']:.3f} -> {end['acc']:.3f}, tool-call rate "
          f"{start['tool_call_rate']:.3f} -> {end['tool_call_rate']:.3f}")
    assert max(r["async/staleness_max"] for r in train) == 1.0  # it did learn from stale episodes
    assert end["tool_call_rate"] - start["tool_call_rate"] >= 0.4
    assert end["acc"] >= 0.8 and end["acc"] - start["acc"] >= 0.3


@pytest.mark.timeout(1800)
def test_with_the_frame_anywhere_rl_learns_where_to_look(tmp_path):
    """configs/zoom_anywhere_cpu.yaml, shortened: the cold start leaves greedy decoding answering directly, RL makes
    it zoom and be right, and it is *where* it zooms that makes it right: the same policy with one box for every
    image falls back towards chance, while the sampled boxes move onto the frame under RL."""
    run_dir = tmp_path / "anywhere"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "configs/zoom_anywhere_cpu.yaml",
                           "iterations=45", f"logging.run_dir={run_dir}", "logging.progress=false",
                           "logging.tensorboard=false"],
                          capture_output=True, text=True, cwd=ROOT, timeout=1700,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = evals(run_dir)
    start, end = run[0], run[-1]
    controls = {r["control"]: r for r in records(run_dir) if r["kind"] == "control"}
    print(f"anywhere: held-out accuracy {start['acc']:.3f} -> {end['acc']:.3f}, tool-call rate "
          f"{start['tool_call_rate']:.3f} -> {end['tool_call_rate']:.3f}, box centre in the frame "
          f"{end['box_centre_hit']:.3f}, top box share {end['top_box_share']:.3f}; controls "
          + str({name: round(r["acc"], 3) for name, r in controls.items()}))
    assert start["tool_call_rate"] <= 0.2 and start["acc"] <= 0.35
    assert end["tool_call_rate"] - start["tool_call_rate"] >= 0.4 and end["acc"] - start["acc"] >= 0.3
    assert end["top_box_share"] < 0.25  # its boxes follow the image
    fixed = max(controls["fixed_box_common"]["acc"], controls["fixed_box_centre"]["acc"])
    assert end["acc"] - fixed >= 0.1, "one box for every image scores as well: it is not looking where"
    assert controls["oracle_zoom"]["acc"] >= 0.8
    train = [r for r in records(run_dir) if r["kind"] == "train"]

    def mean_iou(rs):
        values = [r["iou"] for r in rs if isinstance(r.get("iou"), float) and math.isfinite(r["iou"])]
        return sum(values) / max(1, len(values))

    # Measured 0.153 -> 0.177 over these 45 iterations (0.153 -> 0.225 over the config's 150).
    assert mean_iou(train[-10:]) > mean_iou(train[:10]), "the sampled boxes did not move onto the frame under RL"
