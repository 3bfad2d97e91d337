"""Data selection: rules, pass rates measured against a scripted OpenAI-compatible test server (a real HTTP
server, tests/fault_server.py, whose replies are chosen per question and per mode), verbatim parquet output,
the report, resuming, and determinism with the tiny model."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fault_server import FaultServer

from deepeyes_agent.offline.chunk_log import ChunkLog, SettingsMismatchError
from deepeyes_agent.offline.selection import SelectionConfig, SelectionRules, main, run_selection
from deepeyes_agent.rollout.runners import EndpointRunner
from deepeyes_envs.data.parquet import write_deepeyes_parquet
from deepeyes_envs.synthetic import SyntheticTaskSource


def _rec(p_tools: float, p_plain: float, status: str = "measured") -> dict:
    return {"status": status, "pass_tools": p_tools, "pass_plain": p_plain}


def test_rules_band_plain_fails_tools_help_and_combination():
    default = SelectionRules()
    assert default.keep(_rec(0.25, 0.0))
    assert not default.keep(_rec(0.0, 0.0))  # never right: no signal
    assert not default.keep(_rec(0.5, 0.0))  # the band is strict at both ends
    assert not default.keep(_rec(0.25, 0.25))  # one-turn answers do not all fail
    assert not default.keep(_rec(0.25, 0.0, status="small_image"))
    helps = SelectionRules(band=None, plain_max=None, tools_help=True)
    assert helps.keep(_rec(0.75, 0.5)) and not helps.keep(_rec(0.5, 0.5))
    either = SelectionRules(band=(0.0, 0.5), plain_max=None, tools_help=True, combine="any")
    assert either.keep(_rec(1.0, 0.0)) and either.keep(_rec(0.25, 0.5)) and not either.keep(_rec(0.0, 0.5))
    assert SelectionRules(band=None, plain_max=None).keep(_rec(1.0, 1.0))  # no rule: keep everything measured
    with pytest.raises(ValueError):
        SelectionRules(band=(0.5, 0.1))


def test_results_log_drops_a_torn_last_line_and_refuses_other_settings(tmp_path):
    path = tmp_path / "progress.jsonl"
    log = ChunkLog(path, {"k": 4})
    log.append([{"row": 0, "chunk": 0}, {"chunk_done": 0}])
    with open(path, "a") as fh:
        fh.write('{"row": 1, "chu')  # what a kill in the middle of a write leaves
    again = ChunkLog(path, {"k": 4})
    assert again.records == [{"row": 0, "chunk": 0}, {"chunk_done": 0}]
    again.append([{"row": 1, "chunk": 1}])
    assert [json.loads(x) for x in path.read_text().splitlines()][-1] == {"row": 1, "chunk": 1}
    with pytest.raises(SettingsMismatchError, match="k: 4 -> 8"):
        ChunkLog(path, {"k": 8})


# ---------------------------------------------------------------------------------------------- scripted policy
def _dataset(path: Path, n: int = 5, small_row: int = 3) -> list:
    src = SyntheticTaskSource(n=n, seed=4, kind="visual_search", width=224, height=168)
    tasks = [dataclasses.replace(src[i], question=f"Sample {i}. {src[i].question}",
                                 data_source="vstar" if i % 2 == 0 else "chart") for i in range(n)]
    if small_row is not None:
        tasks[small_row] = dataclasses.replace(tasks[small_row], images=(np.zeros((20, 100, 3), np.uint8),))
    write_deepeyes_parquet(tasks, path, row_group_size=2)
    return tasks


class ModeScript:
    """Replies per (sample, with tools or not), in order: 'R' answers right, 'W' wrong. Tools mode is told
    apart by the tool-advertising system prompt; the whole request is read from the server's record."""

    def __init__(self, tasks, plan: dict[int, tuple[str, str]]):
        self.tasks, self.plan = tasks, plan
        self.served: dict[tuple[int, bool], int] = defaultdict(int)
        self.server: FaultServer | None = None

    def __call__(self, _last: object) -> str:
        messages = self.server.bodies[-1]["messages"]
        tools = "image_zoom_in_tool" in messages[0]["content"]
        user = messages[1]["content"]
        text = "".join(p.get("text", "") for p in user) if isinstance(user, list) else user
        i = next(i for i in self.plan if f"Sample {i}." in text)
        seq = self.plan[i][0 if tools else 1]
        n = self.served[(i, tools)]
        self.served[(i, tools)] += 1
        right = seq[n % len(seq)] == "R"
        answer = self.tasks[i].answer if right else next(c for c in "ABCD" if c != self.tasks[i].answer)
        return f"<think>ok</think><answer>{answer}</answer>"


PLAN = {0: ("RWWW", "WWWW"), 1: ("RRRR", "WWWW"), 2: ("RWWW", "RWWW"), 3: ("RRRR", "WWWW"), 4: ("WWWW", "RRWW")}


def test_selection_keeps_by_rule_copies_rows_verbatim_and_reports(tmp_path):
    data = tmp_path / "train.parquet"
    tasks = _dataset(data)
    script = ModeScript(tasks, PLAN)
    with FaultServer(default=script, model="scripted-policy") as server:
        script.server = server
        runner = EndpointRunner(server.base_url, concurrency=1)
        config = SelectionConfig(k=4, batch_size=2)
        try:
            result = run_selection(data, tmp_path / "out.parquet", runner, config=config, progress=False)
            requests = server.chat_requests
            # other rules: re-filtered from the recorded pass rates, not one episode played again
            other = run_selection(data, tmp_path / "out2.parquet", runner, config=config, progress=False,
                                  work_dir=tmp_path / "out_selection", rules=SelectionRules(
                                      band=(0.0, 0.5), plain_max=None, tools_help=True, combine="any"))
        finally:
            runner.close()
        assert server.chat_requests == requests
    assert requests == 4 * 4 * 2  # row 3 (a 20 px image) was never played
    by_row = {r["row"]: r for r in result.records}
    assert by_row[3]["status"] == "small_image" and by_row[3]["min_side"] == 20
    assert [(by_row[i]["pass_tools"], by_row[i]["pass_plain"]) for i in (0, 1, 2, 4)] == [
        (0.25, 0.0), (1.0, 0.0), (0.25, 0.25), (0.0, 0.5)]
    assert result.kept_rows == [0]
    assert other.kept_rows == [0, 1, 2]
    # the output holds the kept input rows, cell for cell, with the input schema
    src, out = pq.read_table(data), pq.read_table(tmp_path / "out2.parquet")
    assert out.schema == src.schema
    assert out.to_pylist() == [src.to_pylist()[i] for i in (0, 1, 2)]
    report = result.report  # the second run rewrote report.md with its own rules
    assert "| `band` | 2 | 2 |" in report and "| `plain_fails` | 2 | 2 |" in report
    assert "| image side >= 28 px | 4 | 1 |" in report and "| **kept** | 1 | 4 |" in report
    assert "| vstar | 3 | 0 | 3 |" in report and "| chart | 2 | 1 | 1 |" in report
    assert (result.report_path.parent / "pass_rates.png").stat().st_size > 1000


@pytest.mark.slow
def test_tiny_model_selection_resumes_to_the_same_output_as_an_uninterrupted_run(tmp_path, tiny_model_dir, capsys):
    import torch

    torch.set_num_threads(2)
    data = tmp_path / "train.parquet"
    _dataset(data, n=5, small_row=None)
    common = ["--policy", str(tiny_model_dir), "--data", str(data), "--k", "2", "--batch-size", "2",
              "--max-tokens", "6", "--max-turns", "2", "--seed", "3", "--no-band", "--no-progress"]
    # interrupted: a first invocation stops after one chunk, the second continues
    assert main([*common, "--out", str(tmp_path / "a.parquet"), "--limit", "2"]) == 0
    log = tmp_path / "a_selection" / "progress.jsonl"
    assert sum("chunk_done" in line for line in log.read_text().splitlines()) == 1
    assert "partial run" in (tmp_path / "a_selection" / "report.md").read_text()
    assert main([*common, "--out", str(tmp_path / "a.parquet")]) == 0
    assert main([*common, "--out", str(tmp_path / "b.parquet")]) == 0  # uninterrupted
    assert "kept" in capsys.readouterr().out

    def measured(name: str) -> list:
        lines = (tmp_path / f"{name}_selection" / "progress.jsonl").read_text().splitlines()[1:]
        rows = [json.loads(x) for x in lines]
        return sorted([r["row"], r["acc_tools"], r["acc_plain"], r["tool_calls"]] for r in rows if "row" in r)

    assert measured("a") == measured("b") and len(measured("a")) == 5
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    with pytest.raises(SettingsMismatchError):
        main([*common[:-1], "--seed", "4", "--out", str(tmp_path / "a.parquet")])
