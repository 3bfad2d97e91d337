"""envs_registry.yaml and installed plugins -> gymnasium's registry.

Three sources, in order: the yaml beside this package (every built-in env_name), then packages that
declare ``deepeyes.tools`` entry points (each a Tool subclass), then ``deepeyes.envs`` entry points
(each a dict ``{"entry_point": "module:Class", "kwargs": {...}}``, or a callable that builds the env).
A plugin may not silently replace a built-in env: a clash is an error naming both.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Optional, Union

import gymnasium as gym
import yaml

from .data.tasks import Task
from .tools import register_tool

REGISTRY_FILE = Path(__file__).with_name("envs_registry.yaml")
ENV_GROUP = "deepeyes.envs"
TOOL_GROUP = "deepeyes.tools"
PLAIN_ENV = "plain"

_registered: dict[str, dict[str, Any]] = {}


def load_registry_file(path: Union[str, Path] = REGISTRY_FILE) -> dict[str, dict[str, Any]]:
    """Read and check a registry yaml: each entry needs an ``entry_point``; ``kwargs`` is optional."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of env_name -> spec")
    specs = {}
    for name, spec in data.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("entry_point"), str):
            raise ValueError(f"{path}: env {name!r} needs an 'entry_point' string")
        unknown = set(spec) - {"entry_point", "kwargs"}
        if unknown:
            raise ValueError(f"{path}: env {name!r} has unknown keys {sorted(unknown)}")
        specs[name] = {"entry_point": spec["entry_point"], "kwargs": dict(spec.get("kwargs") or {})}
    return specs


def register_env(name: str, entry_point: Any, kwargs: Optional[dict[str, Any]] = None, source: str = "") -> None:
    """Register one env with gymnasium (idempotent for an identical spec)."""
    spec = {"entry_point": entry_point, "kwargs": dict(kwargs or {}), "source": source}
    previous = _registered.get(name)
    if previous is not None:
        if previous["entry_point"] == entry_point and previous["kwargs"] == spec["kwargs"]:
            return
        raise ValueError(f"env {name!r} from {source or 'code'} clashes with the one from {previous['source']}")
    gym.register(id=name, entry_point=entry_point, kwargs=spec["kwargs"])
    _registered[name] = spec


def register_all() -> None:
    """Register the yaml's envs and every installed plugin's tools and envs."""
    for name, spec in load_registry_file().items():
        register_env(name, spec["entry_point"], spec["kwargs"], source=str(REGISTRY_FILE.name))
    for ep in entry_points(group=TOOL_GROUP):
        register_tool(ep.load())
    for ep in entry_points(group=ENV_GROUP):
        obj = ep.load()
        source = f"entry point {ep.value}"
        if isinstance(obj, dict):
            register_env(ep.name, obj["entry_point"], obj.get("kwargs"), source=source)
        elif callable(obj):
            register_env(ep.name, obj, None, source=source)
        else:
            raise TypeError(f"{source} must be a dict spec or a callable, got {type(obj).__name__}")


def registered_envs() -> dict[str, dict[str, Any]]:
    """env_name -> {"entry_point", "kwargs", "source"} for everything registered so far."""
    return {name: dict(spec) for name, spec in _registered.items()}


def registered_env_names() -> frozenset[str]:
    """The env names a row may carry right now: the built-in ones and every registered plugin's."""
    return frozenset(_registered)


def env_id_for(task: Union[Task, str, None]) -> str:
    """The env a task (or a row's env_name) is routed to; empty or null means the plain env."""
    name = task.env_name if isinstance(task, Task) else task
    name = name or PLAIN_ENV
    if name not in _registered:
        raise KeyError(f"env_name {name!r} is not registered; known: {sorted(_registered)}")
    return name


def make_for_task(task: Task, **overrides: Any) -> gym.Env:
    """``gym.make`` the env this task is routed to."""
    return gym.make(env_id_for(task), **overrides)
