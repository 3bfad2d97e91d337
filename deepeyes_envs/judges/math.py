"""Math answers: ``\\boxed{}`` extraction and symbolic equivalence with ``math-verify``.

DeepEyes scores its math rows (``thinklite_eureka``) on the last ``\\boxed{...}`` after the last
``</think>``: none means accuracy 0 and a format error, several mean a format error. :func:`extract_boxed`
reports all of that so the reward can apply those rules. :class:`MathJudge` then compares the boxed text with
the ground truth symbolically ("\\frac12" equals "0.5", "2\\sqrt2" equals "\\sqrt8") and hands whatever
math-verify cannot decide (plain words, unparseable text) to a fallback judge, the LLM judge in training.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from .base import Judge, JudgeRequest, Verdict
from .rules import RuleJudge

__all__ = ["BoxedAnswers", "find_boxed", "boxed_answers", "extract_boxed", "MathJudge"]

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\b")


@dataclass(frozen=True)
class BoxedAnswers:
    """Every boxed text after the last ``</think>``, in order. ``answer`` is the last one (None if none);
    ``format_error`` is True unless there is exactly one."""

    answers: tuple[str, ...]

    @property
    def answer(self) -> Optional[str]:
        return self.answers[-1] if self.answers else None

    @property
    def count(self) -> int:
        return len(self.answers)

    @property
    def format_error(self) -> bool:
        return self.count != 1


def _braced(text: str, open_at: int) -> Optional[tuple[str, int]]:
    """The text inside the brace group opening at ``open_at`` and the index after it; None if unclosed.
    Escaped braces (``\\{``) do not count, so ``\\boxed{\\{1,2\\}}`` gives ``\\{1,2\\}``."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
        i += 1
    return None


def find_boxed(text: str) -> list[str]:
    """All ``\\boxed{...}`` (and ``\\fbox{...}``, and the brace-less ``\\boxed 5``) contents, nested braces
    handled; an unclosed box is ignored."""
    found: list[str] = []
    pos = 0
    while True:
        match = _BOX_COMMAND.search(text, pos)
        if match is None:
            return found
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            group = _braced(text, i)
            if group is None:
                pos = i + 1
                continue
            content, pos = group
            found.append(content.strip())
        else:
            token = re.match(r"[^\s$]+", text[i:])
            if token and i > match.end():
                found.append(token.group(0))
            pos = i + (token.end() if token else 1)


boxed_answers = find_boxed  # the name deepeyes_envs.rewards imports


def extract_boxed(text: str) -> BoxedAnswers:
    """The boxed answers after the last ``</think>`` (the whole text when there is none)."""
    return BoxedAnswers(tuple(find_boxed(text.rsplit("</think>", 1)[-1])))


class _QuietTimeoutWarning(logging.Filter):
    """math-verify warns on every call made without its signal-based timeout, which threads must do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


_quiet_installed = False


def _math_verify() -> Any:
    """Import math-verify on first use (sympy and the LaTeX parser take a while to import)."""
    global _quiet_installed
    import math_verify

    if not _quiet_installed:
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_QuietTimeoutWarning())
        _quiet_installed = True
    return math_verify


def _looks_mathematical(text: str) -> bool:
    """Digits, LaTeX commands or operators: something math-verify reads as math. Plain words ("yes",
    "blue", "B") are not: math-verify would parse them as products of symbols, so "yes" would equal "sey"."""
    return bool(re.search(r"[0-9\\^_=+*/<>]", text))


class MathJudge(Judge):
    """Symbolic equivalence with math-verify (source "math"); undecidable cases go to ``fallback``.

    Args:
        fallback: the judge for what math-verify cannot decide (default: :class:`RuleJudge`); in training
            pass the LLM judge. Its batch API is used, so undecided answers are judged concurrently.
        fallback_on_mismatch: also ask ``fallback`` when both sides parse but differ (catches math-verify's
            false negatives, e.g. an answer with words around the number, at the cost of more LLM calls).
        timeout_seconds: math-verify's own timeout; it relies on SIGALRM, so it is used on the main thread
            only (other threads run without it).
    """

    name = "math"

    def __init__(
        self, fallback: Optional[Judge] = None, *, fallback_on_mismatch: bool = False, timeout_seconds: int = 5
    ) -> None:
        self.fallback = fallback if fallback is not None else RuleJudge()
        self.fallback_on_mismatch = fallback_on_mismatch
        self.timeout_seconds = timeout_seconds

    def decide(self, request: JudgeRequest) -> Optional[Verdict]:
        """math-verify's verdict, or None when it cannot decide."""
        answer, truth = request.answer.strip(), request.ground_truth.strip()
        if not answer:
            return Verdict(0.0, "math", raw="empty answer")
        if not (_looks_mathematical(truth) and _looks_mathematical(answer)):
            return None
        mv = _math_verify()
        main = threading.current_thread() is threading.main_thread()
        timeout = self.timeout_seconds if main else None
        try:
            gold = mv.parse(_as_boxed(truth), parsing_timeout=timeout)
            pred = mv.parse(_as_boxed(answer), parsing_timeout=timeout)
            if not gold or not pred:
                return None
            if mv.verify(gold, pred, timeout_seconds=timeout):
                return Verdict(1.0, "math", raw=str(pred[0]))
        except Exception:  # math-verify raises on timeouts and odd input: treat as undecided
            return None
        return None if self.fallback_on_mismatch else Verdict(0.0, "math", raw=str(pred[0]))

    def judge(self, request: JudgeRequest) -> Verdict:
        verdict = self.decide(request)
        return verdict if verdict is not None else self.fallback.judge(request)

    def judge_batch(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        decided: list[Optional[Verdict]] = [self.decide(r) for r in requests]
        undecided = [i for i, v in enumerate(decided) if v is None]
        if undecided:
            for i, verdict in zip(undecided, self.fallback.judge_batch([requests[i] for i in undecided]), strict=True):
                decided[i] = verdict
        return [v for v in decided if v is not None]

    def __repr__(self) -> str:
        return f"MathJudge(fallback={self.fallback!r})"


def _as_boxed(text: str) -> str:
    """Box a bare answer so that math-verify reads all of it, not the first number it finds."""
    return text if _BOX_COMMAND.search(text) else "\\boxed{" + text + "}"
