"""``python_tool``: the model writes Python that processes the images; it runs in the sandbox.

The code sees ``images[i]`` (PIL) and ``arrays[i]`` (read-only uint8 numpy, H x W x 3), image 0
being the original and later indices the images earlier tool calls returned; it may import numpy,
PIL and a few standard modules. What it prints comes back as text, and each image it passes to
``show()`` comes back as a new image, which later calls (zoom or code) can use. An error, a limit hit
or a crash is an observation the model can act on; the episode goes on. See docs/code-tool.md.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..sandbox import Limits, SandboxPool, shared
from ..sandbox.results import ExecutionResult
from .base import Tool, ToolContext, ToolError, ToolResult, register_tool

MAX_CODE_CHARS = 20_000
OUTPUT_HEAD_CHARS = 1000  # printed text shown beside an error


@register_tool
class PythonTool(Tool):
    name = "python_tool"
    description = (
        "Run Python code on the images, in a sandbox without files or network: images[i] is image i as a PIL "
        "image and arrays[i] as a read-only uint8 H x W x 3 numpy array (0 is the original); numpy and PIL can "
        "be imported; what it prints comes back, and so does every image passed to show(image)."
    )
    parameters = {
        "type": "object",
        "properties": {
            "code": {
                "type": "string",
                "description": "A Python program. Print results; call show(image) on a PIL image or uint8 array "
                "to look at it.",
                "examples": ["import numpy as np\nred = (arrays[0] == (220, 30, 30)).all(axis=2)\nprint(red.sum())"],
            },
        },
        "required": ["code"],
    }

    def __init__(self, **limits: Any):
        """``limits`` are fields of ``deepeyes_envs.sandbox.Limits`` (``cpu_s=2``, say); in an env, set
        them with ``tool_options={"python_tool": {...}}``. The sandbox starts here, so a machine that
        cannot build it fails at env construction, never at the first call (and never runs code bare)."""
        self.limits = Limits(**limits)
        self._pool: SandboxPool | None = None
        self._acquire()

    def _acquire(self) -> SandboxPool:
        pool = shared.acquire()
        self._pool, self._release = pool, weakref.finalize(self, shared.release, pool)
        return pool

    def execute(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        code = arguments["code"]
        if not code.strip():
            raise ToolError("code is empty: write a Python program that prints or shows its result")
        if len(code) > MAX_CODE_CHARS:
            raise ToolError(f"code of {len(code)} characters exceeds the limit of {MAX_CODE_CHARS}")
        pool = self._pool if self._pool is not None else self._acquire()
        try:
            result = pool.run(code, context.images, self.limits)
        except (TypeError, ValueError) as exc:
            raise ToolError(str(exc)) from None
        if not result.ok:
            raise ToolError(_failure_text(result))
        text = result.output if result.output or result.images else "(the code printed nothing and showed no image)"
        return ToolResult(text=text, images=result.images,
                          info={"status": result.status, "images_shown": len(result.images),
                                "wall_ms": round(1000 * result.wall_s, 1), "cpu_ms": round(1000 * result.cpu_s, 1)})

    def close(self) -> None:
        if self._pool is not None:
            self._release()
            self._pool = None


def _failure_text(result: ExecutionResult) -> str:
    text = result.error or result.status
    if result.output:
        head = result.output[:OUTPUT_HEAD_CHARS]
        more = " (first characters)" if len(result.output) > OUTPUT_HEAD_CHARS else ""
        text += f"\nPrinted before it stopped{more}:\n{head}"
    return text
