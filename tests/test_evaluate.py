"""Evaluation: benchmark loaders on real files in the documented layouts, option shuffling, the eval judge,
and whole runs against a scripted OpenAI-compatible test server (a real HTTP server, tests/fault_server.py,
replying with scripted assistant turns), including resume."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fault_server import FaultServer
from PIL import Image

from deepeyes_agent.offline.benchmark_files import load_benchmark, load_hrbench, load_vstar, shuffle_options
from deepeyes_agent.offline.evaluate import EvalConfig, EvalJudge, benchmark_metrics, main, run_evaluation
from deepeyes_agent.rollout.runners import EndpointRunner
from deepeyes_agent.rollout.trajectory import load_trajectories
from deepeyes_envs.judges import JudgeRequest
from deepeyes_envs.rewards import grounding_iou
from deepeyes_envs.scripted import padded_box


# ---------------------------------------------------------------------------------------------- fixtures
def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_vstar(root: Path) -> Path:
    """A 4-sample V* Bench in the released layout: category folders, image + same-stem JSON."""
    specs = {
        "direct_attributes": [
            ("sa_1", {"question": "What is the color of the cup?", "options": ["red", "blue", "green", "white"],
                      "bbox": [[10, 12, 30, 20]], "target_object": ["cup"]}),
            ("sa_2", {"question": "What is the material of the glove?", "options": ["rubber", "cotton", "leather", "wool"],
                      "answer": "leather", "bbox": [[50, 5, 20, 40]]}),
        ],
        "relative_position": [
            ("sa_3", {"question": "Is the dog on the left or right side of the cat?", "options": ["left", "right"],
                      "bbox": [[0, 0, 40, 40], [60, 10, 30, 30]]}),
            ("sa_4", {"question": "Is the lamp on the left or right side of the bed?", "options": ["right", "left"]}),
        ],
    }
    for category, items in specs.items():
        (root / category).mkdir(parents=True)
        for i, (stem, ann) in enumerate(items):
            (root / category / f"{stem}.jpg").write_bytes(_png(120, 80, i))  # PNG bytes in a .jpg: PIL sniffs
            (root / category / f"{stem}.json").write_text(json.dumps(ann))
    return root


def make_hrbench(path: Path) -> Path:
    """A 4-row HR-Bench file with the released columns (base64 images, A-D, single/cross)."""
    rows = []
    for i in range(4):
        rows.append({"index": i, "question": f"Which sign is shown in region {i}?", "A": "stop", "B": "yield",
                     "C": "speed", "D": "exit", "answer": "ABCD"[i], "category": "single" if i < 2 else "cross",
                     "image": base64.b64encode(_png(100, 60, 10 + i)).decode()})
    frame = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t", index=False)
    return path


def test_vstar_loader_reads_the_released_layout(tmp_path):
    tasks = load_vstar(make_vstar(tmp_path / "vstar_bench"))
    assert [t.task_id for t in tasks] == ["vstar/direct_attributes/sa_1", "vstar/direct_attributes/sa_2",
                                          "vstar/relative_position/sa_3", "vstar/relative_position/sa_4"]
    first = tasks[0]
    assert first.answer == "A" and first.options == ("red", "blue", "green", "white")  # released: first is right
    assert tasks[1].answer == "C"  # an explicit answer text wins
    assert first.gt_boxes == ((10.0, 12.0, 40.0, 32.0),)  # [x, y, w, h] -> [x1, y1, x2, y2]
    assert len(tasks[2].gt_boxes) == 2 and tasks[3].gt_boxes == ()
    assert first.extra["category"] == "direct_attributes"
    assert "(B) blue" in first.question and first.load_images()[0].shape == (80, 120, 3)


@pytest.mark.parametrize("suffix", [".tsv", ".parquet"])
def test_hrbench_loader_reads_tsv_and_parquet(tmp_path, suffix):
    path = make_hrbench(tmp_path / f"hr_bench_4k{suffix}")
    bench = load_benchmark(f"hrbench:{path}", shuffle=False)
    assert bench.name == "hrbench_4k" and bench.overall == "category_mean"
    assert [t.answer for t in bench.tasks] == ["A", "B", "C", "D"]
    assert [t.extra["category"] for t in bench.tasks] == ["single", "single", "cross", "cross"]
    assert bench.tasks[2].load_images()[0].shape == (60, 100, 3)
    assert load_hrbench(path)[3].options == ("stop", "yield", "speed", "exit")


def test_option_shuffling_is_seeded_and_keeps_the_answer(tmp_path):
    root = make_vstar(tmp_path / "v")
    a = load_benchmark(f"vstar:{root}", seed=0).tasks
    b = load_benchmark(f"vstar:{root}", seed=0).tasks
    c = load_benchmark(f"vstar:{root}", seed=5).tasks
    assert [t.question for t in a] == [t.question for t in b]
    assert [t.options for t in a] != [t.options for t in c]
    for task in a + c:
        assert task.options[ord(task.answer) - ord("A")] == task.extra["answer_text"]
    synthetic = load_benchmark("synthetic:30", seed=1, synthetic_size=(320, 240)).tasks
    assert len({t.answer for t in synthetic}) > 1  # "A is always right" is gone
    again = shuffle_options(synthetic[0], 1)  # idempotent given the stored stem
    assert again.question.startswith(synthetic[0].extra["stem"])


def test_eval_judge_rules_then_option_text_containment():
    judge = EvalJudge()
    opts = ("red", "blue", "green", "white")

    def verdict(answer: str, truth: str = "B") -> float:
        return judge.judge(JudgeRequest("q", truth, answer, options=opts)).correct

    assert verdict("B") == 1.0 and verdict("(B)") == 1.0 and verdict("B. blue") == 1.0
    assert verdict("A") == 0.0
    assert verdict("The cup is blue.") == 1.0  # containment of the option text
    assert verdict("blue or red") == 0.0  # naming two options is not an answer
    assert verdict("no idea") == 0.0


# ---------------------------------------------------------------------------------------------- scripted server
def zoom(box) -> str:
    """A zoom turn as a server returns it: the stop string </tool_call> stripped, as the OpenAI API does."""
    call = {"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [round(v) for v in box]}}
    return f"<think>look closer</think>\n<tool_call>\n{json.dumps(call)}\n"


class Script:
    """Scripted assistant turns per question, served in order; reads the whole conversation from the
    server's recorded request body (episodes run one at a time, concurrency 1)."""

    def __init__(self, turns_by_question: dict[str, list[str]]):
        self.turns = turns_by_question
        self.server: FaultServer | None = None

    def __call__(self, _last: object) -> str:
        body = self.server.bodies[-1]
        user = body["messages"][1]["content"]
        text = "".join(p.get("text", "") for p in user) if isinstance(user, list) else user
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        for question, turns in self.turns.items():
            if question in text:
                return turns[min(turn, len(turns) - 1)]
        return "<answer>?</answer>"


def scripted_server(script: Script) -> FaultServer:
    server = FaultServer(default=script, model="scripted-policy")
    script.server = server
    return server


def _synthetic_scripts(tasks) -> dict[str, list[str]]:
    """Four behaviours over four tasks: zoom then right; right in words; bad zoom then wrong; bad JSON then right."""
    t0, t1, t2, t3 = tasks
    assert len({t.question for t in tasks}) == 4  # the script tells episodes apart by their question
    wrong = next(chr(65 + i) for i in range(len(t2.options)) if chr(65 + i) != t2.answer)
    return {
        t0.question: [zoom(padded_box(t0.gt_boxes[0], 448, 336)), f"<think>seen</think><answer>{t0.answer}</answer>"],
        t1.question: [f"<think>easy</think><answer>It is {t1.extra['answer_text']}.</answer>"],
        t2.question: [zoom((0, 0, 5, 5)), f"<answer>{wrong}</answer>"],
        t3.question: ['<tool_call>{"name": oops</tool_call>', f"<answer>({t3.answer})</answer>"],
    }


def test_endpoint_evaluation_metrics_trajectories_and_requests(tmp_path):
    bench = load_benchmark("synthetic:4", seed=0, synthetic_size=(448, 336))
    script = Script(_synthetic_scripts(bench.tasks))
    with scripted_server(script) as server:
        runner = EndpointRunner(server.base_url, concurrency=1)
        config = EvalConfig(max_turns=4, batch_size=2, synthetic_size=(448, 336))
        results = run_evaluation([bench], runner, tmp_path / "run", config=config, progress=False)
        bodies = list(server.bodies)
    m = results["benchmarks"]["synthetic"]["metrics"]
    samples = results["benchmarks"]["synthetic"]["samples"]
    assert [s["acc"] for s in samples] == [1.0, 1.0, 0.0, 1.0]
    assert m["overall"] == pytest.approx(0.75) and m["n"] == 4
    assert [s["runs"][0]["tool_calls"] for s in samples] == [1, 0, 1, 0]
    assert [s["runs"][0]["invalid_calls"] for s in samples] == [0, 0, 1, 1]
    assert m["tool_calls_per_sample"] == pytest.approx(0.5) and m["invalid_calls_per_sample"] == pytest.approx(0.5)
    box = [round(v) for v in padded_box(bench.tasks[0].gt_boxes[0], 448, 336)]
    assert m["n_iou_boxes"] == 1 and m["mean_iou"] == pytest.approx(grounding_iou(box, bench.tasks[0].gt_boxes))
    assert m["mean_iou"] > 0.05
    assert set(m["categories"]) <= {"attribute", "position"}
    # what went over the wire: greedy, both stops, the image as a lossless data URL, crops sent back
    first = bodies[0]
    assert first["temperature"] == 0.0 and {"</tool_call>", "<|im_end|>"} <= set(first["stop"])
    urls = [p["image_url"]["url"] for m_ in first["messages"] if isinstance(m_["content"], list)
            for p in m_["content"] if p["type"] == "image_url"]
    assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert decoded.size == (448, 336)
    second = next(b["messages"] for b in bodies if len(b["messages"]) > 2)  # a second turn (episodes interleave)
    assert second[2]["role"] == "assistant" and second[2]["content"].endswith("</tool_call>")  # restored
    assert sum(p["type"] == "image_url" for p in second[3]["content"]) == 1  # the crop went back
    # every sample points at its saved trajectory
    ref = samples[0]["runs"][0]["trajectory"]
    trajs = {t.uid: t for t in load_trajectories(tmp_path / "run" / ref["dir"])}
    assert trajs[ref["uid"]].turns[1].text.endswith(f"<answer>{bench.tasks[0].answer}</answer>")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| synthetic | 4 | 75.0 |" in report and "71.2" in report and "90.1" in report
    assert (tmp_path / "run" / "plots" / "accuracy.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["benchmarks"]["synthetic"]["metrics"]["overall"] == pytest.approx(0.75)


def test_endpoint_evaluation_resumes_without_replaying_finished_chunks(tmp_path):
    bench = load_benchmark("synthetic:4", seed=0, synthetic_size=(448, 336))
    script = Script(_synthetic_scripts(bench.tasks))
    config = EvalConfig(max_turns=4, batch_size=2, synthetic_size=(448, 336))
    with scripted_server(script) as server:
        runner = EndpointRunner(server.base_url, concurrency=1)
        partial = run_evaluation([bench], runner, tmp_path / "run", config=config, limit=2, progress=False)
        assert partial["benchmarks"]["synthetic"]["metrics"]["n"] == 2
        after_first = server.chat_requests
        full = run_evaluation([bench], runner, tmp_path / "run", config=config, progress=False)
        second_run = server.chat_requests - after_first
    assert after_first == 3  # sample 0: zoom + answer; sample 1: one answer
    assert second_run == 4  # only samples 2 and 3 were played
    assert [s["acc"] for s in full["benchmarks"]["synthetic"]["samples"]] == [1.0, 1.0, 0.0, 1.0]
    with pytest.raises(RuntimeError, match="other settings"):
        run_evaluation([bench], runner, tmp_path / "run", config=EvalConfig(max_turns=3, batch_size=2),
                       progress=False)


def test_command_line_on_fake_vstar_and_hrbench_with_the_scripted_server(tmp_path, capsys):
    vstar = make_vstar(tmp_path / "vstar_bench")
    hr = make_hrbench(tmp_path / "hr_bench_8k.tsv")
    # answer "A" to everything: right exactly where shuffling put the correct option first
    with FaultServer(default="<think>guess</think><answer>A</answer>") as server:
        rc = main(["--endpoint", server.base_url, "--benchmark", f"vstar:{vstar}", "--benchmark", f"hrbench:{hr}",
                   "--out", str(tmp_path / "out"), "--no-progress", "--batch-size", "3"])
    assert rc == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for name, bench in results["benchmarks"].items():
        expected = [1.0 if s["answer"] == "A" else 0.0 for s in bench["samples"]]
        assert [s["acc"] for s in bench["samples"]] == expected, name
    hrm = results["benchmarks"]["hrbench_8k"]["metrics"]
    assert hrm["overall"] == pytest.approx(np.mean([v["acc"] for v in hrm["categories"].values()]))
    assert set(hrm["categories"]) == {"single", "cross"}
    vs = results["benchmarks"]["vstar"]["metrics"]
    assert set(vs["categories"]) == {"direct_attributes", "relative_position"} and vs["overall"] == vs["micro"]
    assert "report:" in capsys.readouterr().out


def test_metrics_avg_at_k_and_pass_at_k():
    def rec(cat, accs):
        runs = [{"acc": a, "tool_calls": 1, "invalid_calls": 0, "ious": [0.5], "turns": 2, "end_reason": "answer"}
                for a in accs]
        return {"category": cat, "acc": float(np.mean(accs)), "pass": float(max(accs)), "runs": runs}

    records = [rec("single", [1, 0]), rec("single", [0, 0]), rec("cross", [1, 1])]
    m = benchmark_metrics(records, "category_mean", k=2)
    assert m["categories"]["single"]["acc"] == pytest.approx(0.25) and m["categories"]["cross"]["acc"] == 1.0
    assert m["overall"] == pytest.approx(0.625) and m["micro"] == pytest.approx(0.5)
    assert m["pass_at_k"] == pytest.approx(2 / 3) and m["mean_iou"] == pytest.approx(0.5)
