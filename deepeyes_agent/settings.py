"""Typed settings on pydantic v2: sections, YAML files with dotted ``key=value`` overrides, a settings table.

Training, evaluation and data selection describe their runs with :class:`Section` models. A file sets some
values, overrides set more, everything else keeps the documented default; pydantic checks every value
against its field's type (choices are ``Literal`` types) and the models' own validators check combinations.
Two things pydantic does not do are added here: an unknown key names the closest valid one (a typo must not
silently train with a default), and :func:`settings_table` renders every setting with its default and help
text for ``--describe`` and the docs. Commands whose options are a section's fields get them from
:func:`add_section_arguments`, so an option's type, choices, default and help are the field's, never a copy.
The judge is one setting type, :data:`JudgeSetting`, wherever a judge is configured.
"""

from __future__ import annotations

import argparse
import difflib
import json
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError

from deepeyes_envs.judges import make_judge

S = TypeVar("S", bound="Section")


class ConfigError(ValueError):
    """A config file or override that does not fit its settings model."""


class Section(BaseModel):
    """A group of settings: unknown keys are errors and assignments are validated like the input."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def setting(default: Any, help: str, *, names: tuple[str, ...] = (), **constraints: Any) -> Any:  # noqa: A002
    """A field with a default and the help text that ``--describe`` prints (``ge=0`` and such pass through).
    ``names``: what each value of a fixed tuple is, for the command line's ``--help`` (``("LOW", "HIGH")``)."""
    return Field(default, description=help, json_schema_extra={"names": list(names)} if names else None,
                 **constraints)


def _judge_spec(spec: Any) -> Union[str, dict[str, Any]]:
    """Build the judge once (nothing connects before its first judgement), so a wrong type or keyword is an
    error when the settings are read, not at the first reward. Judge instances are refused: a setting is
    what a file or a command line can write, and what a run records."""
    if not isinstance(spec, (str, Mapping)):
        raise ValueError("a judge spec is a name or a mapping")
    try:
        make_judge(spec)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not a judge spec: {exc}") from None
    return spec if isinstance(spec, str) else dict(spec)


JudgeSetting = Annotated[Union[str, dict[str, Any]], PlainValidator(_judge_spec)]
"""What ``deepeyes_envs.judges.make_judge`` reads: a name or a mapping with ``type`` and that judge's arguments."""

_JUDGE_HELP = ("Judge spec: 'rule', 'llm' (URL from $LLM_AS_A_JUDGE_BASE, model from its /models), 'math', or a "
              "mapping of a type and its arguments, e.g. {type: llm, base_url: 'http://host:8000/v1', model: NAME, "
              "on_failure: fallback} (docs/judge.md).")


def judge_setting() -> Any:
    """The judge field of a section: rule-based unless set, with the one help text."""
    return setting("rule", _JUDGE_HELP)


def judge_text(spec: JudgeSetting) -> str:
    """A judge spec as a user writes it (a name, or the mapping as JSON), for reports."""
    return spec if isinstance(spec, str) else json.dumps(spec)


def leaf_settings(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf setting of ``model`` as ``dotted.key -> FieldInfo`` (sections are walked into)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(leaf_settings(annotation, f"{prefix}{name}."))
        else:
            out[prefix + name] = info
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> (key, YAML-parsed value): ``lr=1e-5`` is a number, ``x=null`` is None."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key="a.b"``, creating the mappings on the way."""
    *parents, leaf = key.split(".")
    for part in parents:
        child = data.get(part)
        if not isinstance(child, dict):
            child = data[part] = {}
        data = child
    data[leaf] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file is a mapping of settings")
    return data


def build(model: type[S], data: Mapping[str, Any], overrides: Sequence[str] = ()) -> S:
    """``model`` from a mapping (e.g. a YAML file's) and ``key=value`` overrides on top, validated."""
    merged = _plain(data)
    for text in overrides:
        key, value = parse_override(text)
        set_path(merged, key, value)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(explain(exc, model)) from None


def load(model: type[S], path: str | Path | None = None, overrides: Sequence[str] = ()) -> S:
    """Defaults, then the YAML file at ``path`` (if any), then the overrides."""
    return build(model, read_yaml(path) if path is not None else {}, overrides)


# ---------------------------------------------------------------------------------------------- command lines
def add_section_arguments(container: argparse._ActionsContainer, section: type[Section]) -> None:
    """One ``--kebab-case`` option per field of ``section`` on a parser or argument group: type, choices and
    help are the field's, and ``--help`` shows the field's default.

    An option left out is absent from the parsed namespace (``argparse.SUPPRESS``) instead of carrying a copy
    of the default, so the section's default applies, or a value the caller puts under the given ones. A
    field that may be None but defaults to something else also gets ``--no-<name>``, which sets None.
    """
    for name, info in section.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = _shown(info.get_default(call_default_factory=True))
        help_text = f"{info.description or ''} (default: {default})".replace("%", "%%")
        kind, nullable = _option_kind(info.annotation)
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("names"):
            kind["metavar"] = tuple(info.json_schema_extra["names"])
        switchable = nullable and info.default is not None
        target = container.add_mutually_exclusive_group() if switchable else container
        target.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text, **kind)
        if switchable:
            target.add_argument(f"--no-{flag[2:]}", dest=name, action="store_const", const=None,
                                default=argparse.SUPPRESS, help=f"set {name} to null")


def given_arguments(section: type[Section], args: argparse.Namespace) -> dict[str, Any]:
    """The values of ``section``'s options that the command line gave (see :func:`add_section_arguments`)."""
    return {name: getattr(args, name) for name in section.model_fields if hasattr(args, name)}


def section_from_arguments(section: type[S], args: argparse.Namespace) -> S:
    """``section`` from the options given, checked like a config file (errors are :class:`ConfigError`)."""
    return build(section, given_arguments(section, args))


def _option_kind(annotation: Any) -> tuple[dict[str, Any], bool]:
    """The ``add_argument`` keywords that read a value of ``annotation``, and whether None is allowed.
    What has no command-line form of its own (a mapping, a judge spec) is read as YAML, so JSON too."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _option_kind(rest[0])[0], True
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}, False
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}, False
    if annotation in (int, float, str):
        return {"type": annotation}, False
    if origin is tuple and args and Ellipsis not in args:
        return {"type": args[0], "nargs": len(args)}, False
    return {"type": _yaml_value, "metavar": "YAML"}, False


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not YAML or JSON ({getattr(exc, 'problem', exc)})") from None


def _shown(value: Any) -> str:
    """A default as it is written on the command line."""
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def explain(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem, keyed by the dotted setting; unknown keys name the closest valid one."""
    known = list(leaf_settings(model))
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "; `--describe` lists every setting"
            lines.append(f"unknown config key {key!r}{hint}")
        elif error["type"] == "value_error" and not error["loc"]:
            lines.append(str(error["ctx"]["error"]))
        else:
            given = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
            lines.append(f"{key}: {error['msg']}{given}")
    return "invalid config:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0]


def settings_table(model: type[BaseModel]) -> str:
    """A markdown table of every setting: key, default, help (choices are listed from ``Literal`` types)."""
    defaults = model.model_construct()  # defaults only: a run-level check may reject them as they stand
    lines = ["| setting | default | what it does |", "|---|---|---|"]
    for key, info in leaf_settings(model).items():
        value: Any = defaults
        for part in key.split("."):
            value = getattr(value, part)
        help_text = info.description or ""
        choices = _choices(info.annotation)
        if choices:
            help_text += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
        lines.append(f"| `{key}` | `{value!r}` | {help_text} |")
    return "\n".join(lines)


def _choices(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [c for arg in typing.get_args(annotation) for c in _choices(arg)]


def _plain(data: Mapping[str, Any] | Iterable) -> dict[str, Any]:
    """A deep copy of nested mappings, so overrides never write into the caller's data."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in dict(data).items()}
