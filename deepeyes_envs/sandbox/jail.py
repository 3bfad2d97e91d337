"""The Linux calls that build the sandbox: namespaces, an empty read-only root, dropped capabilities.

Runs only inside the sandbox worker (imported there as the top-level ``jail``; the env process never
imports it), before any untrusted code exists in the process. Python 3.11 has no wrappers for
``unshare``, ``mount``, ``pivot_root`` or ``capset``, so they go through ``ctypes`` and libc; each
failure raises ``OSError`` naming the call, which the worker reports to the env as a setup error.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# Everything the worker can own: its users, mounts, network, System V IPC, host name, cgroup view and pids.
ALL_NAMESPACES = (CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
                  | CLONE_NEWPID)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_REC, MS_PRIVATE = 32, 16384, 1 << 18
MNT_DETACH = 2
LOCKED_DOWN = MS_NOSUID | MS_NODEV | MS_NOEXEC

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS = 1, 4, 24, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
# noroot, no setuid fixup and no ambient raise, each locked; keep-caps locked off: root's powers never return.
SECUREBITS = 0b11101111
CAPABILITY_VERSION_3 = 0x20080522

PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
SCRATCH = "/scratch"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, call: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{call}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    args = [None if v is None else v.encode() for v in (source, target, fstype)]
    _check(_libc.mount(*args, ctypes.c_ulong(flags), None if data is None else data.encode()), f"mount {target}")


def become_root() -> bool:
    """Take the user id the env mapped for us (root inside, an unprivileged id outside), without
    supplementary groups, so files the process creates have an owner the namespace knows.

    Returns whether this process already had that id: then the worker's first process (which stays as
    it started) has it too, and counts against the same process limit.
    """
    already = os.getuid() == 0  # an id outside the map reads as the overflow id, 65534
    with contextlib.suppress(PermissionError):  # an unprivileged env had to deny setgroups to map our group
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    return already


def forbid_nested_namespaces() -> None:
    """Set this user namespace's limit on new user namespaces to 0, so sandboxed code cannot create one
    (and with it fresh capabilities over new, empty namespaces: kernel attack surface). Other kinds of
    namespace need a capability the code never has; executions still get mount namespaces of their own."""
    with open("/proc/sys/user/max_user_namespaces", "w") as fh:
        fh.write("0")


def enter_empty_root(mountpoint: str = "/tmp") -> None:
    """Replace the filesystem with an empty, read-only tmpfs holding one directory, ``/scratch``.

    The tmpfs is mounted over ``mountpoint`` in this (private) mount namespace, becomes the root by
    ``pivot_root``, and the old root is detached: no path leads to a host file any more, and the
    Python modules the worker needs must be imported before this call.
    """
    number = PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(0, f"pivot_root: unknown system call number on {platform.machine()}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", mountpoint, "tmpfs", LOCKED_DOWN, "size=64k,nr_inodes=16,mode=0755")
    os.mkdir(os.path.join(mountpoint, "old-root"))
    os.mkdir(os.path.join(mountpoint, SCRATCH.lstrip("/")))
    _check(_libc.syscall(ctypes.c_long(number), mountpoint.encode(), f"{mountpoint}/old-root".encode()), "pivot_root")
    os.chdir("/")
    _check(_libc.umount2(b"/old-root", ctypes.c_int(MNT_DETACH)), "umount old root")
    os.rmdir("/old-root")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | LOCKED_DOWN)


def private_scratch(size_bytes: int, max_files: int) -> None:
    """A mount namespace of this process alone, with a fresh tmpfs of ``size_bytes`` at ``/scratch``
    as the working directory: all it writes vanishes with it, and nothing else is writable."""
    unshare(CLONE_NEWNS)
    _mount("tmpfs", SCRATCH, "tmpfs", LOCKED_DOWN, f"size={size_bytes},nr_inodes={max_files + 1},mode=0755")
    os.chdir(SCRATCH)


def drop_privileges() -> None:
    """Give up every capability for good: bounding set, ambient set, secure bits, then the sets themselves."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:  # EINVAL past the kernel's last capability
        cap += 1
    if cap == 0:
        _check(-1, "prctl capbset_drop")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl cap_ambient")
    _check(_libc.prctl(PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0), "prctl securebits")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(_libc.capset(ctypes.byref(Header(CAPABILITY_VERSION_3, 0)), (Data * 2)()), "capset")


def undumpable() -> None:
    """No ptrace, no /proc/PID/mem, no core file: a process of the same user cannot read this one."""
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")


def die_with_parent(signal_number: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0), "prctl pdeathsig")
