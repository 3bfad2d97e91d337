"""One execution, in a process forked from the warm worker: lock it down, run the code, send the result.

Runs only inside the sandbox (imported there as the top-level ``execution``). The order matters: the
process first keeps only its three pipes, gets a private scratch tmpfs, takes its resource limits, gives
up every capability and installs a seccomp filter; only then does it compile the untrusted code. What
the code prints goes to file descriptors 1 and 2 (a pipe the worker reads, and cuts off at the output
limit); its images and its error, if any, go as one protocol message to descriptor 3.
"""

from __future__ import annotations

import builtins
import errno
import io
import linecache
import os
import resource
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import jail
import numpy as np
import protocol
from PIL import Image

CODE_NAME = "<code>"
MAX_ERROR_CHARS = 2000
RESULT_FD = 3


def run(header: dict[str, Any], blobs: Sequence[bytes], stdin: int, output: int, result: int,
        tasks_before: int) -> NoReturn:
    """The child's whole life: never returns (``os._exit``), whatever the code does. ``tasks_before``:
    the worker's tasks that count against the same process limit."""
    main_pid = os.getpid()
    status = 0
    try:
        limits = header["limits"]
        _keep_only_pipes(stdin, output, result)
        jail.private_scratch(limits["scratch_mb"] << 20, limits["max_open_files"])
        _set_limits(limits, tasks_before)
        jail.drop_privileges()
        jail.forbid_syscalls()
        sys.stdout = sys.stderr = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                                   errors="backslashreplace", write_through=True)
        images, error = _execute(blobs[0].decode("utf-8"), blobs[1:], header["images"], limits,
                                 header.get("allowed_imports"))
        if os.getpid() == main_pid:  # a process the code forked reached the end too: it reports nothing
            _send_result(images, error)
    except BaseException:  # noqa: B036 - nothing may escape: say what failed, and the worker sees status 70
        os.write(2, traceback.format_exc()[-MAX_ERROR_CHARS:].encode("utf-8", "replace"))
        status = 70
    os._exit(status)


def _keep_only_pipes(stdin: int, output: int, result: int) -> None:
    """Descriptors 0-2 and 3 become the pipes; every other descriptor (the env's socket) is closed."""
    os.dup2(stdin, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.dup2(result, RESULT_FD)
    # Up to the file limit, or further: a descriptor inherited above a lowered limit stays open.
    os.closerange(RESULT_FD + 1, max(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1 << 16))


def _set_limits(limits: dict[str, Any], tasks_before: int) -> None:
    cpu = max(1, int(limits["cpu_s"] + 0.999))
    memory = limits["memory_mb"] << 20
    for kind, soft, hard in [
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL a second later
        (resource.RLIMIT_AS, memory, memory),
        # Tasks of this user in this user namespace: the worker's and the execution's processes and threads.
        (resource.RLIMIT_NPROC, tasks_before + limits["max_tasks"], tasks_before + limits["max_tasks"]),
        (resource.RLIMIT_NOFILE, limits["max_open_files"], limits["max_open_files"]),
        (resource.RLIMIT_FSIZE, limits["max_file_mb"] << 20, limits["max_file_mb"] << 20),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_MEMLOCK, 0, 0),
        (resource.RLIMIT_MSGQUEUE, 0, 0),
    ]:
        resource.setrlimit(kind, (soft, hard))


def _execute(code: str, blobs: Sequence[bytes], shapes: list[list[int]], limits: dict[str, Any],
             allowed_imports: list[str] | None) -> tuple[list[np.ndarray], str | None]:
    """Run ``code`` with the images bound to its globals; return the images it showed and its error."""
    arrays = []
    for (height, width), blob in zip(shapes, blobs, strict=True):
        array = np.frombuffer(blob, np.uint8).reshape(height, width, 3)
        array.flags.writeable = False
        arrays.append(array)
    shown: list[np.ndarray] = []
    namespace = {
        "__name__": "__main__",
        "__builtins__": _builtins(allowed_imports),
        "images": _PILImages(arrays),
        "arrays": arrays,
        "show": _show_function(shown, limits),
    }
    linecache.cache[CODE_NAME] = (len(code), None, code.splitlines(keepends=True), CODE_NAME)
    try:
        compiled = compile(code, CODE_NAME, "exec")
    except (SyntaxError, ValueError) as exc:
        return [], _short_error(exc, limits)
    try:
        exec(compiled, namespace)  # noqa: S102 - this is the sandbox
    except BaseException as exc:  # noqa: B036 - SystemExit and KeyboardInterrupt are the code's errors too
        return shown, _short_error(exc, limits)
    return shown, None


class _PILImages(Sequence):
    """``images[i]``: ``arrays[i]`` as a PIL image, made on first use (PIL copies RGB pixels, and most
    programs use only one of the two views)."""

    def __init__(self, arrays: list[np.ndarray]):
        self._arrays = arrays
        self._made: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self._arrays)

    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        array = self._arrays[index]  # an IndexError as from a list
        key = index % len(self._arrays)
        if key not in self._made:
            self._made[key] = Image.fromarray(array)
        return self._made[key]

    def __repr__(self) -> str:
        return f"<{len(self)} PIL images: {', '.join(f'{a.shape[1]}x{a.shape[0]}' for a in self._arrays)}>"


def _builtins(allowed: list[str] | None) -> dict[str, Any]:
    """The builtins the code sees; with an allow-list, ``import`` of anything else is a clear error.

    Not a security boundary (the code can reach the real ``__import__`` through any module): it tells an
    honest program what it may use. The boundary is the kernel's: namespaces, limits, no capabilities.
    """
    names = dict(vars(builtins))
    if allowed is None:
        return names
    real_import = builtins.__import__
    allowed_set = frozenset(allowed)

    def guarded_import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0):
        if level:
            raise ImportError("relative imports are not available here: the code is not in a package")
        if name.partition(".")[0] not in allowed_set:
            raise ImportError(f"module {name!r} is not available here; the modules you can import are: "
                              + ", ".join(sorted(allowed_set)))
        return real_import(name, globals, locals, fromlist, level)

    names["__import__"] = guarded_import
    return names


def _show_function(shown: list[np.ndarray], limits: dict[str, Any]) -> Callable[[Any], None]:
    max_images, max_pixels = limits["max_images"], limits["max_image_pixels"]

    def show(image: Any) -> None:
        """Return ``image`` (a PIL image, or a uint8/bool numpy array: H x W grey, H x W x 3 RGB or
        H x W x 4 RGBA) to the model as a new image; the next tool calls see it as the next index."""
        if len(shown) >= max_images:
            raise ValueError(f"show() was called more than {max_images} times; return at most {max_images} images")
        shown.append(_as_rgb(image, max_pixels))

    return show


def _as_rgb(image: Any, max_pixels: int) -> np.ndarray:
    if isinstance(image, Image.Image):
        _check_size(image.height, image.width, max_pixels)
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"show() takes a PIL image or a numpy array, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"show() takes an H x W, H x W x 3 or H x W x 4 array, got shape {image.shape}")
    _check_size(image.shape[0], image.shape[1], max_pixels)
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise TypeError(f"show() takes uint8 (or bool) pixels, got {image.dtype}; "
                        "convert with np.clip(a, 0, 255).astype(np.uint8)")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"show() got an empty {width}x{height} image")
    if height * width > max_pixels:
        raise ValueError(f"show() got a {width}x{height} image ({height * width} pixels); "
                         f"the limit is {max_pixels} pixels: crop or resize it first")


def _short_error(exc: BaseException, limits: dict[str, Any]) -> str:
    """The traceback through the code's own lines only, with a hint when a sandbox limit caused it."""
    summary = traceback.TracebackException.from_exception(exc)
    summary.stack = traceback.StackSummary.from_list([f for f in summary.stack if f.filename == CODE_NAME])
    text = "".join(summary.format()).rstrip()
    if len(text) > MAX_ERROR_CHARS:
        text = "...\n" + text[-MAX_ERROR_CHARS:]
    hint = _limit_hint(exc, limits)
    return f"{text}\n({hint})" if hint else text


def _limit_hint(exc: BaseException, limits: dict[str, Any]) -> str:
    if isinstance(exc, MemoryError):
        return f"the sandbox's memory limit is {limits['memory_mb']} MiB"
    code = getattr(exc, "errno", None)
    if code == errno.EAGAIN or "can't start new thread" in str(exc):
        return f"the sandbox allows {limits['max_tasks']} processes and threads in all"
    if code == errno.EMFILE:
        return f"the sandbox allows {limits['max_open_files']} open files"
    if code == errno.EFBIG:
        return f"files in the sandbox are at most {limits['max_file_mb']} MiB"
    if code == errno.ENOSPC:
        return f"the scratch directory holds at most {limits['scratch_mb']} MiB"
    if code == errno.EROFS:
        return "only the working directory, /scratch, is writable"
    return ""


def _send_result(images: list[np.ndarray], error: str | None) -> None:
    header = {"error": error, "images": [protocol.image_header(a.shape) for a in images]}
    with io.FileIO(RESULT_FD, "w", closefd=False) as out:
        for part in protocol.encode(header, [a.data for a in images]):
            view = memoryview(part)
            while view:
                view = view[out.write(view):]
