"""RLlib integration: config, algorithm, env runner, learner and RL module for Qwen-VL policies.

Imports are lazy so that ``import deepeyes_agent.rllib`` does not pull Ray in until it is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DeepEyesConfig", "DeepEyesAlgorithm", "LLMEnvRunner", "LLMLearner", "QwenVLModule"]

_WHERE = {
    "DeepEyesConfig": "deepeyes_agent.rllib.config",
    "DeepEyesAlgorithm": "deepeyes_agent.rllib.algorithm",
    "LLMEnvRunner": "deepeyes_agent.rllib.env_runner",
    "LLMLearner": "deepeyes_agent.rllib.learner",
    "QwenVLModule": "deepeyes_agent.rllib.module",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
