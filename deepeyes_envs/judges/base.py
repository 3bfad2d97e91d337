"""The judge interface: decide whether a model's answer matches the ground truth."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class JudgeRequest:
    """What a judge needs to score one answer. ``options`` are multiple-choice texts, letter order."""

    question: str
    ground_truth: str
    answer: str
    options: Optional[tuple[str, ...]] = None
    data_source: str = ""


@dataclass(frozen=True)
class Verdict:
    """A judge's decision. ``correct`` is 0.0 or 1.0; ``source`` names who decided
    ("rule", "llm", "cache", "fallback", "math"); ``raw`` is the judge's reply when there was one."""

    correct: float
    source: str
    raw: Optional[str] = None


class Judge(ABC):
    """Scores answers. Subclasses implement :meth:`judge`; batch-capable judges override
    :meth:`judge_batch` to score many requests concurrently."""

    name: str = "judge"

    @abstractmethod
    def judge(self, request: JudgeRequest) -> Verdict:
        """Score one answer."""

    def judge_batch(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        """Score many answers; the default asks one at a time."""
        return [self.judge(r) for r in requests]
