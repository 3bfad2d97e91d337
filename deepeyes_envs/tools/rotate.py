"""``image_rotate_tool``: rotate an image. DeepEyes ships it without advertising it in its prompt."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .base import Tool, ToolContext, ToolError, ToolResult, register_tool


@register_tool
class RotateTool(Tool):
    name = "image_rotate_tool"
    description = "Rotate an image counter-clockwise by an angle in degrees, to read sideways or upside-down content."
    parameters = {
        "type": "object",
        "properties": {
            "angle": {"type": "number", "description": "Counter-clockwise rotation in degrees.", "examples": [90]},
            "image_index": {"type": "integer", "description": "Which image to rotate: 0 is the original (default)."},
        },
        "required": ["angle"],
    }

    def execute(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        index = int(arguments.get("image_index", 0)) if context.allow_image_index else 0
        if not 0 <= index < len(context.images):
            raise ToolError(f"image_index {index} does not exist; images 0 to {len(context.images) - 1} are available")
        angle = float(arguments["angle"]) % 360.0
        image = context.images[index]
        if angle in (90.0, 180.0, 270.0):  # exact, lossless
            rotated = np.ascontiguousarray(np.rot90(image, k=int(angle // 90)))
        else:
            rotated = np.asarray(Image.fromarray(image).rotate(angle, expand=True, resample=Image.BICUBIC))
        return ToolResult(images=(rotated,), info={"image_index": index, "angle": angle})
