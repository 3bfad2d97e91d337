"""The consistency prompt an LLM judge is asked with, and how its reply is read.

The layout follows the DeepEyes judging scheme (an instruction, worked examples, then one
``[Question]/[Standard Answer]/[Model_answer]/Judgement:`` block), so a judge model tuned on that layout
behaves the same; the wording and the examples are this project's own. Bump :data:`PROMPT_VERSION`
whenever the text changes: it is part of the cache key, so old verdicts are not reused for a new prompt.
"""

from __future__ import annotations

__all__ = ["PROMPT_VERSION", "SYSTEM_MESSAGE", "INSTRUCTION", "EXAMPLES", "build_prompt", "parse_judgement"]

PROMPT_VERSION = "consistency-v1"

SYSTEM_MESSAGE = "You are a helpful assistant."

INSTRUCTION = (
    "You grade answers. Decide whether the [Model_answer] agrees with the [Standard Answer] for the given "
    "[Question]. They agree when they say the same thing, even in different words, with extra words "
    "around it, or with a different unit or number format that has the same value (\"blue\" and \"the cup "
    "is blue\" agree; \"3 km\" and \"3000 m\" agree). They do not agree when the model answer says "
    "something else, hedges between several candidates, or leaves the question unanswered. For a "
    "multiple-choice question, the option letter and the option's text count as the same answer.\n"
    "Reply with the single digit 1 if they agree and 0 if they do not. Write nothing else.\n"
)

# (question, standard answer, model answer, judgement): our own cases covering paraphrase, wrong value,
# option letter vs text, hedging, units, counting and an unanswered question.
EXAMPLES: tuple[tuple[str, str, str, str], ...] = (
    ("What colour is the umbrella held by the woman?", "yellow", "The woman's umbrella is yellow.", "1"),
    ("How many birds are sitting on the fence?", "4", "There are five birds on the fence.", "0"),
    (
        "Which side of the bench is the bicycle on?\n(A) left\n(B) right",
        "B",
        "The bicycle is on the right side of the bench.",
        "1",
    ),
    ("What is written on the shop sign?", "BAKERY", "It says either BAKERY or BUTCHER.", "0"),
    ("How long is the bridge?", "1.2 km", "About 1200 meters", "1"),
    ("What material is the table made of?", "wood", "The table is made of glass.", "0"),
    ("What animal is next to the red car?", "dog", "I cannot tell from the image.", "0"),
)


def _block(question: str, standard: str, answer: str) -> str:
    return f"[Question]: {question}\n[Standard Answer]: {standard}\n[Model_answer] : {answer}\nJudgement:"


def build_prompt(question: str, ground_truth: str, answer: str) -> str:
    """The full user message: instruction, worked examples, then the case to judge (ending "Judgement:")."""
    parts = [INSTRUCTION, "Examples:\n"]
    for q, gt, ans, verdict in EXAMPLES:
        parts.append(_block(q, gt, ans) + f" {verdict}\n")
    parts.append("Now judge this one:\n" + _block(question, ground_truth, answer))
    return "\n".join(parts)


def parse_judgement(reply: str) -> tuple[float, bool]:
    """Read a judge reply the DeepEyes way: take the text after the last "Judgement:" if there is one;
    a '1' in it means correct, else a '0' means wrong. Returns (score, parsed); an unreadable reply scores
    0 with ``parsed`` False so that it can be counted."""
    tail = reply.rsplit("Judgement:", 1)[-1]
    if "1" in tail:
        return 1.0, True
    if "0" in tail:
        return 0.0, True
    return 0.0, False
