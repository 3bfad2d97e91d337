"""Judges: decide whether an answer matches the ground truth (rules, an LLM, math equivalence).

Every judge has ``judge(JudgeRequest) -> Verdict`` and ``judge_batch``; the verdict's ``source`` says who
decided ("rule", "llm", "cache", "fallback", "math"). :func:`make_judge` builds one from a config value.
Importing this package touches no network and imports neither openai nor math-verify (both load on first use).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from .base import Judge, JudgeRequest, Verdict
from .llm import ENV_API_KEY, ENV_BASE_URL, JudgeError, JudgeUnavailableError, LLMJudge
from .math import BoxedAnswers, MathJudge, boxed_answers, extract_boxed, find_boxed
from .prompt import PROMPT_VERSION, build_prompt, parse_judgement
from .rules import RuleJudge, RuleMatch, match_rules, normalize_text, option_letter, parse_number, rule_verdict

__all__ = [
    "Judge",
    "JudgeRequest",
    "Verdict",
    "RuleJudge",
    "RuleMatch",
    "match_rules",
    "rule_verdict",
    "normalize_text",
    "option_letter",
    "parse_number",
    "LLMJudge",
    "JudgeError",
    "JudgeUnavailableError",
    "ENV_BASE_URL",
    "ENV_API_KEY",
    "PROMPT_VERSION",
    "build_prompt",
    "parse_judgement",
    "MathJudge",
    "BoxedAnswers",
    "extract_boxed",
    "find_boxed",
    "boxed_answers",
    "make_judge",
    "JudgeSpec",
]

JudgeSpec = Union[None, str, Mapping[str, Any], Judge]

_TYPES = {"rule": RuleJudge, "llm": LLMJudge, "math": MathJudge}


def make_judge(spec: JudgeSpec = "rule") -> Judge:
    """Build a judge from a config value.

    ``spec`` is a judge instance (returned as is), ``None`` or ``"rule"``, ``"llm"`` (URL from
    ``$LLM_AS_A_JUDGE_BASE``, model from ``/models``), ``"math"`` (math-verify, rules as fallback), or a dict
    with ``"type"`` and that judge's keyword arguments, e.g.
    ``{"type": "llm", "base_url": "http://127.0.0.1:8000/v1", "on_failure": "fallback"}`` or
    ``{"type": "math", "fallback": {"type": "llm"}}``. Nothing connects until the first judgement.
    """
    if isinstance(spec, Judge):
        return spec
    if spec is None:
        return RuleJudge()
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise TypeError(f"a judge spec is a name, a dict or a Judge, not {type(spec).__name__}")
    kwargs = dict(spec)
    kind = kwargs.pop("type", None)
    if kind not in _TYPES:
        raise ValueError(f"unknown judge type {kind!r}; expected one of {sorted(_TYPES)}")
    if "fallback" in kwargs and kind in ("llm", "math"):
        kwargs["fallback"] = make_judge(kwargs["fallback"])
    return _TYPES[kind](**kwargs)
