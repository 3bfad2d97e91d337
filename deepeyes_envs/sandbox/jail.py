"""The Linux calls that build the sandbox: namespaces, an empty read-only root, dropped capabilities.

Runs only inside the sandbox worker (imported there as the top-level ``jail``; the env process never
imports it), before any untrusted code exists in the process. Python 3.11 has no wrappers for
``unshare``, ``mount``, ``pivot_root`` or ``capset``, so they go through ``ctypes`` and libc; each
failure raises ``OSError`` naming the call, which the worker reports to the env as a setup error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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

MACHINES = ("x86_64", "aarch64")  # the machines whose system call numbers are below
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000
# Refused to the code (EPERM) by a seccomp filter: kernel interfaces an unprivileged process can still
# reach and that kernel exploits favour, and, again, the mount and namespace calls no capability allows.
DENIED_SYSCALLS = {  # name: (x86_64, aarch64)
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "perf_event_open": (298, 241), "bpf": (321, 280), "userfaultfd": (323, 282), "personality": (135, 92),
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "unshare": (272, 97), "setns": (308, 268), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432),
    "fspick": (433, 433), "mount_setattr": (442, 442),
}
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x06
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
    number = syscall_number("pivot_root")
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


def syscall_number(name: str) -> int:
    machine = platform.machine()
    if machine not in MACHINES:
        raise OSError(0, f"the sandbox knows the system calls of {' and '.join(MACHINES)}, not {machine}")
    return DENIED_SYSCALLS[name][MACHINES.index(machine)]


def forbid_syscalls() -> None:
    """Install a seccomp filter that refuses DENIED_SYSCALLS (EPERM) and kills the process on a foreign
    system call convention (x32 on x86_64, another architecture's numbers). Needs no_new_privs."""
    machine = platform.machine()
    numbers = sorted({syscall_number(name) for name in DENIED_SYSCALLS})
    checks = ([(BPF_JGE_K, X32_SYSCALL_BIT)] if machine == "x86_64" else []) + [(BPF_JEQ_K, n) for n in numbers]
    deny = 4 + len(checks) + 1  # the index of the final "refuse" instruction
    program = [(BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
               (BPF_JEQ_K, 1, 0, AUDIT_ARCH[machine]),
               (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
               (BPF_LD_W_ABS, 0, 0, 0)]  # seccomp_data.nr
    for code, value in checks:
        program.append((code, deny - len(program) - 1, 0, value))
    program += [(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW), (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)]

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

    instructions = (Instruction * len(program))(*(Instruction(*i) for i in program))
    filter_program = Program(len(program), instructions)
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(filter_program), 0, 0), "prctl seccomp")


def undumpable() -> None:
    """No ptrace, no /proc/PID/mem, no core file: a process of the same user cannot read this one."""
    _check(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl dumpable")


def die_with_parent(signal_number: int) -> None:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal_number, 0, 0, 0), "prctl pdeathsig")
