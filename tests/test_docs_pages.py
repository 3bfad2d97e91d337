"""docs/env.md, docs/registry.md and docs/add-an-env.md run as written (see test_docs_add_a_tool.py)."""

from __future__ import annotations

import configparser
import importlib
import tomllib

import gymnasium as gym
import numpy as np
from test_docs_add_a_tool import run_markdown

import deepeyes_envs
from deepeyes_envs.registry import register_env
from deepeyes_envs.tools import Tool, register_tool


def test_env_page_runs(tmp_path, monkeypatch):
    namespace = run_markdown("env.md", tmp_path, monkeypatch)
    assert namespace["frame"].shape == (1080, 1920, 3)


def test_add_an_env_page_runs(tmp_path, monkeypatch):
    namespace = run_markdown("add-an-env.md", tmp_path, monkeypatch)
    assert {"visual_toolbox_v2_32b", "grounded_toolbox"} <= set(deepeyes_envs.registered_envs())
    assert issubclass(namespace["GroundedToolEnv"], deepeyes_envs.ToolEnv)


def test_registry_page_runs_and_its_plugin_declarations_resolve(tmp_path, monkeypatch):
    run_markdown("registry.md", tmp_path, monkeypatch)
    plugin = tmp_path / "deepeyes_sharpen"
    monkeypatch.syspath_prepend(str(plugin))
    cfg = configparser.ConfigParser()
    cfg.read(plugin / "setup.cfg")
    toml = tomllib.loads((plugin / "pyproject.toml").read_text())["project"]["entry-points"]
    declared = {}
    for group in ("deepeyes.tools", "deepeyes.envs"):
        lines = [line for line in cfg["options.entry_points"][group].splitlines() if line.strip()]
        from_cfg = dict(tuple(part.strip() for part in line.split("=")) for line in lines)
        assert from_cfg == toml[group], f"setup.cfg and pyproject.toml declare {group} differently"
        declared[group] = {name: _resolve(value) for name, value in from_cfg.items()}

    # What register_all does with installed entry points, done by hand (no pip install here).
    (tool_cls,) = declared["deepeyes.tools"].values()
    assert issubclass(tool_cls, Tool) and tool_cls.name in declared["deepeyes.tools"]
    register_tool(tool_cls)
    (env_name, spec), = declared["deepeyes.envs"].items()
    register_env(env_name, spec["entry_point"], spec["kwargs"], source="docs/registry.md")
    env = gym.make(env_name)
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 20:40] = 128
    env.reset(options={"image": image, "question": "q", "answer": "a"})
    obs, *_, info = env.step({"name": "image_sharpen_tool", "arguments": {}})
    assert info["tool_calls"][0]["ok"]
    (sharpened,) = [p["image"] for p in obs["messages"][0]["content"] if p["type"] == "image"]
    assert sharpened.shape == image.shape and not np.array_equal(sharpened, image)


def _resolve(value: str):
    module, _, attr = value.partition(":")
    return getattr(importlib.import_module(module), attr)

