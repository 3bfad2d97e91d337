"""Where training tasks come from: files and HF datasets named by ``data.source``, and the agentic/plain mix
(``data.agentic_fraction``) held in every batch, through the schedule, its checkpoint state and a real run."""

from __future__ import annotations

import dataclasses
import json

import pytest

from deepeyes_agent.training.config import load_config
from deepeyes_agent.training.tasks import MixedSchedule, make_schedule, make_task_source
from deepeyes_envs.data.deepeyes_rows import task_to_deepeyes_row
from deepeyes_envs.data.mixing import MixedTaskSource
from deepeyes_envs.data.parquet import write_deepeyes_parquet
from deepeyes_envs.synthetic import SyntheticTaskSource


def mixed_parquet(path, n_agentic: int = 8, n_plain: int = 8):
    """Toy colour questions: the first rows routed to visual_toolbox, the others plain (empty env_name)."""
    tasks = SyntheticTaskSource(n=n_agentic + n_plain, seed=5, kind="toy")
    rows = [dataclasses.replace(tasks[i], env_name="visual_toolbox" if i < n_agentic else "", task_id=f"t{i}")
            for i in range(len(tasks))]
    write_deepeyes_parquet(rows, path)
    return path


def test_mixed_schedule_holds_the_fraction_in_every_batch_and_resumes():
    schedule = MixedSchedule(n_agentic=5, n_plain=20, agentic_fraction=0.25, seed=3)
    batches = [schedule.take(8) for _ in range(6)]
    assert all(schedule.agentic_share(b) == 0.25 for b in batches)  # 2 of 8, whatever the epoch
    agentic = [i for b in batches[:2] for i in b if i < 5]
    assert sorted(agentic[:4]) == sorted(set(agentic[:4])) and len(set(agentic)) == 4  # no repeats in an epoch
    state = schedule.get_state()
    resumed = MixedSchedule(n_agentic=5, n_plain=20, agentic_fraction=0.25, seed=3)
    resumed.set_state(state)
    assert [resumed.take(8) for _ in range(3)] == [schedule.take(8) for _ in range(3)]
    odd = MixedSchedule(n_agentic=50, n_plain=50, agentic_fraction=0.5, seed=0)
    shares = [odd.agentic_share(odd.take(3)) for _ in range(200)]  # 1 or 2 of 3, half the time each
    assert set(shares) == {1 / 3, 2 / 3} and abs(sum(shares) / 200 - 0.5) < 0.05


def test_data_source_reads_parquet_with_a_mix_and_a_cap(tmp_path):
    path = mixed_parquet(tmp_path / "mix.parquet")
    cfg = load_config(None, ["model.build_tiny=true", f"data.source={path}", "data.agentic_fraction=0.5",
                             "data.n_train=12"])
    source = make_task_source(cfg.data, "train")
    assert isinstance(source, MixedTaskSource) and (len(source.agentic), len(source.plain)) == (8, 4)
    assert isinstance(make_schedule(source, cfg.data), MixedSchedule)
    assert len(make_task_source(cfg.data, "eval")) == 0  # no eval_path: no evaluation


def test_data_source_reads_a_local_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    tasks = SyntheticTaskSource(n=3, seed=1, kind="toy")
    rows = [task_to_deepeyes_row(tasks[i], i) for i in range(3)]
    flat = {"question": [r["extra_info"]["question"] for r in rows], "answer": [r["extra_info"]["answer"] for r in rows],
            "picture": [r["images"][0] for r in rows]}
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "picture": datasets.Image()})
    datasets.Dataset.from_dict(flat, features=features).save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(None, ["model.build_tiny=true", f"data.source=hf:{tmp_path / 'ds'}",
                             "data.columns={image: picture}"])
    source = make_task_source(cfg.data, "train")
    assert len(source) == 3 and source[2].answer == tasks[2].answer
    assert source[2].load_images()[0].shape == tasks[2].load_images()[0].shape


@pytest.mark.slow
def test_a_mixed_run_trains_on_both_kinds_of_rows(ray_local, tiny_model_dir, tmp_path):
    from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig, iteration_record

    path = mixed_parquet(tmp_path / "mix.parquet")
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.source={path}", "data.agentic_fraction=0.25",
                             "env.env_id=", "rollout.prompts_per_iteration=4", "rollout.rollouts_per_prompt=2",
                             "rollout.max_tokens=8", "rollout.max_total_tokens=1024", "algorithm.micro_batch_size=8",
                             "logging.save_trajectories_every=1", "logging.n_saved_trajectories=8",
                             "resources.torch_threads=1"])
    algo = DeepEyesConfig.from_run_config(cfg).build_algo()
    try:
        for i in range(2):
            metrics = iteration_record(algo.train())
            assert algo.iteration == i + 1
            assert metrics["data/agentic_share"] == 0.25
            envs = sorted(t.env_id for t in algo.last_samples)
            assert envs == ["plain"] * 6 + ["visual_toolbox"] * 2  # 1 of 4 prompts, 2 rollouts each
            assert metrics["episodes"] == 8
    finally:
        algo.stop()


def bad_rows_parquet(tmp_path):
    """16 DeepEyes rows, three with a corrupt PNG and one without reward_model (the case of issue 11)."""
    from test_tasks_bad_rows import write_sixteen_rows

    return write_sixteen_rows(tmp_path)


def train_py(tmp_path, model_dir, *overrides):
    import subprocess
    import sys

    from test_train_resume import ROOT

    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny_cpu.yaml"),
                           "model.build_tiny=false", f"model.path={model_dir}", f"logging.run_dir={tmp_path}/run",
                           "env.env_id=", "rollout.prompts_per_iteration=4", "rollout.rollouts_per_prompt=2",
                           "rollout.max_tokens=8", "data.shuffle=false", "logging.progress=false", "sft.steps=0",
                           "logging.eval_every=0", "logging.tensorboard=false", *overrides],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)


@pytest.mark.slow
def test_a_run_skips_bad_rows_counts_and_lists_them(tiny_model_dir, tmp_path):
    path = bad_rows_parquet(tmp_path)
    done = train_py(tmp_path, tiny_model_dir, f"data.source={path}", "iterations=4")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "run"
    skipped = [json.loads(line) for line in (run / "skipped_rows.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in skipped) == [2, 7, 11, 13] and {r["split"] for r in skipped} == {"train"}
    reasons = {r["index"]: r["reason"] for r in skipped}
    assert "cannot read image" in reasons[2] and "reward_model" in reasons[13]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    per_iteration = [r["data/skipped_rows"] for r in records if r["kind"] == "train"]
    assert per_iteration == [1, 1, 1, 1]  # rows 0-3, 4-7, 8-11, 12-15 in order: one bad row in each
    assert [r["episodes"] for r in records if r["kind"] == "train"] == [6, 6, 6, 6]
    assert "4 data row(s) could not be played" in (run / "report" / "report.md").read_text()
    assert "skipped 1 bad row(s) this iteration" in done.stdout
    output = done.stdout + done.stderr  # a quiet run: the project's lines, none of Ray's or transformers' notices
    for notice in ("Token authentication", "new API stack", "RLModuleConfig", "gputil", "Loading weights",
                   "Started a local Ray instance"):
        assert notice not in output, notice


@pytest.mark.slow
def test_a_run_with_too_many_bad_rows_stops_with_a_clear_error(tiny_model_dir, tmp_path):
    path = bad_rows_parquet(tmp_path)
    done = train_py(tmp_path, tiny_model_dir, f"data.source={path}", "iterations=4", "data.max_bad_row_share=0.2")
    assert done.returncode == 1
    assert "2 of the 8 training rows read so far cannot be played, more than data.max_bad_row_share = 20.00%" \
        in done.stderr and "Traceback" not in done.stderr
