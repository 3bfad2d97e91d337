"""What an execution gave back, read by the env within its own limits, with every ending explained.

The worker reports how the execution ended (exit status, signal, or which limit it cut off) and relays
two byte strings it never parsed: the printed text, and the result message the code's process wrote
(its error and the images it showed). Both are untrusted; this module bounds and checks them.
"""

from __future__ import annotations

import io
import signal
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import protocol
from .limits import Limits


@dataclass(frozen=True)
class ExecutionResult:
    """``status`` is ``"ok"``, or how it failed: ``"error"`` (the code raised), ``"wall"``, ``"cpu"``,
    ``"output"``, ``"images"`` (a limit), ``"crash"`` (a fatal signal), ``"exit"`` (the process ended
    without a result) or ``"worker"`` (the worker died or hung); ``error`` then says it for the model.

    ``output`` is what the code printed (up to the output limit), ``images`` what it passed to
    ``show()`` (read-only uint8 H x W x 3 arrays), ``wall_s`` and ``cpu_s`` what it used.
    """

    status: str
    output: str = ""
    error: Optional[str] = None
    images: tuple[np.ndarray, ...] = ()
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def read_result(outcome: dict[str, Any], output: bytes, result: bytes, limits: Limits) -> ExecutionResult:
    """Combine the worker's report with the bytes it relayed (see the module docstring)."""
    text = bytes(output[: limits.max_output_bytes]).decode("utf-8", "replace")
    used = {"output": text, "wall_s": float(outcome.get("wall_s", 0.0)), "cpu_s": float(outcome.get("cpu_s", 0.0))}
    failure = _failure(outcome, limits, used["cpu_s"])
    if failure is not None:
        return ExecutionResult(status=failure[0], error=failure[1], **used)
    try:
        header, blobs = protocol.decode(protocol.reader(io.BytesIO(result).readinto), 1 << 20,
                                        limits.max_images * limits.max_image_pixels * 3)
        shapes = protocol.check_images(header.get("images"), blobs, limits.max_image_pixels)
        error = header.get("error")
        if len(shapes) > limits.max_images or not (error is None or isinstance(error, str)):
            raise protocol.ProtocolError("the result breaks its limits")
    except (EOFError, protocol.ProtocolError):
        return ExecutionResult(status="exit", error="the code ended its process before it finished "
                                                    "(or overwrote the sandbox's result channel)", **used)
    images = []
    for (height, width), blob in zip(shapes, blobs, strict=True):
        image = np.frombuffer(blob, np.uint8).reshape(height, width, 3)
        image.flags.writeable = False
        images.append(image)
    if error is not None:
        return ExecutionResult(status="error", error=error, images=tuple(images), **used)
    return ExecutionResult(status="ok", images=tuple(images), **used)


def _failure(outcome: dict[str, Any], limits: Limits, cpu_s: float) -> Optional[tuple[str, str]]:
    """(status, message) when the execution did not end on its own with a result."""
    stopped, code, sig = outcome.get("stopped"), outcome.get("exit_code"), outcome.get("signal")
    if stopped == "wall":
        return "wall", f"the code ran for more than {limits.wall_s:g} s (wall clock) and was stopped"
    if stopped == "output":
        return "output", (f"the code printed more than {limits.max_output_bytes} bytes and was stopped; "
                          "print less (a summary, not whole arrays)")
    if stopped == "result":
        return "images", "the code sent back more image data than the sandbox accepts and was stopped"
    if sig is not None:
        if sig == signal.SIGXCPU or cpu_s >= limits.cpu_s:
            return "cpu", f"the code used more than {limits.cpu_s:g} s of CPU time and was stopped"
        return "crash", f"the code's process was killed by {_signal_name(sig)}"
    if code == 70:
        return "crash", "the sandbox could not run the code (its process failed before reporting)"
    if code:
        return "exit", f"the code ended its process with exit status {code}"
    return None


def _signal_name(number: Any) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def worker_failure(exc: BaseException) -> ExecutionResult:
    """The result of an execution whose worker died, hung or broke the protocol (it is replaced)."""
    return ExecutionResult(status="worker", error=f"the sandbox worker failed ({type(exc).__name__}: {exc}); "
                                                  "it was replaced, and this execution is lost")
