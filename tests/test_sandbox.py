"""The sandbox holds against hostile programs, with the import allow-list lifted.

Every program here runs with full builtins (``allowed_imports=None``), as a program that found its way
around the allow-list would: what stops it must be the kernel (namespaces, an empty read-only root, no
capabilities, resource limits) or the worker (wall clock, output), never a Python-level check. Each
test also shows that the pool still works afterwards.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from sandbox_helpers import descendants, host_uid, running_as_root, sandbox_processes, wait_until_gone

from deepeyes_envs.sandbox import Limits, SandboxPool, SandboxUnavailable, jail

ROOT = Path(__file__).resolve().parents[1]
FAST = Limits(cpu_s=1, wall_s=3)
SYSCALLS = {"x86_64": {"getpid": 39, "clone": 56}, "aarch64": {"getpid": 172, "clone": 220}}[platform.machine()]


@pytest.fixture(scope="module")
def pool():
    with SandboxPool() as p:
        yield p


def run(pool: SandboxPool, code: str, limits: Limits = FAST, images=()):
    return pool.run(textwrap.dedent(code), images, limits, allowed_imports=None)


def still_works(pool: SandboxPool) -> None:
    result = pool.run("print(6 * 7)")
    assert result.ok and result.output == "42\n", result


def test_code_runs_with_images_and_shows_new_ones(pool):
    image = np.zeros((30, 40, 3), np.uint8)
    image[5:10, 5:20] = (200, 10, 10)
    result = pool.run("import numpy as np\nprint(arrays[0].shape, images[0].size, arrays[1].mean())\n"
                      "show(images[0].crop((5, 5, 20, 10)))\nshow(arrays[0][:, :, 0] > 100)",
                      [image, np.full((2, 2, 3), 7, np.uint8)])
    assert result.ok, result.error
    assert result.output == "(30, 40, 3) (40, 30) 7.0\n"
    crop, mask = result.images
    assert crop.shape == (5, 15, 3) and (crop == (200, 10, 10)).all()
    assert mask.shape == (30, 40, 3) and mask.sum() == 5 * 15 * 3 * 255 and not mask.flags.writeable
    views = pool.run("print(len(images), images[-1].size, [im.size for im in images[:1]], images[0] is images[-2])\n"
                     "arrays[0][0, 0] = 1", [image, np.zeros((2, 3, 3), np.uint8)])
    assert views.output == "2 (3, 2) [(40, 30)] True\n"  # PIL images are made once, on first use
    assert "ValueError: assignment destination is read-only" in views.error


def test_no_network_even_to_a_server_on_the_hosts_loopback(pool):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    port, accepted, stop = server.getsockname()[1], [], threading.Event()

    def serve():
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # the server works from the host
        deadline = time.monotonic() + 10
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(accepted) == 1
        result = run(pool, f"""
            import socket
            print([name for _, name in socket.if_nameindex()])
            for host in ("127.0.0.1", "10.0.0.1"):
                s = socket.socket()
                s.settimeout(2)
                try:
                    s.connect((host, {port}))
                    print("connected to", host)
                except OSError as exc:
                    print(host, exc.errno, exc.strerror)
        """)
        time.sleep(0.3)  # an accept would have happened by now; the assertion below is on behaviour only
    finally:
        stop.set()
        thread.join()
        server.close()
    assert result.ok, result.error
    assert result.output.splitlines() == ["['lo']", "127.0.0.1 101 Network is unreachable",
                                          "10.0.0.1 101 Network is unreachable"]
    assert len(accepted) == 1  # only the host's own connection


def test_sees_no_host_file_and_writes_only_scratch(pool, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the answer is 42")
    project_file = ROOT / "README.md"
    result = run(pool, f"""
        import json, os
        report = {{"root": sorted(os.listdir("/")), "cwd": os.getcwd(), "proc": os.path.exists("/proc/self")}}
        for path in ({str(secret)!r}, "/etc/passwd", {str(project_file)!r}, {sys.executable!r}):
            try:
                report[path] = open(path).read()[:20]
            except OSError as exc:
                report[path] = exc.strerror
        for path in ({str(tmp_path / "escape.txt")!r}, "/escape.txt", "/scratch/../escape.txt"):
            try:
                open(path, "w").write("out")
                report["wrote " + path] = "yes"
            except OSError as exc:
                report["wrote " + path] = exc.strerror
        open("inside.txt", "w").write("scratch is writable")
        report["scratch"] = open("/scratch/inside.txt").read()
        print(json.dumps(report))
    """)
    assert result.ok, result.error
    report = json.loads(result.output)
    assert report.pop("root") == ["scratch"] and report.pop("cwd") == "/scratch" and report.pop("proc") is False
    assert report.pop("scratch") == "scratch is writable"
    for path in (str(secret), "/etc/passwd", str(project_file), sys.executable):
        assert report.pop(path) == "No such file or directory", path
    assert report.pop("wrote " + str(tmp_path / "escape.txt")) == "No such file or directory"
    assert report == {"wrote /escape.txt": "Read-only file system", "wrote /scratch/../escape.txt": "Read-only file system"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"] and not Path("/escape.txt").exists()


def test_each_execution_starts_pristine(pool):
    first = run(pool, """
        import builtins, numpy as np
        np.sum = lambda *args: 666
        builtins.LEAK = "from the previous sample"
        open("/scratch/left.txt", "w").write("x")
        print(np.sum([1, 2]))
    """)
    assert first.output == "666\n"
    second = run(pool, """
        import builtins, os, numpy as np
        print(np.sum([1, 2]), hasattr(builtins, "LEAK"), os.listdir("/scratch"))
    """)
    assert second.ok and second.output == "3 False []\n", second


def test_no_environment_variables_and_no_inherited_descriptors(monkeypatch):
    monkeypatch.setenv("DEEPEYES_TEST_SECRET", "s3cret-token")
    with SandboxPool() as fresh:  # started with the secret in the env process's environment
        result = run(fresh, """
            import os
            fds = []
            for fd in range(1024):
                try:
                    os.fstat(fd)
                    fds.append(fd)
                except OSError:
                    pass
            print(fds, sorted(os.environ))
        """)
    assert result.ok, result.error
    fds, names = result.output.split("] ")
    assert fds == "[0, 1, 2, 3"  # stdin (empty), stdout and stderr (one pipe), the result pipe
    assert "s3cret" not in result.output and "DEEPEYES_TEST_SECRET" not in names


def test_no_capabilities_no_new_namespaces_no_ptrace(pool):
    result = run(pool, """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        def call(name, *args):
            value = getattr(libc, name)(*args)
            return f"{name}={value} {os.strerror(ctypes.get_errno()) if value == -1 else ''}".strip()
        print(call("mount", b"tmpfs", b"/scratch", b"tmpfs", 0, None))
        print(call("mount", None, b"/", None, 32, None))  # remount / read-write
        print(call("unshare", 0x10000000))  # a new user namespace
        print(call("unshare", 0x40000000))  # a new network namespace
        print("clone", call("syscall", NUMBERS["clone"], 0x10000000 | 17, 0, 0, 0, 0))  # a child in a new one
        print(call("ptrace", 16, 1, None, None))  # attach to the warm worker, pid 1
        print(call("chroot", b"/scratch"))
        print("system", libc.system(b"id"))
        # refused by the seccomp filter alone: each works for an unprivileged process elsewhere
        buffer = ctypes.create_string_buffer(256)
        for name, args in (("personality", (0xFFFFFFFF,)), ("io_uring_setup", (1, buffer)), ("userfaultfd", (0,)),
                           ("bpf", (0, buffer, 128)), ("keyctl", (0, -3, 0)), ("process_vm_readv", (1, 0, 0, 0, 0, 0))):
            print(name, call("syscall", NUMBERS[name], *args))
        print("x32", call("syscall", 0x40000000 | NUMBERS["personality"], 0xFFFFFFFF))
        print("getpid", call("syscall", NUMBERS["getpid"]))
    """.replace("NUMBERS", repr({**{n: jail.syscall_number(n) for n in jail.DENIED_SYSCALLS}, **SYSCALLS})))
    assert result.ok, result.error
    refused = "syscall=-1 Operation not permitted"
    *lines, getpid = result.output.splitlines()
    assert lines == [
        "mount=-1 Operation not permitted", "mount=-1 Operation not permitted",
        "unshare=-1 Operation not permitted", "unshare=-1 Operation not permitted",
        "clone syscall=-1 No space left on device",  # the user namespace limit of 0
        "ptrace=-1 Operation not permitted", "chroot=-1 Operation not permitted",
        "system 32512",  # /bin/sh does not exist: exit status 127
        f"personality {refused}", f"io_uring_setup {refused}", f"userfaultfd {refused}", f"bpf {refused}",
        f"keyctl {refused}", f"process_vm_readv {refused}", f"x32 {refused}",
    ]
    assert int(getpid.removeprefix("getpid syscall=")) > 2  # allowed (pid 1 is the zygote, 2 its start-up probe)
    if running_as_root():  # the namespace's root is nobody on the host
        (zygote,) = descendants(pool.pids[0])
        assert host_uid(zygote) == 65534


def test_no_programs_to_run(pool):
    result = run(pool, """
        import os, subprocess, sys
        print(os.system("echo pwned > /scratch/p"), os.path.exists("/scratch/p"))
        for argv in (["/bin/sh", "-c", "id"], [sys.executable, "-c", "print(1)"]):
            try:
                subprocess.run(argv)
            except OSError as exc:
                print(type(exc).__name__)
        os.execv("/bin/sh", ["sh"])
    """)
    assert result.status == "error" and result.output == "32512 False\nFileNotFoundError\nFileNotFoundError\n"
    assert "FileNotFoundError" in result.error and "os.execv" in result.error


def test_signals_cannot_reach_the_worker(pool):
    result = run(pool, """
        import os, signal
        for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGSTOP):
            os.kill(1, sig)
        print("pid 1 ignored them")
        os.kill(-1, signal.SIGKILL)  # every process it may signal but itself and pid 1: there are none
    """)
    assert result.output == "pid 1 ignored them\n"
    assert result.status == "error" and "ProcessLookupError: [Errno 3] No such process" in result.error
    still_works(pool)


@pytest.mark.parametrize(("code", "status", "message"), [
    ("while True: pass", "cpu", "more than 1 s of CPU time"),
    # SIGXCPU ignored: the hard limit, a second later, kills it
    pytest.param("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass", "cpu",
                 "of CPU time", marks=pytest.mark.slow),
    ("import time\ntime.sleep(60)", "wall", "more than 1 s (wall clock)"),
    ("x = bytearray(2 << 30)", "error", "MemoryError\n(the sandbox's memory limit is 1024 MiB)"),
    ("import numpy\nnumpy.ones((40000, 40000))", "error", "Unable to allocate"),
    ("print(input())", "error", "EOFError"),
    ("print('x' * 100_000_000)", "output", "printed more than 16384 bytes"),
    ("import os\nwhile True: os.write(2, b'y' * 65536)", "output", "printed more than"),
    ("import os\nos.abort()", "crash", "SIGABRT"),
    ("import ctypes\nctypes.string_at(0)", "crash", "SIGSEGV"),
    ("import os\nos._exit(3)", "exit", "exit status 3"),
    ("import os\nos._exit(0)", "exit", "ended its process before it finished"),
    ("import os\nos.write(3, bytes([0, 0, 0, 20]) + b'{\"blobs\": [99999]}  ')\nos._exit(0)", "exit",
     "overwrote the sandbox's result channel"),
    ("fs = [open(f'f{i}', 'w') for i in range(1000)]", "error", "Too many open files: 'f28'\n(the sandbox allows 32 open files)"),
    ("open('big', 'wb').write(bytes(20 << 20))", "error", "File too large\n(files in the sandbox are at most 16 MiB)"),
    ("for i in range(4):\n    open(f'{i}', 'wb').write(bytes(12 << 20))", "error",
     "No space left on device\n(the scratch directory holds at most 32 MiB)"),
    ("from PIL import Image\nshow(Image.new('L', (20000, 20000)))", "error", "the limit is 16777216 pixels"),
    ("import numpy as np\nshow(np.broadcast_to(np.zeros(3, np.uint8), (20000, 20000, 3)))", "error",
     "20000x20000 image (400000000 pixels)"),
    ("show('a picture')", "error", "show() takes a PIL image or a numpy array, got str"),
    ("import numpy as np\nshow(np.zeros((9, 9, 5), np.uint8))", "error", "got shape (9, 9, 5)"),
    ("import numpy as np\nshow(np.zeros((9, 9)))", "error", "uint8 (or bool) pixels, got float64"),
    ("import numpy as np\nfor _ in range(5): show(np.zeros((2, 2), np.uint8))", "error", "more than 4 times"),
    ("def f(): f()\nf()", "error", "RecursionError"),
    ("print(1", "error", "SyntaxError: '(' was never closed"),
    ("x = '\0'", "error", "null"),
])
def test_limits_end_the_execution_with_a_clear_error(pool, code, status, message):
    # CPU limits get a generous wall clock: on a busy machine a second of CPU can take many seconds.
    limits = {"cpu": Limits(cpu_s=1, wall_s=60), "wall": Limits(wall_s=1)}.get(status, FAST)
    result = run(pool, code, limits)
    assert result.status == status, result
    assert message in result.error, result.error
    still_works(pool)


def test_fork_and_thread_bombs_stop_at_the_task_limit(pool):
    limits = Limits(cpu_s=2, wall_s=5, max_tasks=6)
    forks = run(pool, """
        import os
        n = 0
        try:
            while True:
                if os.fork() == 0:
                    while True:
                        pass  # each child spins until the worker kills it
                n += 1
        finally:
            print("forked", n)
    """, limits)
    assert forks.status == "error" and forks.output == "forked 5\n"  # 6 tasks: the execution and 5 children
    assert "BlockingIOError" in forks.error and "allows 6 processes and threads" in forks.error
    assert len(descendants(pool.pids[0])) == 1  # the spinning children are gone: only the zygote is left
    threads = run(pool, """
        import _thread, time
        n = 0
        try:
            while True:
                _thread.start_new_thread(time.sleep, (60,))
                n += 1
        finally:
            print("started", n)
    """, limits)
    assert threads.status == "error" and threads.output == "started 5\n"
    assert "can't start new thread" in threads.error
    classic = run(pool, "import os\nwhile True: os.fork()", limits)
    assert classic.status in ("error", "cpu", "wall") and classic.error
    still_works(pool)
    assert len(descendants(pool.pids[0])) == 1


@pytest.mark.slow
def test_a_killed_or_hung_worker_costs_one_execution():
    with SandboxPool(grace_s=1) as own:
        outer = own.pids[0]
        results = []
        thread = threading.Thread(target=lambda: results.append(own.run("import time\ntime.sleep(30)", limits=Limits(
            wall_s=30), allowed_imports=None)))
        thread.start()
        deadline = time.monotonic() + 30
        while len(descendants(outer)) < 2 and time.monotonic() < deadline:  # the zygote and the execution
            time.sleep(0.01)
        zygote = next(p for p, parent in sandbox_processes().items() if parent == outer)
        os.kill(zygote, signal.SIGKILL)
        thread.join()
        assert results[0].status == "worker" and "replaced" in results[0].error
        still_works(own)
        assert own.pids[0] != outer and not wait_until_gone({outer, zygote})

        outer = own.pids[0]
        (zygote,) = descendants(outer)
        os.kill(zygote, signal.SIGSTOP)  # hung: it never answers
        hung = own.run("print(1)", limits=Limits(wall_s=1))
        assert hung.status == "worker" and "timed out" in hung.error
        still_works(own)
        assert not wait_until_gone({outer, zygote})


def test_workers_end_with_the_pool_and_with_a_killed_env_process():
    own = SandboxPool(size=2)
    pids = set(own.pids) | {p for w in own.pids for p in descendants(w)}
    assert len(pids) == 4  # two workers, each with its zygote
    own.close()  # returns once every worker has ended
    assert not (pids & set(sandbox_processes()))
    with pytest.raises(RuntimeError, match="closed"):
        own.run("print(1)")

    script = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from deepeyes_envs.sandbox import SandboxPool\n"
              "p = SandboxPool(); assert p.run('print(1)').ok; print(p.pids[0], flush=True)\n"
              "os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    outer = int(out.stdout)
    assert not wait_until_gone({outer}), "the worker outlived the killed env process"


def _use_pool_in_child(pool: SandboxPool, queue) -> None:
    result = pool.run("print('child')")
    queue.put((result.output, pool.pids))


def test_a_forked_child_gets_workers_of_its_own(pool):
    before = pool.pids
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_use_pool_in_child, args=(pool, queue))
    child.start()
    output, child_pids = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and output == "child\n"
    assert set(child_pids).isdisjoint(before)
    assert not wait_until_gone(set(child_pids))  # closed when the child exited
    assert pool.pids == before
    still_works(pool)


def _wait_for(event) -> None:
    event.wait(120)


def test_a_forked_child_does_not_keep_the_parents_workers_alive():
    """The child drops its inherited copy of the worker's socket: the worker sees its owner hang up and ends
    by itself (exit status 0), not killed after a timeout, while the child still runs."""
    own = SandboxPool()
    context = multiprocessing.get_context("fork")
    done = context.Event()
    child = context.Process(target=_wait_for, args=(done,))
    child.start()
    try:
        worker = own._workers[0]
        own.close()
        assert child.is_alive() and worker.process.returncode == 0
    finally:
        done.set()
        child.join(60)


def test_without_user_namespaces_construction_fails_clearly():
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from deepeyes_envs.sandbox import SandboxPool, SandboxUnavailable\n"
              "try:\n    SandboxPool()\nexcept SandboxUnavailable as exc:\n    print('unavailable:', exc)\n")
    out = subprocess.run(["unshare", "--user", "--map-root-user", "sh", "-c",
                          'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1"', sys.executable, script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("unavailable: cannot create the sandbox's namespaces"), out.stdout
    assert "needs Linux user namespaces" in out.stdout
    assert issubclass(SandboxUnavailable, RuntimeError)


def test_an_env_process_with_many_open_files():
    """The worker's socket keeps its descriptor number (here above 1023, select's limit), and the
    execution still holds only its own four descriptors."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with SandboxPool() as crowded:
            result = run(crowded, """
                import os
                def is_open(fd):
                    try:
                        os.fstat(fd)
                        return True
                    except OSError:
                        return False
                print([fd for fd in range(4096) if is_open(fd)])
            """)
    finally:
        for fd in held:
            os.close(fd)
    assert result.ok and result.output == "[0, 1, 2, 3]\n", result


def test_where_the_process_limit_would_not_hold_construction_fails_clearly():
    """Root inside a user namespace that maps it to the host's real root (``unshare --map-root-user`` run
    as root): nobody is not mapped there, the sandbox's user falls back to that root, for which the kernel
    never enforces RLIMIT_NPROC; the worker's probe notices and the sandbox refuses to start."""
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from deepeyes_envs.sandbox import SandboxPool, SandboxUnavailable\n"
              "try:\n    SandboxPool()\nexcept SandboxUnavailable as exc:\n    print('unavailable:', exc)\n")
    out = subprocess.run(["unshare", "--user", "--map-root-user", sys.executable, "-c", script],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if running_as_root():
        assert out.stdout.startswith("unavailable: the kernel does not enforce the process limit"), out.stdout
    else:  # the namespace's root is this user, and the limit holds for it
        assert out.stdout == "", out.stdout
