"""``image_rotate_tool``: rotate an image. DeepEyes ships it without advertising it in its prompt."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .base import Tool, ToolContext, ToolError, ToolResult, register_tool

RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC}


@register_tool
class RotateTool(Tool):
    """PIL's ``Image.rotate`` of one image, counter-clockwise.

    The two envs rotate differently, set by the env's ``tool_options`` (envs_registry.yaml):
    visual_toolbox_v2 uses ``expand=False, resample="nearest"``, which is ``Image.rotate(angle)`` exactly
    as DeepEyes calls it (same size, corners black); visual_toolbox uses the defaults, which keep the
    whole rotated image (multiples of 90 degrees are exact turns, other angles bicubic).
    """

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

    def __init__(self, expand: bool = True, resample: str = "bicubic"):
        if resample not in RESAMPLING:
            raise ValueError(f"resample must be one of {sorted(RESAMPLING)}, got {resample!r}")
        self.expand = bool(expand)
        self.resample = resample

    def execute(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        index = int(arguments.get("image_index", 0)) if context.allow_image_index else 0
        if not 0 <= index < len(context.images):
            raise ToolError(f"image_index {index} does not exist; images 0 to {len(context.images) - 1} are available")
        angle = arguments["angle"]
        try:
            rotated = Image.fromarray(context.images[index]).rotate(
                angle, resample=RESAMPLING[self.resample], expand=self.expand)
        except OverflowError as exc:  # an integer angle beyond float range; the original's text
            raise ToolError(str(exc)) from None
        return ToolResult(images=(np.asarray(rotated),), info={"image_index": index, "angle": float(angle) % 360.0})
