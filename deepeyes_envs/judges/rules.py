"""The rule judge: cheap, deterministic matching of an answer against the ground truth.

Rules run before any LLM is asked. Some rule outcomes are *certain* (the normalised texts are equal, the
same number is written two ways, or both sides name a multiple-choice letter); then an LLM judge has
nothing to add and is skipped. Others are only *likely* (the ground truth appears inside a longer answer):
good enough for a judge-free reward or an evaluation, but an LLM judge gets the last word.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from .base import Judge, JudgeRequest, Verdict

__all__ = [
    "RuleMatch",
    "RuleJudge",
    "match_rules",
    "rule_verdict",
    "normalize_text",
    "parse_number",
    "option_letter",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})
_WS = re.compile(r"\s+")

# "B", "(B)", "[B]" alone; "B.", "B)", "B:", "(B) red", "B. red" with an optional option text after it.
_BARE_LETTER = re.compile(r"^\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*\.?\s*$")
_LETTER_PREFIX = re.compile(r"^\s*(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])\s*[\.\):])\s*(.*)$", re.S)
_LETTER_PHRASE = re.compile(
    r"^\s*(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*[\(\[]?([A-Z])[\)\]]?\s*\.?\s*$", re.I
)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_FRACTION = re.compile(r"^([+-]?\d+)\s*/\s*(\d+)$")


def normalize_text(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed: "The Red car." -> "red car"."""
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return _WS.sub(" ", text).strip()


def parse_number(text: str) -> Optional[float]:
    """The number a whole string spells ("1,234", "3.50", "-2", "45%", "$7", "3/4"), else None.

    Only whole strings count: "3 apples" is not a number here (containment handles it), so that a numeric
    match can be trusted as certain.
    """
    s = text.strip().rstrip(".").strip()
    s = s.replace("$", "").replace("\u2212", "-")
    if s.endswith("%"):
        s = s[:-1].strip()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    if _NUMBER.match(s):
        value = float(s)
        return value if math.isfinite(value) else None
    frac = _FRACTION.match(s)
    if frac and int(frac.group(2)) != 0:
        return float(Fraction(int(frac.group(1)), int(frac.group(2))))
    return None


def _letter_index(letter: str, options: Optional[Sequence[str]]) -> Optional[str]:
    letter = letter.upper()
    if options is not None and not 0 <= ord(letter) - ord("A") < len(options):
        return None
    return letter


def option_letter(text: str, options: Optional[Sequence[str]] = None) -> Optional[str]:
    """The option letter a text names: "B", "(B)", "B.", "B. red", "Option B", or an option's own text.

    With ``options`` a letter outside the list is rejected and a text equal (after normalisation) to one
    option maps to that option's letter. Without options only explicit letter forms count; a lower-case
    letter counts only when it stands alone ("b"), because "a red car" must not read as option A.
    """
    bare = _BARE_LETTER.match(text)
    if bare:
        return _letter_index(bare.group(1), options)
    phrase = _LETTER_PHRASE.match(text)
    if phrase:
        return _letter_index(phrase.group(1), options)
    prefix = _LETTER_PREFIX.match(text)
    if prefix:
        letter = next(g for g in prefix.groups()[:3] if g)
        rest = prefix.group(4).strip()
        if options is None or not rest or _text_fits_option(rest, letter, options):
            return _letter_index(letter, options)
    if options:
        norm = normalize_text(text)
        hits = [i for i, opt in enumerate(options) if norm and normalize_text(opt) == norm]
        if len(hits) == 1:
            return chr(ord("A") + hits[0])
    return None


def _text_fits_option(rest: str, letter: str, options: Sequence[str]) -> bool:
    """"B. red" names B only if "red" is option B's text (or is not another option's text)."""
    idx = ord(letter) - ord("A")
    norm = normalize_text(rest)
    if 0 <= idx < len(options) and normalize_text(options[idx]) == norm:
        return True
    return not any(normalize_text(opt) == norm for opt in options)


@dataclass(frozen=True)
class RuleMatch:
    """The outcome of the rules: ``correct``, whether it is ``certain``, and which ``rule`` decided
    ("exact", "letter", "numeric", "contains" or "none")."""

    correct: bool
    certain: bool
    rule: str


def _contains(answer_norm: str, truth_norm: str, options: Optional[Sequence[str]]) -> bool:
    """Ground truth as whole words inside the answer. With options, an answer that also names another
    option's text does not count: listing every option must not score."""
    if not truth_norm or not re.search(r"(?<!\S)" + re.escape(truth_norm) + r"(?!\S)", answer_norm):
        return False
    for opt in options or ():
        other = normalize_text(opt)
        named = other and other != truth_norm and other not in truth_norm
        if named and re.search(r"(?<!\S)" + re.escape(other) + r"(?!\S)", answer_norm):
            return False
    return True


def match_rules(request: JudgeRequest, *, containment: bool = True) -> RuleMatch:
    """Apply the rules in order of certainty: letters, exact text, numbers, then containment."""
    answer, truth, options = request.answer, request.ground_truth, request.options
    answer_letter = option_letter(answer, options)
    truth_letter = option_letter(truth, options)
    if answer_letter and truth_letter:
        return RuleMatch(answer_letter == truth_letter, True, "letter")
    answer_norm, truth_norm = normalize_text(answer), normalize_text(truth)
    if answer_norm and answer_norm == truth_norm:
        return RuleMatch(True, True, "exact")
    a_num, t_num = parse_number(answer), parse_number(truth)
    if a_num is not None and t_num is not None:
        equal = math.isclose(a_num, t_num, rel_tol=1e-6, abs_tol=1e-9)
        return RuleMatch(equal, True, "numeric")
    if containment and _contains(answer_norm, truth_norm, options):
        return RuleMatch(True, False, "contains")
    return RuleMatch(False, False, "none")


def rule_verdict(request: JudgeRequest) -> Optional[Verdict]:
    """A verdict when the rules are certain (source "rule", ``raw`` names the rule), else None.

    Certain means: both sides name option letters (match or mismatch), the normalised texts are equal, or
    both are the same (or clearly different) whole numbers. An LLM judge calls this first and skips the LLM.
    """
    match = match_rules(request, containment=False)
    if not match.certain:
        return None
    return Verdict(1.0 if match.correct else 0.0, "rule", raw=match.rule)


class RuleJudge(Judge):
    """A judge made of rules only: no server, no cost, deterministic. A non-match scores 0.

    ``containment`` (on by default, as DeepEyes's evaluation does) also accepts an answer that contains the
    ground truth as whole words; turn it off for a stricter training reward.
    """

    name = "rule"

    def __init__(self, containment: bool = True) -> None:
        self.containment = containment

    def judge(self, request: JudgeRequest) -> Verdict:
        match = match_rules(request, containment=self.containment)
        return Verdict(1.0 if match.correct else 0.0, "rule", raw=match.rule)

    def __repr__(self) -> str:
        return f"RuleJudge(containment={self.containment})"
