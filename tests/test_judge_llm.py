"""The LLM judge against a real fault-injection HTTP server on 127.0.0.1 (see tests/fault_server.py)."""

from __future__ import annotations

import asyncio
import pickle
import socket

import pytest
from fault_server import FaultServer

from deepeyes_envs.judges import (
    PROMPT_VERSION,
    JudgeError,
    JudgeRequest,
    JudgeUnavailableError,
    LLMJudge,
    build_prompt,
    parse_judgement,
)

# An answer the rules cannot be certain about, so the LLM is asked.
UNSURE = JudgeRequest(question="What colour is the car?", ground_truth="red", answer="It is a red car")


def unsure(i: int) -> JudgeRequest:
    return JudgeRequest(question=f"What colour is car {i}?", ground_truth="red", answer=f"crimson, number {i}")


@pytest.fixture
def server():
    with FaultServer(default="1") as srv:
        yield srv


def fast_judge(url: str, **kwargs) -> LLMJudge:
    kwargs = {"backoff_base": 0.01, "backoff_max": 0.05, "timeout": 5.0, **kwargs}
    return LLMJudge(base_url=url, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_prompt_layout_and_parsing_rules() -> None:
    prompt = build_prompt("Q?", "blue", "it is blue")
    assert prompt.endswith("[Question]: Q?\n[Standard Answer]: blue\n[Model_answer] : it is blue\nJudgement:")
    assert prompt.count("Judgement:") == 8  # seven worked examples, then the case
    assert parse_judgement("1") == (1.0, True)
    assert parse_judgement("Judgement: 0") == (0.0, True)
    assert parse_judgement("Judgement: 1 ... Judgement: 0") == (0.0, True)  # the last one counts
    assert parse_judgement("10") == (1.0, True)  # DeepEyes rule: any '1' wins
    assert parse_judgement("consistent") == (0.0, False)


def test_request_shape_and_lazy_model_discovery(server: FaultServer) -> None:
    judge = fast_judge(server.base_url, temperature=0.3, max_tokens=7)
    assert server.model_requests == 0  # construction touches no network
    verdict = judge.judge(UNSURE)
    assert (verdict.correct, verdict.source, verdict.raw) == (1.0, "llm", "1")
    assert server.model_requests == 1 and judge.model == server.model
    body = server.bodies[0]
    assert body["model"] == server.model and body["temperature"] == 0.3 and body["max_tokens"] == 7
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    assert body["messages"][1]["content"] == build_prompt(UNSURE.question, "red", UNSURE.answer)
    judge.judge(unsure(1))
    assert server.model_requests == 1  # discovered once


def test_base_url_from_environment(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_AS_A_JUDGE_BASE", f"http://127.0.0.1:{server.port}")  # "/v1" is added
    judge = LLMJudge()
    assert judge.base_url == server.base_url
    assert judge.judge(UNSURE).source == "llm"


def test_options_are_shown_to_the_judge(server: FaultServer) -> None:
    request = JudgeRequest("Which colour?", "B", "the second one", options=("red", "blue"))
    fast_judge(server.base_url).judge(request)
    assert "[Question]: Which colour?\n(A) red\n(B) blue\n" in server.prompts[0]


def test_certain_rules_skip_the_llm(server: FaultServer) -> None:
    judge = fast_judge(server.base_url)
    verdicts = judge.judge_batch(
        [
            JudgeRequest("q", "red", "Red."),
            JudgeRequest("q", "B", "(B) blue", options=("red", "blue")),
            JudgeRequest("q", "B", "A", options=("red", "blue")),
        ]
    )
    assert [(v.correct, v.source) for v in verdicts] == [(1.0, "rule"), (1.0, "rule"), (0.0, "rule")]
    assert server.chat_requests == 0 and judge.stats()["rule_decisions"] == 3


def test_garbage_replies_score_zero_and_are_counted(server: FaultServer) -> None:
    server.default = "I believe the answers are consistent."
    judge = fast_judge(server.base_url)
    verdict = judge.judge(UNSURE)
    assert (verdict.correct, verdict.source) == (0.0, "llm")
    assert judge.stats()["unparseable"] == 1 and judge.stats()["llm_decisions"] == 1


def test_transient_failures_are_retried(server: FaultServer) -> None:
    server.plan = ["status:500", "status:429", "drop", "status:503"]
    judge = fast_judge(server.base_url, max_retries=4, model="m")
    verdict = judge.judge(UNSURE)
    assert (verdict.correct, verdict.source) == (1.0, "llm")
    assert server.chat_requests == 5
    stats = judge.stats()
    assert stats["retries"] == 4 and stats["requests"] == 5 and stats["fallbacks"] == 0


def test_backoff_is_exponential_with_jitter_and_honours_retry_after() -> None:
    from deepeyes_envs.http import RetryPolicy

    class Fixed:  # the jitter's random draw, pinned to its ends
        def __init__(self, value: float) -> None:
            self.value = value

        def random(self) -> float:
            return self.value

    policy = RetryPolicy(max_retries=3, backoff_base=0.1, backoff_max=1.0)
    assert [policy.delay(k, rng=Fixed(1.0)) for k in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert [policy.delay(k, rng=Fixed(0.0)) for k in range(3)] == pytest.approx([0.05, 0.1, 0.2])
    assert policy.delay(0, http_error(429, {"retry-after": "0.7"}), rng=Fixed(0.0)) == pytest.approx(0.7)
    assert policy.delay(0, http_error(429, {"retry-after": "60"})) == pytest.approx(1.0)  # capped at backoff_max
    assert policy.delay(0, http_error(429, {"retry-after": "soon"}), rng=Fixed(1.0)) == pytest.approx(0.1)


def http_error(status: int, headers: dict[str, str]) -> Exception:
    """An HTTP error as the openai client raises it: only ``.response.headers`` is read."""
    from types import SimpleNamespace

    error = Exception(f"HTTP {status}")
    error.response = SimpleNamespace(status_code=status, headers=headers)
    return error


def test_client_errors_are_not_retried(server: FaultServer) -> None:
    server.default = "status:400"
    judge = fast_judge(server.base_url, model="m", max_retries=3)
    verdict = judge.judge(UNSURE)
    assert verdict.source == "fallback" and server.chat_requests == 1


def test_hang_times_out_then_falls_back_to_rules(server: FaultServer) -> None:
    server.default = "hang"
    judge = fast_judge(server.base_url, timeout=0.3, max_retries=1, on_failure="fallback")
    verdict = judge.judge(UNSURE)
    # the rule judge decides: "red" is contained in the answer
    assert (verdict.correct, verdict.source) == (1.0, "fallback")
    assert server.base_url in verdict.raw
    stats = judge.stats()
    assert stats["timeouts"] == 2 and stats["fallbacks"] == 1 and stats["errors"] == 1
    judge.judge(UNSURE)  # fallbacks are not cached: the judge asks again next time
    assert server.chat_requests == 4


def test_raise_policy_names_the_url(server: FaultServer) -> None:
    server.default = "status:500"
    judge = fast_judge(server.base_url, max_retries=2, on_failure="raise")
    with pytest.raises(JudgeError, match=server.base_url.replace(".", r"\.")):
        judge.judge(UNSURE)
    assert server.chat_requests == 3


@pytest.mark.parametrize("model", [None, "given-model"])
def test_nothing_listening_is_a_clear_error_at_first_call(model) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    judge = fast_judge(url, model=model, max_retries=1, on_failure="fallback")  # no error at construction
    with pytest.raises(JudgeUnavailableError) as info:
        judge.judge(UNSURE)
    assert url in str(info.value) and "LLM_AS_A_JUDGE_BASE" in str(info.value)


def test_no_url_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_AS_A_JUDGE_BASE", raising=False)
    with pytest.raises(JudgeUnavailableError, match="LLM_AS_A_JUDGE_BASE"):
        LLMJudge().judge(UNSURE)


def test_server_that_dies_later_falls_back() -> None:
    with FaultServer(default="1") as srv:
        judge = fast_judge(srv.base_url, max_retries=1)
        assert judge.judge(unsure(0)).source == "llm"
    verdict = judge.judge(unsure(1))  # the server is gone: a hiccup, not a configuration error
    assert verdict.source == "fallback" and judge.stats()["fallbacks"] == 1


def test_cache_hits_and_in_flight_deduplication(server: FaultServer) -> None:
    server.delay = 0.05
    judge = fast_judge(server.base_url)
    verdicts = judge.judge_batch([UNSURE] * 5)  # one request while the others wait for it
    assert server.chat_requests == 1
    assert sorted(v.source for v in verdicts) == ["cache"] * 4 + ["llm"]
    again = judge.judge(UNSURE)
    assert (again.source, again.correct, again.raw) == ("cache", 1.0, "1") and server.chat_requests == 1
    assert judge.stats()["cache_hits"] == 5
    other_model = fast_judge(server.base_url, model="another-judge")
    assert other_model.judge(UNSURE).source == "llm"  # the judge model is part of the key
    judge.judge(JudgeRequest(UNSURE.question, UNSURE.ground_truth, UNSURE.answer + "!"))
    assert server.chat_requests == 3
    assert PROMPT_VERSION  # the prompt version is the key's last part


def test_cache_can_be_disabled(server: FaultServer) -> None:
    judge = fast_judge(server.base_url, cache_size=0)
    judge.judge(UNSURE)
    judge.judge(UNSURE)
    assert server.chat_requests == 2


def test_concurrency_bound_is_respected(server: FaultServer) -> None:
    server.delay = 0.05
    judge = fast_judge(server.base_url, concurrency=5)
    verdicts = judge.judge_batch([unsure(i) for i in range(40)])
    assert all(v.source == "llm" for v in verdicts)
    assert server.max_in_flight == 5 and judge.stats()["in_flight_max"] == 5  # concurrent, and bounded


def test_counters(server: FaultServer) -> None:
    server.delay = 0.02
    server.plan = ["status:500"]
    judge = fast_judge(server.base_url)
    judge.judge_batch([UNSURE, UNSURE, JudgeRequest("q", "red", "red"), unsure(1)])
    stats = judge.stats()
    expected = {"rule_decisions": 1, "llm_decisions": 2, "cache_hits": 1, "retries": 1, "fallbacks": 0}
    assert {k: stats[k] for k in expected} == expected
    assert stats["requests"] == 4  # /models, two chats and one retry
    assert 0 < stats["latency_mean_s"] <= stats["latency_max_s"]
    judge.reset_stats()
    assert judge.stats()["llm_decisions"] == 0


def test_usable_inside_a_running_event_loop(server: FaultServer) -> None:
    """Jupyter runs an event loop: the blocking API must still work there, and the async one too."""
    judge = fast_judge(server.base_url)

    async def notebook_cell():
        blocking = judge.judge_batch([unsure(0)])
        awaited = await judge.ajudge_batch([unsure(1), unsure(0)])
        return blocking + awaited

    verdicts = asyncio.run(notebook_cell())
    assert [v.source for v in verdicts] == ["llm", "llm", "cache"]


def test_pickled_judge_works(server: FaultServer) -> None:
    judge = fast_judge(server.base_url)
    judge.judge(UNSURE)
    clone = pickle.loads(pickle.dumps(judge))
    assert clone.judge(unsure(3)).source == "llm" and clone.model == server.model
    judge.close()
    assert judge.judge(unsure(4)).source == "llm"  # a closed judge restarts its loop on demand
