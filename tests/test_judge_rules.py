"""The rule judge, its certainty, and the judge factory."""

from __future__ import annotations

import pytest

from deepeyes_envs.judges import (
    Judge,
    JudgeRequest,
    LLMJudge,
    MathJudge,
    RuleJudge,
    make_judge,
    match_rules,
    normalize_text,
    option_letter,
    parse_number,
    rule_verdict,
)

OPTIONS = ("red", "blue", "green", "yellow")


def req(answer: str, truth: str, options=None, question: str = "What colour is the car?") -> JudgeRequest:
    return JudgeRequest(question=question, ground_truth=truth, answer=answer, options=options)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("The Red car.", "red car"), ("  An   apple!! ", "apple"), ("a, b; c", "b c"), ("It's BLUE", "it s blue")],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("1,234", 1234.0), ("3.50", 3.5), ("-2", -2.0), ("45%", 45.0), ("$7", 7.0), ("3/4", 0.75), ("1e3", 1000.0)],
)
def test_parse_number(text: str, value: float) -> None:
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["3 apples", "two", "1/0", "", "nan", "1.2.3"])
def test_parse_number_rejects_non_numbers(text: str) -> None:
    assert parse_number(text) is None


@pytest.mark.parametrize(
    ("text", "options", "letter"),
    [
        ("B", None, "B"),
        ("(B)", None, "B"),
        ("B.", None, "B"),
        ("B. blue", OPTIONS, "B"),
        ("(C) green", OPTIONS, "C"),
        ("b", None, "B"),
        ("The answer is D", None, "D"),
        ("yellow", OPTIONS, "D"),
        ("Blue.", OPTIONS, "B"),
        ("E", OPTIONS, None),  # outside the option list
        ("A red car", None, None),  # an article, not option A
        ("B. green", OPTIONS, None),  # the letter and its text disagree: no certain letter
        ("red", None, None),
    ],
)
def test_option_letter(text: str, options, letter) -> None:
    assert option_letter(text, options) == letter


@pytest.mark.parametrize(
    ("answer", "truth", "options", "correct", "rule"),
    [
        ("B", "B", OPTIONS, True, "letter"),
        ("(B)", "B", OPTIONS, True, "letter"),
        ("B. blue", "B", OPTIONS, True, "letter"),
        ("blue", "B", OPTIONS, True, "letter"),  # option text vs letter
        ("B", "blue", OPTIONS, True, "letter"),  # letter vs option text
        ("C", "B", OPTIONS, False, "letter"),  # a certain mismatch
        ("The Red.", "red", None, True, "exact"),
        ("1,000", "1000", None, True, "numeric"),
        ("0.5", "1/2", None, True, "numeric"),
        ("3", "4", None, False, "numeric"),
    ],
)
def test_certain_rules(answer: str, truth: str, options, correct: bool, rule: str) -> None:
    match = match_rules(req(answer, truth, options))
    assert (match.correct, match.certain, match.rule) == (correct, True, rule)
    verdict = rule_verdict(req(answer, truth, options))
    assert verdict is not None and verdict.source == "rule" and verdict.correct == float(correct)


@pytest.mark.parametrize(
    ("answer", "truth", "options", "correct"),
    [
        ("The car is red.", "red", None, True),
        ("It is not clear, maybe reddish", "red", None, False),  # "reddish" is not the word "red"
        ("red or blue", "red", OPTIONS, False),  # naming two options does not count
        ("There are 3 cars", "3", None, True),
        ("crimson", "red", None, False),
    ],
)
def test_uncertain_rules_defer_to_llm(answer: str, truth: str, options, correct: bool) -> None:
    match = match_rules(req(answer, truth, options))
    assert match.correct == correct and not match.certain
    assert rule_verdict(req(answer, truth, options)) is None


def test_rule_judge_scores_and_containment_switch() -> None:
    assert RuleJudge().judge(req("The car is red.", "red")).correct == 1.0
    strict = RuleJudge(containment=False).judge(req("The car is red.", "red"))
    assert (strict.correct, strict.source) == (0.0, "rule")
    assert RuleJudge().judge_batch([req("B", "B", OPTIONS), req("A", "B", OPTIONS)]) == [
        RuleJudge().judge(req("B", "B", OPTIONS)),
        RuleJudge().judge(req("A", "B", OPTIONS)),
    ]
    assert RuleJudge().judge(req("", "red")).correct == 0.0


def test_make_judge_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_AS_A_JUDGE_BASE", raising=False)
    assert isinstance(make_judge("rule"), RuleJudge) and isinstance(make_judge(None), RuleJudge)
    llm = make_judge({"type": "llm", "base_url": "http://127.0.0.1:1/v1", "on_failure": "raise", "model": "m"})
    assert isinstance(llm, LLMJudge) and llm.on_failure == "raise" and llm.base_url == "http://127.0.0.1:1/v1"
    math = make_judge({"type": "math", "fallback": {"type": "rule", "containment": False}})
    assert isinstance(math, MathJudge) and isinstance(math.fallback, RuleJudge) and not math.fallback.containment
    mine = RuleJudge()
    assert make_judge(mine) is mine
    assert isinstance(make_judge("llm"), Judge)  # no URL yet: constructing never connects nor fails
    with pytest.raises(ValueError, match="unknown judge type"):
        make_judge("oracle")
    with pytest.raises(ValueError, match="on_failure"):
        make_judge({"type": "llm", "on_failure": "ignore"})
