"""\\boxed{} extraction and math-verify equivalence with a fallback judge."""

from __future__ import annotations

import threading

import pytest

from deepeyes_envs.judges import Judge, JudgeRequest, MathJudge, Verdict, extract_boxed, find_boxed


class RecordingJudge(Judge):
    """A fallback that records what it was asked and answers 1 (a stand-in for the LLM judge)."""

    name = "recording"

    def __init__(self) -> None:
        self.batches: list[list[JudgeRequest]] = []

    def judge(self, request: JudgeRequest) -> Verdict:
        return self.judge_batch([request])[0]

    def judge_batch(self, requests):
        self.batches.append(list(requests))
        return [Verdict(1.0, "llm", raw="1") for _ in requests]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("x \\boxed{5}", ["5"]),
        ("\\boxed{\\frac{1}{2}} and \\boxed{3}", ["\\frac{1}{2}", "3"]),
        ("\\boxed{\\{1, 2\\}}", ["\\{1, 2\\}"]),  # escaped braces do not close the box
        ("\\boxed{a^{2^{3}}}", ["a^{2^{3}}"]),
        ("\\boxed 7 apples", ["7"]),
        ("\\fbox{x}", ["x"]),
        ("\\boxed{unclosed", []),
        ("no box", []),
    ],
)
def test_find_boxed(text: str, found: list[str]) -> None:
    assert find_boxed(text) == found


def test_extract_boxed_after_last_think() -> None:
    one = extract_boxed("<think>maybe \\boxed{1}</think> so \\boxed{2}")
    assert (one.answer, one.count, one.format_error) == ("2", 1, False)
    none = extract_boxed("<think>\\boxed{1}</think> the answer is two")
    assert (none.answer, none.format_error) == (None, True)
    several = extract_boxed("</think>\\boxed{1} or \\boxed{2}")
    assert (several.answer, several.count, several.format_error) == ("2", 2, True)


@pytest.mark.parametrize(
    ("answer", "truth", "correct"),
    [
        ("\\frac{1}{2}", "0.5", 1.0),
        ("2\\sqrt{2}", "\\sqrt{8}", 1.0),
        ("x^2+1", "1+x^2", 1.0),
        ("\\frac34", "3/4", 1.0),
        ("12", "13", 0.0),
        ("", "3", 0.0),
    ],
)
def test_math_verify_decides(answer: str, truth: str, correct: float) -> None:
    fallback = RecordingJudge()
    verdict = MathJudge(fallback=fallback).judge(JudgeRequest("q", truth, answer))
    assert (verdict.correct, verdict.source) == (correct, "math")
    assert fallback.batches == []


def test_undecidable_goes_to_fallback_in_one_batch() -> None:
    fallback = RecordingJudge()
    judge = MathJudge(fallback=fallback)
    requests = [
        JudgeRequest("q", "yes", "Yes"),  # words: math-verify would read "yes" as a product of symbols
        JudgeRequest("q", "4", "4"),
        JudgeRequest("q", "B", "B"),
        JudgeRequest("q", "7", "seven"),  # unparseable answer
    ]
    verdicts = judge.judge_batch(requests)
    assert [v.source for v in verdicts] == ["llm", "math", "llm", "llm"]
    assert [len(b) for b in fallback.batches] == [3]


def test_mismatch_can_be_rechecked_by_fallback() -> None:
    fallback = RecordingJudge()
    verdict = MathJudge(fallback=fallback, fallback_on_mismatch=True).judge(JudgeRequest("q", "13", "12"))
    assert verdict.source == "llm" and len(fallback.batches) == 1


def test_works_off_the_main_thread() -> None:
    """math-verify's timeout uses SIGALRM, which only the main thread may use: threads must still work."""
    results: list[Verdict] = []
    worker = threading.Thread(target=lambda: results.append(MathJudge().judge(JudgeRequest("q", "0.5", "1/2"))))
    worker.start()
    worker.join()
    assert results and results[0].correct == 1.0
