"""Helpers for the sandbox tests: find the sandbox's processes on the host, wait for them to end."""

from __future__ import annotations

import os
import time
from pathlib import Path

from deepeyes_envs.sandbox.pool import WORKER


def sandbox_processes() -> dict[int, int]:
    """pid -> parent pid of every live (non-zombie) process running this checkout's sandbox worker."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if str(WORKER).encode() in cmdline and state != "Z":
            found[int(entry.name)] = int(ppid)
    return found


def descendants(pid: int) -> set[int]:
    """``pid``'s live sandbox processes below it (its zygote and the zygote's children)."""
    tree, out, todo = sandbox_processes(), set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, pp in tree.items() if pp == parent}
        out |= children
        todo.extend(children)
    return out


def wait_until_gone(pids: set[int], timeout_s: float = 30.0) -> set[int]:
    """Poll until none of ``pids`` runs the worker any more; return those still running at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (alive := pids & set(sandbox_processes())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def host_uid(pid: int) -> int:
    """The real user id of ``pid`` as the host sees it."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return int(line.split()[1])


def running_as_root() -> bool:
    return os.geteuid() == 0
