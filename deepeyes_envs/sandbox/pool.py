"""The env side of the sandbox: warm workers, one call that runs code in one, and their cleanup.

A :class:`SandboxPool` starts ``size`` worker processes (``worker.py``), each in its own namespaces
with numpy and PIL already imported. ``run`` sends code and images to an idle worker, which forks a
pristine child for that one execution and kills it (and anything it started) afterwards; so a
trivial program costs a fork, not an interpreter start, and no execution sees another's state.

A worker that dies, hangs or breaks the protocol costs only its current execution (an error result)
and is replaced on next use: nothing it does raises in the env. Workers end when the pool is closed,
collected or the interpreter exits; if the env process is killed, each worker sees its socket close
and ends with everything it started. A pool is owned by the process that made it: in a forked child
(AsyncVectorEnv, Ray) it starts workers of its own and never touches its parent's.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import protocol
from .limits import ALLOWED_IMPORTS, DEFAULT_LIMITS, Limits
from .results import ExecutionResult, read_result, worker_failure

WORKER = Path(__file__).with_name("worker.py")
NOBODY = 65534  # the id the sandbox's root maps to when the env runs as root
GRACE_S = 10.0  # how long past the wall limit the env waits for a worker before replacing it
MAX_HEADER = 1 << 20
# The worker's environment: no variable of the env process (keys, tokens) reaches sandboxed code.
WORKER_ENV = {"LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (no user namespaces, say); code is never run unsandboxed."""


class SandboxPool:
    """``size`` warm sandbox workers. Thread-safe; a context manager; see the module docstring."""

    def __init__(self, size: int = 1, *, startup_timeout_s: float = 60.0, grace_s: float = GRACE_S):
        """``grace_s``: how long past an execution's wall limit to wait for its worker's answer before
        the worker counts as hung and is replaced."""
        if size < 1:
            raise ValueError(f"a sandbox pool needs at least one worker, got {size}")
        self.size, self.startup_timeout_s, self.grace_s = size, startup_timeout_s, grace_s
        self._start()

    def _start(self) -> None:
        self._owner = os.getpid()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _close_workers, self._workers, self._owner)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for _ in range(self.size):
            worker = _Worker(self.startup_timeout_s)
            self._workers.append(worker)
            self._idle.put(worker)

    @property
    def pids(self) -> list[int]:
        """Host pids of the workers' first processes (each is the parent of its zygote)."""
        return [w.process.pid for w in self._workers]

    def run(self, code: str, images: Sequence[np.ndarray] = (), limits: Limits = DEFAULT_LIMITS,
            allowed_imports: Optional[Sequence[str]] = ALLOWED_IMPORTS) -> ExecutionResult:
        """Run ``code`` with ``images`` (uint8 H x W x 3) bound to ``images``/``arrays`` in its globals.

        ``allowed_imports=None`` lifts the import allow-list (the sandbox holds without it). Bad
        arguments raise ``TypeError``/``ValueError``; everything the code does comes back as a result.
        """
        request = _request(code, images, limits, allowed_imports)
        if self._owner != os.getpid():  # inherited through fork: this process gets workers of its own
            self._start()
        if not self._finalizer.alive:
            raise RuntimeError("the sandbox pool is closed")
        worker = self._idle.get()
        try:
            if worker.dead:
                worker = self._replace(worker)
            return worker.run(request, limits, self.grace_s)
        finally:
            self._idle.put(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.close()
        fresh = _Worker(self.startup_timeout_s)
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        """Stop every worker and everything they started (idempotent)."""
        self._finalizer()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close_workers(workers: list[_Worker], owner: int) -> None:
    if os.getpid() == owner:
        for worker in workers:
            worker.close()


def _request(code: Any, images: Sequence[np.ndarray], limits: Limits,
             allowed: Optional[Sequence[str]]) -> tuple[dict[str, Any], list[Any]]:
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    try:
        source = code.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"code is not valid text: {exc}") from None
    total = 0
    for i, image in enumerate(images):
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
            raise TypeError(f"image {i} must be a uint8 H x W x 3 array")
        total += image.nbytes
    if total > limits.max_input_mb << 20:
        raise ValueError(f"the images ({total / 2**20:.0f} MiB) exceed the sandbox's input limit of "
                         f"{limits.max_input_mb} MiB")
    header = {"op": "run", "limits": limits.to_wire(), "images": [protocol.image_header(a.shape) for a in images],
              "allowed_imports": None if allowed is None else list(allowed)}
    return header, [source, *(np.ascontiguousarray(a).data for a in images)]


class _Worker:
    """One worker process and the env's end of its socket."""

    def __init__(self, startup_timeout_s: float):
        self._owner = os.getpid()
        ours, theirs = socket.socketpair()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - the worker's stderr, kept open while it lives
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-E", "-s", str(WORKER), str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log, env=WORKER_ENV,
                start_new_session=True)
        finally:
            theirs.close()
        self.sock, self._closed = ours, False
        _LIVE.add(self)
        self.sock.settimeout(startup_timeout_s)
        try:
            self._expect("stage")
            error = self._map_ids()
            self._send({"mapped": error is None, "error": error})
            self._expect("ready")
        except BaseException:
            self.close()
            raise

    def _expect(self, key: str) -> None:
        try:
            header, _ = self._receive(0)
        except (OSError, EOFError, protocol.ProtocolError) as exc:
            raise SandboxUnavailable(f"the sandbox worker failed to start ({exc}); its log:\n"
                                     f"{self._stderr()}") from None
        if "fatal" in header or key not in header:
            raise SandboxUnavailable(f"{header.get('fatal', header)}. The code tool needs Linux user namespaces "
                                     "(see docs/code-tool.md, 'Requirements').")

    def _map_ids(self) -> Optional[str]:
        """Map the namespace's root to an unprivileged user: nobody when the env is root (the kernel never
        enforces the process limit for the host's real root), else the env's own user; root inside a user
        namespace of its own (a rootless container) may lack nobody, and falls back to its own id (the
        worker then checks that the process limit holds). Returns why mapping failed, or None."""
        uid, gid = os.geteuid(), os.getegid()
        proc = Path(f"/proc/{self.process.pid}")
        error = None
        for outside_uid, outside_gid in ([(NOBODY, NOBODY)] if uid == 0 else []) + [(uid, gid)]:
            try:
                if uid != 0:
                    (proc / "setgroups").write_text("deny")
                (proc / "uid_map").write_text(f"0 {outside_uid} 1\n")
                (proc / "gid_map").write_text(f"0 {outside_gid} 1\n")
                return None
            except OSError as exc:
                error = f"{exc} (mapping uid 0 to {outside_uid})"
        return error

    @property
    def dead(self) -> bool:
        return self._closed or self.process.poll() is not None

    def run(self, request: tuple[dict[str, Any], list[Any]], limits: Limits, grace_s: float) -> ExecutionResult:
        try:
            self.sock.settimeout(limits.wall_s + grace_s)
            self._send(*request)
            outcome, (output, result) = self._receive(limits.max_output_bytes + _result_bound(limits) + (1 << 20))
        except (OSError, EOFError, ValueError, protocol.ProtocolError) as exc:
            self.close(wait_s=0)
            return worker_failure(exc)
        except BaseException:  # interrupted mid-message (KeyboardInterrupt): the stream is out of step
            self.close(wait_s=0)
            raise
        return read_result(outcome, output, result, limits)

    def _send(self, header: dict[str, Any], blobs: Sequence[Any] = ()) -> None:
        for part in protocol.encode(header, blobs):
            self.sock.sendall(part)

    def _receive(self, max_bytes: int) -> tuple[dict[str, Any], list[bytearray]]:
        return protocol.decode(protocol.reader(self.sock.recv_into), MAX_HEADER, max_bytes)

    def _stderr(self) -> str:
        self._log.seek(0)
        return self._log.read(8192).decode("utf-8", "replace")

    def disown(self) -> None:
        """In a forked child: drop the inherited copy of the socket, so that the worker still sees it close
        when its owner hangs up, and never signal the owner's worker from here."""
        self._closed = True
        self.sock.close()

    def close(self, wait_s: float = 5.0) -> None:
        """Hang up (the worker then ends, with everything it started) and reap it; kill it if it lingers
        past ``wait_s`` (0 for a worker that failed: it may be hung)."""
        self._closed = True
        self.sock.close()
        if self._owner != os.getpid():
            return
        try:
            self.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def _result_bound(limits: Limits) -> int:
    return limits.max_images * limits.max_image_pixels * 3 + (1 << 20)


_LIVE: weakref.WeakSet[_Worker] = weakref.WeakSet()


def _disown_after_fork() -> None:
    for worker in list(_LIVE):
        worker.disown()


os.register_at_fork(after_in_child=_disown_after_fork)

