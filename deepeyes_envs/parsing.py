"""One assistant turn (raw generated text) -> an answer, tool calls, or a parse error.

The DeepEyes order (docs/deepeyes.md, "The v2 env") is kept in both modes: a non-empty ``<answer>`` ends the
episode before any tool call is looked at; otherwise the ``<tool_call>`` blocks are read.

Non-strict mode (visual_toolbox_v2) reads a turn exactly as DeepEyes does, error strings included: the
last ``<answer>`` and the last ``<tool_call>`` count, each tested for truthiness (so ``<answer> </answer>``
is an answer and ``<tool_call></tool_call>`` is no call), and a failure reads as the original's text.
``strict`` mode (our default env) also reports unclosed and nested tags, which DeepEyes silently treats
as "no tool call", returns every call of the turn instead of only the last, and words its own errors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

TurnKind = Literal["answer", "tool_calls", "no_tool_call", "invalid"]


@dataclass(frozen=True)
class ToolCall:
    """One call. Strict parsing guarantees a str name and dict arguments; non-strict parsing keeps any
    JSON value, as DeepEyes does, and the tool reads it the way DeepEyes would."""

    name: Any
    arguments: Any

    def to_text(self) -> str:
        """The canonical ``<tool_call>`` block for this call (what a model would have written)."""
        body = json.dumps({"name": self.name, "arguments": self.arguments})
        return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


@dataclass(frozen=True)
class ParsedTurn:
    """What a turn asks for. ``error`` is the message shown to the model when ``kind == "invalid"``."""

    kind: TurnKind
    answer: Optional[str] = None
    calls: tuple[ToolCall, ...] = ()
    error: Optional[str] = None
    n_call_tags: int = 0
    raw_calls: tuple[str, ...] = field(default=(), repr=False)


def last_answer(text: str) -> Optional[str]:
    """Inner text of the last ``<answer>...</answer>``, or None when there is none."""
    matches = ANSWER_RE.findall(text)
    return matches[-1] if matches else None


def parse_turn(text: str, *, strict: bool = False) -> ParsedTurn:
    """Parse one assistant turn.

    Non-strict (visual_toolbox_v2): DeepEyes' reading, only the last ``<tool_call>`` block is used.
    Strict: every block is returned in order, and tag problems become errors the model can read.
    """
    answer = last_answer(text)
    if answer is not None and (answer.strip() if strict else answer):
        return ParsedTurn(kind="answer", answer=answer.strip())
    blocks = TOOL_CALL_RE.findall(text)
    if strict:
        tag_error = _tag_error(text, blocks)
        if tag_error:
            return ParsedTurn(kind="invalid", error=tag_error, n_call_tags=len(blocks))
    if not blocks or not (strict or blocks[-1]):
        return ParsedTurn(kind="no_tool_call", n_call_tags=len(blocks))
    chosen = blocks if strict else blocks[-1:]
    calls = []
    for raw in chosen:
        call = parse_call(raw) if strict else parse_call_deepeyes(raw)
        if isinstance(call, str):
            return ParsedTurn(kind="invalid", error=call, n_call_tags=len(blocks), raw_calls=tuple(chosen))
        calls.append(call)
    return ParsedTurn(kind="tool_calls", calls=tuple(calls), n_call_tags=len(blocks), raw_calls=tuple(chosen))


def parse_call_deepeyes(raw: str) -> ToolCall | str:
    """One ``<tool_call>`` block read as DeepEyes reads it, or the error text DeepEyes shows the model.

    JSON that does not parse reads ``Invalid tool call format: <stripped block>. Error: <the exception>``;
    a missing ``name`` or ``arguments``, or a value that is not an object, reads as the lookup's own
    exception text (``'arguments'``, ``list indices must be integers or slices, not str``).
    """
    stripped = raw.strip()
    try:
        obj = json.loads(stripped)
    except (ValueError, RecursionError) as exc:  # bad JSON, integers over 4300 digits, nesting too deep
        return f"Invalid tool call format: {stripped}. Error: {exc}"
    try:
        return ToolCall(name=obj["name"], arguments=obj["arguments"])
    except (KeyError, TypeError) as exc:
        return str(exc)


def parse_call(raw: str) -> ToolCall | str:
    """JSON inside one ``<tool_call>`` block -> ToolCall, or an error message for the model."""
    try:
        obj = json.loads(raw.strip())
    except json.JSONDecodeError as exc:
        return f"tool call is not valid JSON ({exc})"
    except RecursionError:
        return "tool call JSON is nested too deeply"
    if not isinstance(obj, dict):
        return f'tool call must be a JSON object with "name" and "arguments", got {type(obj).__name__}'
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return 'tool call has no "name" string'
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return f'"arguments" of {name} must be a JSON object, got {type(arguments).__name__}'
    return ToolCall(name=name, arguments=arguments)


def _tag_error(text: str, blocks: list[str]) -> Optional[str]:
    opens, closes = text.count(TOOL_CALL_OPEN), text.count(TOOL_CALL_CLOSE)
    if any(TOOL_CALL_OPEN in b for b in blocks):
        return "nested <tool_call> tags; write one call per <tool_call></tool_call> block"
    if opens != closes:
        return f"unbalanced tags: {opens} <tool_call> but {closes} </tool_call>"
    return None
