"""``image_contrast_tool``: stretch or flatten an image's contrast (the worked example of docs/add-a-tool.md).

Registered so any env can list it, but no built-in env advertises it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Tool, ToolContext, ToolError, ToolResult, register_tool

MAX_FACTOR = 10.0
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601 grey level of an RGB pixel


@register_tool
class ContrastTool(Tool):
    name = "image_contrast_tool"
    description = "Change an image's contrast, to make faint text or low-contrast details readable."
    parameters = {
        "type": "object",
        "properties": {
            "factor": {
                "type": "number",
                "description": "Contrast multiplier: above 1 adds contrast, below 1 removes it; 1 changes nothing.",
                "examples": [2.0],
            },
            "image_index": {"type": "integer", "description": "Which image: 0 is the original (default)."},
        },
        "required": ["factor"],
    }

    def execute(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        factor = float(arguments["factor"])
        if not 0 < factor <= MAX_FACTOR:
            raise ToolError(f"factor must be above 0 and at most {MAX_FACTOR:g}, got {factor:g}")
        index = int(arguments.get("image_index", 0)) if context.allow_image_index else 0
        if not 0 <= index < len(context.images):
            raise ToolError(f"image_index {index} does not exist; images 0 to {len(context.images) - 1} are available")
        image = context.images[index]
        # Move each value away from (or toward) the mean grey level, through a 256-entry lookup table:
        # exact, and no float copy of a 4K image. The mean luma is the luma of the per-channel means.
        mean = float(image.reshape(-1, 3).mean(axis=0) @ LUMA)
        table = np.clip(np.rint(mean + factor * (np.arange(256) - mean)), 0, 255).astype(np.uint8)
        out = table[image]
        return ToolResult(images=(out,), info={"image_index": index, "factor": factor, "mean_grey": round(mean, 2)})
