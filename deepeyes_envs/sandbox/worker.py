"""The sandbox worker process: build the jail once, then fork one fresh child per execution.

Started by the env (``pool.py``) as ``python -E -s worker.py FD``, FD being its end of a socketpair.
Its life, in order:

1. import everything sandboxed code may use (numpy, PIL, a few standard modules), while the host's
   files are still readable;
2. ``unshare`` new user, mount, network, IPC, UTS, cgroup and pid namespaces; the env then maps the
   namespace's root to an unprivileged user id (so the kernel counts this sandbox's processes);
3. fork the *zygote*, pid 1 of the new pid namespace; this first process stays outside it, waits for
   the zygote and exits with it;
4. the zygote forbids nested namespaces, swaps the filesystem for an empty read-only tmpfs, becomes
   undumpable and tells the env it is ready;
5. for each request it forks a child (``execution.run``) that locks itself down further and runs the
   code, while the zygote enforces the wall clock and the output limits, then kills every process
   left in the namespace, so each execution starts from the same pristine, warm state.

The zygote never runs untrusted code and never parses what the child sends: it relays the printed
bytes and the child's result message to the env, which parses them within its own limits.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import resource
import select
import signal
import socket
import sys
import time
from typing import Any, NoReturn

import execution
import jail
import numpy
import protocol
from limits import PRELOADED_MODULES
from PIL import Image

MAX_REQUEST_HEADER = 1 << 20
MAX_REQUEST_BYTES = 4 << 30  # the env bounds requests far lower; this only keeps a bad message from allocating more
PIPE_SIZE = 1 << 20  # the result pipe's capacity: an image passes in few context switches
F_SETPIPE_SZ = 1031


def main() -> NoReturn:
    sock = socket.socket(fileno=int(sys.argv[1]))
    for name in PRELOADED_MODULES:  # what the code may import must be loaded while files are readable
        importlib.import_module(name)
    Image.init()  # the image format plugins, which PIL would otherwise import lazily
    try:
        jail.unshare(jail.ALL_NAMESPACES)
    except OSError as exc:
        _fatal(sock, f"cannot create the sandbox's namespaces ({exc})")
    _send(sock, {"stage": "unshared"})
    reply, _ = protocol.decode(protocol.reader(sock.recv_into), MAX_REQUEST_HEADER, 0)
    if not reply.get("mapped"):
        _fatal(sock, f"the env could not map the sandbox's user: {reply.get('error')}")
    zygote = os.fork()
    if zygote == 0:
        _zygote(sock)
    sock.close()
    _, status = os.waitpid(zygote, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _zygote(sock: socket.socket) -> NoReturn:
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # pid 1 gets only signals it handles: now none at all
        tasks_before = 2 if jail.become_root() else 1  # this process, and the first one if it has our user
        jail.die_with_parent(signal.SIGKILL)  # after become_root: a change of user id clears it
        if not _process_limit_holds(tasks_before):
            _fatal(sock, "the kernel does not enforce the process limit for the sandbox's user (it maps to the "
                   "host's real root), so a fork bomb would not be stopped; run the env as another user")
        jail.forbid_nested_namespaces()
        jail.enter_empty_root()
        jail.undumpable()
    except OSError as exc:
        _fatal(sock, f"cannot set up the sandbox ({exc})")
    _send(sock, {"ready": True})
    read_exact = protocol.reader(sock.recv_into)
    while True:
        try:
            header, blobs = protocol.decode(read_exact, MAX_REQUEST_HEADER, MAX_REQUEST_BYTES)
        except EOFError:  # the env closed its end (or died): the namespace dies with this process
            os._exit(0)
        outcome, output, result = _supervise(header, blobs, sock, tasks_before)
        _wipe(blobs)
        _send(sock, outcome, [output.data(), result.data()])
        _wipe([output.buffer, result.buffer])


def _process_limit_holds(tasks_before: int) -> bool:
    """Whether the kernel enforces RLIMIT_NPROC here, with ``tasks_before`` tasks of our user counted
    already (it never does for the host's real root): a probe limited to itself must fail to fork."""
    probe = os.fork()
    if probe == 0:
        resource.setrlimit(resource.RLIMIT_NPROC, (tasks_before + 1, tasks_before + 1))
        try:
            if os.fork() == 0:
                os._exit(0)
        except BlockingIOError:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(probe, 0)
    _reap_orphans()
    return os.waitstatus_to_exitcode(status) == 0


def _supervise(header: dict[str, Any], blobs: list[bytearray], sock: socket.socket,
               tasks_before: int) -> tuple[dict, _Sink, _Sink]:
    """Run one execution in a fresh child; return how it ended, what it printed and its result message."""
    limits = header["limits"]
    stdin, stdin_end = os.pipe()
    os.close(stdin_end)  # the code reads end-of-file from stdin
    output_r, output_w = os.pipe()
    result_r, result_w = os.pipe()
    with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: the default size does too
        fcntl.fcntl(result_w, F_SETPIPE_SZ, PIPE_SIZE)
    start = time.monotonic()
    child = os.fork()
    if child == 0:
        execution.run(header, blobs, stdin, output_w, result_w, tasks_before)
    for fd in (stdin, output_w, result_w):
        os.close(fd)
    pidfd = os.pidfd_open(child)
    sinks = {output_r: _Sink("output", limits["max_output_bytes"]), result_r: _Sink("result", _max_result(limits))}
    stopped = _watch(pidfd, sock, sinks, start + limits["wall_s"])
    _kill_everything()
    _, status, usage = os.wait4(child, 0)
    _reap_orphans()
    for fd, sink in sinks.items():
        while not sink.over and sink.read_from(fd):  # the writers are dead: read to the end
            pass
        os.close(fd)
    os.close(pidfd)
    stopped = stopped or next((sink.name for sink in sinks.values() if sink.over), None)
    outcome = {"stopped": stopped, "wall_s": time.monotonic() - start, "cpu_s": usage.ru_utime + usage.ru_stime,
               "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
               "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
    return outcome, sinks[output_r], sinks[result_r]


def _watch(pidfd: int, sock: socket.socket, sinks: dict[int, _Sink], deadline: float) -> str | None:
    """Collect the child's bytes until it exits; why it was stopped early ("wall", "output", "result").

    ``poll``, not ``select``: the env's socket keeps its descriptor number, which may be above 1023.
    """
    poller = select.poll()
    for fd in (pidfd, sock.fileno(), *sinks):
        poller.register(fd, select.POLLIN)
    while True:
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            return "wall"
        ready = {fd for fd, _ in poller.poll(max(1, int(timeout * 1000)))}
        if sock.fileno() in ready:  # the env never writes during an execution: it hung up
            _kill_everything()
            os._exit(0)
        for fd in ready & set(sinks):
            if not sinks[fd].read_from(fd):
                poller.unregister(fd)
            elif sinks[fd].over:
                return sinks[fd].name
        if pidfd in ready:
            return None


class _Sink:
    """Bytes from one pipe, read in place into a buffer that doubles as it fills (so ``wipe`` can zero
    every copy), and known to be ``over`` once they pass ``bound``."""

    def __init__(self, name: str, bound: int):
        self.name, self.bound = name, bound
        self.buffer, self.size = bytearray(1 << 16), 0

    @property
    def over(self) -> bool:
        return self.size > self.bound

    def read_from(self, fd: int) -> bool:
        """One read, into whatever room is left; False at end of file."""
        if len(self.buffer) - self.size < 1 << 15:
            grown = bytearray(2 * len(self.buffer))
            grown[: self.size] = self.buffer[: self.size]
            _wipe([self.buffer])
            self.buffer = grown
        count = os.readv(fd, [memoryview(self.buffer)[self.size:]])
        self.size += count
        return count > 0

    def data(self) -> memoryview:
        return memoryview(self.buffer)[: self.size]


def _max_result(limits: dict[str, Any]) -> int:
    return limits["max_images"] * limits["max_image_pixels"] * 3 + (1 << 20)


def _kill_everything() -> None:
    """SIGKILL every process of the namespace but this one (pid 1 is spared by kill(-1))."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGKILL)


def _reap_orphans() -> None:
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _wipe(buffers: list[bytearray]) -> None:
    """Zero a request's code and images, and a reply's bytes, once sent: nothing of one execution stays
    in this process's memory for the next one (a fork of it) to find. (numpy's fill is a memset, in
    place; assigning a zero bytes object would allocate and fault in as much again.)"""
    for buffer in buffers:
        numpy.frombuffer(buffer, numpy.uint8).fill(0)


def _send(sock: socket.socket, header: dict[str, Any], blobs: list[memoryview] | None = None) -> None:
    for part in protocol.encode(header, blobs or []):
        sock.sendall(part)


def _fatal(sock: socket.socket, message: str) -> NoReturn:
    try:
        _send(sock, {"fatal": message})
    finally:
        os._exit(1)


if __name__ == "__main__":
    main()
