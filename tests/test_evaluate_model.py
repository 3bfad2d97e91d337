"""Evaluation with real local policies: the tiny Qwen2.5-VL through transformers on the synthetic, V* and
HR-Bench layouts (deterministic and resumable), and through a real vLLM server via the OpenAI client."""

from __future__ import annotations

import json

import pytest
from test_evaluate import make_hrbench, make_vstar

from deepeyes_agent.offline.benchmark_files import load_benchmark
from deepeyes_agent.offline.evaluate import EvalConfig, main, run_evaluation
from deepeyes_agent.rollout.runners import EndpointRunner


@pytest.mark.slow
def test_tiny_model_on_synthetic_vstar_and_hrbench_is_deterministic_and_resumable(tmp_path, tiny_model_dir):
    import torch

    torch.set_num_threads(2)
    vstar = make_vstar(tmp_path / "vstar_bench")
    hr = make_hrbench(tmp_path / "hr_bench_4k.parquet")
    args = ["--policy", str(tiny_model_dir), "--benchmark", "synthetic:2", "--benchmark", f"vstar:{vstar}",
            "--benchmark", f"hrbench:{hr}", "--synthetic-size", "320", "240", "--max-tokens", "6", "--max-turns", "2",
            "--batch-size", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a"), "--limit", "2"]) == 0
    partial = json.loads((tmp_path / "a" / "results.json").read_text())
    assert {b: v["metrics"]["n"] for b, v in partial["benchmarks"].items()} == {
        "synthetic": 2, "vstar": 2, "hrbench_4k": 2}
    assert main([*args, "--out", str(tmp_path / "a")]) == 0  # resumes: only the rest is played
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    for name in ("synthetic", "vstar", "hrbench_4k"):
        answers_a = [(s["task_id"], s["answer"], [r["answer"] for r in s["runs"]]) for s in a["benchmarks"][name]["samples"]]
        answers_b = [(s["task_id"], s["answer"], [r["answer"] for r in s["runs"]]) for s in b["benchmarks"][name]["samples"]]
        assert answers_a == answers_b, name
        assert a["benchmarks"][name]["metrics"] == b["benchmarks"][name]["metrics"]
    assert a["benchmarks"]["vstar"]["metrics"]["n"] == 4 and a["benchmarks"]["hrbench_4k"]["metrics"]["n"] == 4
    assert set(a["benchmarks"]["hrbench_4k"]["metrics"]["categories"]) == {"single", "cross"}
    run = a["benchmarks"]["vstar"]["samples"][0]["runs"][0]
    assert run["turns"] >= 1 and (tmp_path / "a" / run["trajectory"]["dir"] / "trajectories.jsonl").exists()
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## hrbench_4k" in report and "direct_attributes" in report and "(plots/accuracy.png)" in report


@pytest.mark.slow
@pytest.mark.vllm
def test_openai_endpoint_path_against_a_real_vllm_server(vllm_server, tmp_path):
    bench = load_benchmark("synthetic:2", seed=0, synthetic_size=(320, 240))
    runner = EndpointRunner(vllm_server.base_url, concurrency=2)
    config = EvalConfig(max_turns=2, max_tokens=12, batch_size=2, synthetic_size=(320, 240))
    results = run_evaluation([bench], runner, tmp_path / "run", config=config, progress=False)
    samples = results["benchmarks"]["synthetic"]["samples"]
    assert len(samples) == 2
    assert runner.describe()["model"] == str(vllm_server.model_dir)
    for s in samples:
        run = s["runs"][0]
        assert run["turns"] >= 1 and run["end_reason"]  # vLLM answered with image data URLs in the request
    assert results["benchmarks"]["synthetic"]["metrics"]["overall"] is not None
