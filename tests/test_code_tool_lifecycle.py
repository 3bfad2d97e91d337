"""The code tool's sandbox workers live exactly as long as the envs that use them, wherever those run.

No other test module's env may hold the process's shared pool while these run, so this module keeps
its envs to itself and checks processes on the host (``sandbox_helpers``).
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
from sandbox_helpers import descendants, sandbox_processes, wait_until_gone

import deepeyes_envs  # noqa: F401
from deepeyes_envs.sandbox import shared

ROOT = Path(__file__).resolve().parents[1]
CALL = {"name": "python_tool", "arguments": {"code": "print(arrays[0].shape)"}}


@pytest.fixture(autouse=True)
def no_shared_pool_yet():
    gc.collect()  # envs other modules dropped without closing
    assert shared._pool is None, "an env with python_tool is still open: these tests need the process to itself"


def workers_of(env) -> set[int]:
    pool = env.unwrapped._tools["python_tool"]._pool
    return set(pool.pids) | {p for pid in pool.pids for p in descendants(pid)}


def played(env) -> str:
    env.reset(seed=0)
    obs, *_, info = env.step(CALL)
    assert info["error"] is None, info["error"]
    return "".join(p["text"] for p in obs["messages"][0]["content"] if p["type"] == "text")


def test_envs_share_one_pool_and_the_last_close_ends_it():
    first, second = gym.make("visual_code"), gym.make("visual_code")
    pids = workers_of(first)
    assert pids == workers_of(second) and len(pids) == 2  # one worker: its first process and its zygote
    assert "(336, 448, 3)" in played(first)
    first.close()
    assert pids <= set(sandbox_processes()) and "(336, 448, 3)" in played(second)
    second.close()
    assert not (pids & set(sandbox_processes()))
    assert "(336, 448, 3)" in played(second)  # a closed env that is used again starts a pool again
    second.close()


def test_a_collected_env_ends_its_workers():
    env = gym.make("visual_code")
    played(env)
    pids = workers_of(env)
    del env
    gc.collect()
    assert not wait_until_gone(pids)


def test_async_vector_env_workers_have_their_own_sandboxes_and_close_them():
    before = set(sandbox_processes())
    envs = gym.vector.AsyncVectorEnv([lambda: gym.make("visual_code") for _ in range(2)], shared_memory=False,
                                     context="fork")
    try:
        envs.reset(seed=[0, 1])
        obs, _, terminated, _, infos = envs.step((CALL, CALL))
        assert not terminated.any() and all(e is None for e in infos["error"])
        during = set(sandbox_processes()) - before
        assert len(during) == 4  # each env process has one worker: its first process and its zygote
    finally:
        envs.close()
    assert not wait_until_gone(during)


@pytest.mark.slow
def test_a_ray_actor_runs_the_code_tool_and_a_killed_actor_leaks_nothing(ray_local):
    import ray

    @ray.remote
    class Player:
        def play(self) -> tuple[str, list[int]]:
            import gymnasium as gym

            import deepeyes_envs  # noqa: F401, F811 - registers the envs in the actor process

            self.env = gym.make("visual_code")
            self.env.reset(seed=0)
            obs, *_, info = self.env.step(CALL)
            text = "".join(p["text"] for p in obs["messages"][0]["content"] if p["type"] == "text")
            return info["error"] or text, self.env.unwrapped._tools["python_tool"]._pool.pids

    player = Player.remote()
    text, pids = ray.get(player.play.remote(), timeout=300)
    assert "(336, 448, 3)" in text
    ray.kill(player)
    assert not wait_until_gone(set(pids))


def test_without_user_namespaces_gym_make_fails_clearly_and_other_envs_still_work():
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "import gymnasium as gym, deepeyes_envs\n"
              "from deepeyes_envs.sandbox import SandboxUnavailable\n"
              "try:\n    gym.make('visual_code')\nexcept SandboxUnavailable as exc:\n    print('unavailable:', exc)\n"
              "env = gym.make('visual_toolbox'); env.reset(seed=0); print('visual_toolbox works')\n")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c",
                          'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1"', sys.executable, script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("unavailable: cannot create the sandbox's namespaces"), out.stdout
    assert out.stdout.endswith("visual_toolbox works\n")


def test_no_pool_is_left_open():
    assert shared._users == 0  # the fixture checked that no pool is open
