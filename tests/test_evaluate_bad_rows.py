"""A benchmark row whose image does not decode is counted and listed, never a crash, and never scored: through
an OpenAI-compatible endpoint (a real HTTP server, tests/fault_server.py) exactly as through the local loop."""

from __future__ import annotations

import json

from fault_server import FaultServer
from test_evaluate import make_vstar

from deepeyes_agent.offline.benchmark_files import load_benchmark
from deepeyes_agent.offline.evaluate import EvalConfig, run_evaluation
from deepeyes_agent.rollout.runners import EndpointRunner, local_runner

BAD = "vstar/direct_attributes/sa_2"


def _vstar_with_a_bad_image(tmp_path):
    root = make_vstar(tmp_path / "vstar_bench")
    (root / "direct_attributes" / "sa_2.jpg").write_bytes(b"these bytes are not an image")
    return load_benchmark(f"vstar:{root}", seed=0)


def _check(results, out):
    metrics = results["benchmarks"]["vstar"]["metrics"]
    assert metrics["skipped_rows"] == 1 and metrics["n"] == 3  # scored: the three good rows only
    (bad,) = metrics["bad_rows"]
    assert bad["task_id"] == BAD and "sa_2" in bad["error"]
    assert metrics["end_reasons"].get("bad_task") is None  # the bad row's episode is not among the scored ones
    samples = {s["task_id"]: s for s in results["benchmarks"]["vstar"]["samples"]}
    assert samples[BAD]["runs"][0]["end_reason"] == "bad_task" and "bad_row" in samples[BAD]
    report = (out / "report.md").read_text()
    assert "1 row(s) could not be played and are not scored" in report and f"`{BAD}`" in report
    assert json.loads((out / "results.json").read_text())["benchmarks"]["vstar"]["metrics"]["skipped_rows"] == 1
    return {t: s["runs"][0]["end_reason"] for t, s in samples.items()}


def test_endpoint_player_counts_and_lists_a_bad_row(tmp_path):
    bench = _vstar_with_a_bad_image(tmp_path)
    with FaultServer(default="<think>guess</think><answer>A</answer>", model="scripted-policy") as server:
        runner = EndpointRunner(server.base_url, concurrency=2)
        results = run_evaluation([bench], runner, tmp_path / "run", config=EvalConfig(max_turns=2, batch_size=4),
                                 progress=False)
        runner.close()
        requests = server.chat_requests
    ends = _check(results, tmp_path / "run")
    assert requests == 3  # one answer per good row; nothing was sent for the bad one
    assert ends == {**{t: "answer" for t in ends if t != BAD}, BAD: "bad_task"}


def test_local_loop_counts_and_lists_the_same_bad_row(tmp_path, tiny_model_dir):
    bench = _vstar_with_a_bad_image(tmp_path)
    runner = local_runner(tiny_model_dir)
    try:
        results = run_evaluation([bench], runner, tmp_path / "run", progress=False,
                                 config=EvalConfig(max_turns=1, max_tokens=4, batch_size=4))
    finally:
        runner.close()
    assert _check(results, tmp_path / "run")[BAD] == "bad_task"
