"""Resume without loss: SIGKILL ``train.py`` mid-iteration, rerun the same command, and the run continues
from its last checkpoint with the curves continuing (no gap, no duplicate iteration)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepeyes_agent.training.driver import latest_checkpoint

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def command(model_dir: Path) -> list[str]:
    # The run dir is relative, as in the README's default run (it runs in tmp_path).
    return [sys.executable, str(ROOT / "train.py"), "name=resume", "logging.run_dir=run", "iterations=6",
            "model.build_tiny=false", f"model.path={model_dir}", "logging.checkpoint_every=2",
            "logging.eval_every=0", "logging.progress=false", "logging.report=false", "sft.steps=0",
            "rollout.prompts_per_iteration=4", "rollout.rollouts_per_prompt=2", "rollout.max_tokens=12",
            "data.n_eval=4", "algorithm.micro_batch_size=8", "resources.torch_threads=1",
            "logging.save_trajectories_every=0"]


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r["kind"] == "train"]


def test_sigkill_mid_iteration_then_resume(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command(tiny_model_dir), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        deadline = time.monotonic() + 360
        # wait until iteration 3 is logged: the checkpoint of iteration 2 exists and iteration 4 is running
        while time.monotonic() < deadline and first.poll() is None:
            if any(r["iteration"] >= 3 for r in train_records(run_dir)):
                break
            time.sleep(0.2)
        assert first.poll() is None, f"run ended early:\n{first.stdout.read()}"
        assert (run_dir / "checkpoints" / "iter_2" / "DONE").exists()
        before = {r["iteration"]: r for r in train_records(run_dir)}
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        first.wait()
    assert max(before) >= 3
    # an iteration takes ~0.2 s: a later checkpoint may have landed between the last poll and the kill
    resume_from = latest_checkpoint(run_dir)
    kept = int(resume_from.name.removeprefix("iter_"))
    assert kept >= 2

    second = subprocess.run(command(tiny_model_dir), cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=420, start_new_session=True)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"resumed from {resume_from} (iteration {kept})" in out
    records = train_records(run_dir)
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    for i in [i for i in before if i <= kept]:  # what came before the checkpoint is kept as it was
        assert records[i - 1]["reward"] == before[i]["reward"]
        assert records[i - 1]["time/rollout_s"] == before[i]["time/rollout_s"]
    assert (run_dir / "checkpoints" / "iter_6" / "DONE").exists()
    assert not any(p.name.startswith("tmp-") for p in (run_dir / "checkpoints").iterdir())
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_checkpoint_written_before_the_package_move_restores(ray_local, tmp_path):
    """A checkpoint of main at 26fdf5b (tests/data/checkpoint_26fdf5b) resumes with today's classes."""
    import pickle
    import shutil

    import torch

    from deepeyes_agent.training.config import load_config
    from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig

    data = ROOT / "tests" / "data" / "checkpoint_26fdf5b"
    checkpoint = tmp_path / "iter_1"
    shutil.copytree(data / "run" / "checkpoints" / "iter_1", checkpoint)
    cfg = load_config(None, ["model.build_tiny=false", f"model.path={data / 'model'}", "sft.steps=2",
                             "rollout.prompts_per_iteration=2", "rollout.rollouts_per_prompt=2",
                             "algorithm.micro_batch_size=4", "resources.torch_threads=1"])
    module_state = checkpoint / "learner_group" / "learner" / "rl_module" / "default_policy" / "module_state.pkl"
    saved = pickle.loads(module_state.read_bytes())
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        fresh = {k: v.clone() for k, v in algo.learner_group._learner.model.state_dict().items()}
        algo.restore_from_path(str(checkpoint))
        assert algo.iteration == 1 and algo.sft_done
        assert algo.schedule.get_state() == {"epoch": 0, "cursor": 2}
        weights = algo.learner_group._learner.model.state_dict()
        assert set(weights) == set(saved)
        assert all(torch.equal(weights[k], torch.as_tensor(saved[k])) for k in saved)
        assert any(not torch.equal(fresh[k], weights[k]) for k in saved), "the checkpoint differs from the start"
        assert algo.learner_group._learner.get_optimizer().state, "optimizer moments were restored"
        algo.train()
        assert algo.iteration == 2
    finally:
        algo.stop()
