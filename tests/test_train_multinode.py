"""Multi-node on one machine: a Ray head and a second Ray node started with ``ray start``, ``train.py --address``
across both, and env runners that ran on both nodes (their node ids are in the metrics)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_of_cluster(temp_dir: str) -> list[int]:
    """Processes of OUR cluster only: their command line or an open file names our private temp dir (Ray's
    agents rename their process titles, so the command line alone misses them). Other Ray users on the
    machine are left alone, unlike with a blanket ``ray stop``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            mine = temp_dir in cmdline
            if not mine:
                for fd in (entry / "fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd).startswith(temp_dir):
                            mine = True
                            break
        except OSError:
            continue
        if mine:
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    # token auth would need the head's token on the second node; a private single-machine cluster goes without
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus", "1", "--resources", '{"runner_slot": 1}', "--object-store-memory", str(80 * 1024**2)]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--temp-dir", temp_dir,
                        "--include-dashboard=false", "--node-ip-address", "127.0.0.1", *common],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
                        *common], check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        # `ray stop` would stop every Ray on the machine; stop exactly the processes of this cluster
        for pid in pids_of_cluster(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(3)
        for pid in pids_of_cluster(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_train_across_two_nodes(two_node_cluster, tmp_path, tiny_model_dir):
    address, _ = two_node_cluster
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--address", address, "name=multinode",
           f"logging.run_dir={run_dir}", "iterations=2", "model.build_tiny=false", f"model.path={tiny_model_dir}",
           "resources.num_env_runners=2", "resources.num_cpus_per_env_runner=1",
           "resources.env_runner_resources={runner_slot: 1}", "resources.torch_threads=1",
           "logging.eval_every=0", "logging.progress=false", "logging.report=false", "sft.steps=0",
           "rollout.prompts_per_iteration=4", "rollout.rollouts_per_prompt=2", "rollout.max_tokens=12",
           "data.n_eval=4", "algorithm.micro_batch_size=8", "logging.save_trajectories_every=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2
    for record in train:
        assert record["env_runners"] == 2
        assert len(record["env_runner_nodes"]) == 2, record["env_runner_nodes"]  # one runner per node
        assert len(record["env_runner_pids"]) == 2
