"""The Tool contract and the tool registry.

A tool is a small class: a ``name``, a ``description``, a JSON-schema ``parameters`` object and an
``execute(arguments, context)`` that returns text and/or images, or raises :class:`ToolError` with a
message the model will read. Registering a subclass makes it available to every env by name; an env
lists the tools it offers in envs_registry.yaml, in ``gym.make(..., tools=[...])`` or per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np

from ..tasks import Task


class ToolError(Exception):
    """A failure the model should read (bad arguments, a box off the image); the episode goes on."""


@dataclass
class ToolResult:
    """What a tool returns: text, new images (uint8 HxWx3), and facts for ``info``."""

    text: str = ""
    images: tuple[np.ndarray, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolContext:
    """What a tool may look at.

    ``images[0]`` is the task's original image; later entries are images earlier tool calls
    returned. ``seen_sizes[i]`` is the (width, height) of ``images[i]`` as the model saw it after the
    processor's resize, so tools can read coordinates in that frame when ``coordinate_frame`` is
    ``"seen"``. ``allow_image_index`` says whether a call may pick an image other than the original.
    """

    images: list[np.ndarray]
    seen_sizes: list[tuple[int, int]]
    coordinate_frame: str = "original"
    allow_image_index: bool = False
    strict: bool = False
    task: Optional[Task] = None


class Tool:
    """Base class. Subclasses set the three class attributes and implement :meth:`execute`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    parameters: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}, "required": []}

    def execute(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-episode state; called by the env at every reset."""

    def close(self) -> None:
        """Release what the tool holds (processes, connections); called by the env's ``close``."""

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The OpenAI/Qwen function schema that prompts advertise."""
        return {"type": "function", "function": {"name": cls.name, "description": cls.description,
                                                 "parameters": cls.parameters}}

    def __call__(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        """Validate arguments against :attr:`parameters`, then execute."""
        check_arguments(self.name, self.parameters, arguments, strict=context.strict)
        return self.execute(arguments, context)


_REGISTRY: dict[str, type[Tool]] = {}


def register_tool(cls: type[Tool]) -> type[Tool]:
    """Class decorator: make a tool available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    existing = _REGISTRY.get(cls.name)
    same_class = existing is not None and _path(existing) == _path(cls)  # e.g. a module imported twice
    if existing is not None and not same_class:
        raise ValueError(f"tool name {cls.name!r} is already registered by {_path(existing)}")
    _REGISTRY[cls.name] = cls
    return cls


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def make_tool(name: str, **options: Any) -> Tool:
    """A new instance of the tool registered as ``name``; ``options`` go to its constructor."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no tool named {name!r}; registered tools: {sorted(_REGISTRY)}") from None
    if not options:
        return cls()
    try:
        return cls(**options)
    except TypeError as exc:
        raise TypeError(f"options {sorted(options)} for tool {name!r}: {exc}") from None


def registered_tools() -> list[str]:
    return sorted(_REGISTRY)


# -- argument validation ----------------------------------------------------------------------
# A deliberately small JSON-schema subset (object/array/number/integer/string/boolean, required,
# min/maxItems), enough for tool arguments and with messages a model can act on.

def check_arguments(tool: str, schema: dict[str, Any], arguments: dict[str, Any], *, strict: bool) -> None:
    props = schema.get("properties", {})
    for key in schema.get("required", []):
        if key in props and key not in arguments:
            raise ToolError(f"{tool} is missing the required argument {key!r}")
    if strict:
        extra = sorted(set(arguments) - set(props))
        if extra:
            raise ToolError(f"{tool} got unexpected argument(s) {extra}; it accepts {sorted(props)}")
    for key, value in arguments.items():
        if key in props:
            _check_value(f"{tool} argument {key!r}", props[key], value)


def _check_value(where: str, schema: dict[str, Any], value: Any) -> None:
    kind = schema.get("type")
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ToolError(f"{where} must be a number, got {json_type(value)}")
        if not math.isfinite(value):
            raise ToolError(f"{where} must be finite, got {value}")
        if kind == "integer" and not float(value).is_integer():
            raise ToolError(f"{where} must be an integer, got {value}")
    elif kind == "string" and not isinstance(value, str):
        raise ToolError(f"{where} must be a string, got {json_type(value)}")
    elif kind == "boolean" and not isinstance(value, bool):
        raise ToolError(f"{where} must be true or false, got {json_type(value)}")
    elif kind == "array":
        if not isinstance(value, list):
            raise ToolError(f"{where} must be an array, got {json_type(value)}")
        lo, hi = schema.get("minItems"), schema.get("maxItems")
        if (lo is not None and len(value) < lo) or (hi is not None and len(value) > hi):
            want = f"exactly {lo}" if lo == hi else f"between {lo} and {hi}"
            raise ToolError(f"{where} must have {want} items, got {len(value)}")
        for i, item in enumerate(value):
            _check_value(f"{where}[{i}]", schema.get("items", {}), item)


def json_type(value: Any) -> str:
    """JSON's name for a Python value's type, for error messages a model understands."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
