"""The Tool contract and the tool registry.

A tool is a small class: a ``name``, a ``description``, a JSON-schema ``parameters`` object and an
``execute(arguments, context)`` that returns text and/or images, or raises :class:`ToolError` with a
message the model will read. Registering a subclass makes it available to every env by name; an env
lists the tools it offers in envs_registry.yaml, in ``gym.make(..., tools=[...])`` or per task.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import numpy as np

from ..data.tasks import Task


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
    ``"seen"``; ``"relative_1000"`` means thousandths (0..1000) of the image's width and height, and
    ``"original"`` the image's own pixels. ``allow_image_index`` says whether a call may pick an image
    other than the original. ``strict`` checks arguments with our messages; ``strict=False`` reads them
    as DeepEyes does (the visual_toolbox_v2 env).
    """

    images: list[np.ndarray]
    seen_sizes: list[tuple[int, int]]
    coordinate_frame: str = "original"
    allow_image_index: bool = False
    strict: bool = True
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

    @classmethod
    def schema_for_frame(cls, coordinate_frame: str) -> dict[str, Any]:
        """The schema a prompt advertises in an env that reads coordinates in ``coordinate_frame``.

        Tools whose arguments hold coordinates override it to describe them in that frame (the zoom tool
        says thousandths for ``relative_1000``); the default is :meth:`schema`.
        """
        return cls.schema()

    def __call__(self, arguments: Any, context: ToolContext) -> ToolResult:
        """Validate arguments against :attr:`parameters`, then execute.

        Strict envs check everything with our messages. Non-strict envs read the arguments as DeepEyes
        does (:func:`read_arguments_deepeyes`), so visual_toolbox_v2 accepts and refuses what the
        original accepts and refuses.
        """
        if context.strict:
            check_arguments(self.name, self.parameters, arguments, strict=True)
        else:
            arguments = read_arguments_deepeyes(self.name, self.parameters, arguments)
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
    """A new instance of the tool registered as ``name``; ``options`` go to its constructor (an env's
    ``tool_options``, e.g. how image_rotate_tool rotates)."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no tool named {name!r}; registered tools: {sorted(_REGISTRY)}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"tool {name!r} does not accept the options {sorted(options)}: {exc}") from None


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


def read_arguments_deepeyes(tool: str, schema: dict[str, Any], arguments: Any) -> dict[str, Any]:
    """The arguments as DeepEyes reads them, for visual_toolbox_v2.

    Each required key is looked up with ``arguments[key]``, as the original does, so a missing key or
    arguments that are not an object fail with Python's own text (``'bbox_2d'``, ``list indices must be
    integers or slices, not str``). Values the original computes with pass as they are: booleans are
    numbers, NaN and infinities are numbers. Values it would crash on (a string for a number, three
    coordinates) get our message, since the original's text there names its internals. Optional
    arguments are never read by the original, so a malformed one is dropped, not an error.
    """
    props = schema.get("properties", {})
    out: dict[str, Any] = {}
    for key in schema.get("required", []):
        try:
            out[key] = arguments[key]
        except (KeyError, TypeError) as exc:
            raise ToolError(str(exc)) from None
        if key in props:
            _check_value(f"{tool} argument {key!r}", props[key], out[key], deepeyes=True)
    if not isinstance(arguments, dict):
        raise ToolError(f'"arguments" of {tool} must be a JSON object, got {json_type(arguments)}')
    for key, value in arguments.items():
        if key in out:
            continue
        try:
            if key in props:
                _check_value(f"{tool} argument {key!r}", props[key], value, deepeyes=True)
        except ToolError:
            continue
        out[key] = value
    return out


def _check_value(where: str, schema: dict[str, Any], value: Any, *, deepeyes: bool = False) -> None:
    kind = schema.get("type")
    if kind in ("number", "integer"):
        _check_number(where, kind, value, deepeyes)
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
            _check_value(f"{where}[{i}]", schema.get("items", {}), item, deepeyes=deepeyes)


def _check_number(where: str, kind: str, value: Any, deepeyes: bool) -> None:
    """Ours: a finite JSON number, not a boolean. DeepEyes' reading: any Python number, since the
    original computes with booleans and non-finite values without failing."""
    if not isinstance(value, (int, float)) or (isinstance(value, bool) and not deepeyes):
        raise ToolError(f"{where} must be a number, got {json_type(value)}")
    if deepeyes and kind == "number":
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError(f"{where} must be finite, got {value}")
    if isinstance(value, int) and abs(value) > sys.float_info.max:  # JSON integers have no size limit
        raise ToolError(f"{where} must be finite, got an integer of {len(str(abs(value)))} digits")
    if kind == "integer" and not float(value).is_integer():
        raise ToolError(f"{where} must be an integer, got {value}")


def json_type(value: Any) -> str:
    """JSON's name for a Python value's type, for error messages a model understands."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
             dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)
