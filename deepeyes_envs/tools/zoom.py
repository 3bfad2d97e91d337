"""``image_zoom_in_tool``: crop a box of an image and show it to the model at full resolution."""

from __future__ import annotations

import copy
from typing import Any

from ..images import RELATIVE_SCALE, box_from_relative, box_to_original
from .base import Tool, ToolContext, ToolError, ToolResult, register_tool

INVALID_ZOOM = "ZOOM IN ARGUMENTS ARE INVALID"  # DeepEyes' message, kept for compatibility
MIN_SIDE = 30  # a crop's shorter side must exceed this many original pixels
MAX_ASPECT = 100
RELATIVE_BBOX_DESCRIPTION = (
    f"Region to crop as [x1, y1, x2, y2] in thousandths of the image's width and height (0 to {RELATIVE_SCALE}, "
    "whatever the image's size): top-left, then bottom-right corner."
)


@register_tool
class ZoomInTool(Tool):
    name = "image_zoom_in_tool"
    description = (
        "Crop a region of an image, given as a bounding box, and look at that region at full resolution. "
        "Use it to read small text or inspect small objects."
    )
    parameters = {
        "type": "object",
        "properties": {
            "bbox_2d": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 4,
                "maxItems": 4,
                "description": "Region to crop as [x1, y1, x2, y2] in pixels: top-left, then bottom-right corner.",
                "examples": [[10, 20, 100, 200]],
            },
            "label": {"type": "string", "description": "What is in the region (optional)."},
            "image_index": {
                "type": "integer",
                "description": "Which image to crop: 0 is the original, 1 the first image a tool returned, and so on "
                "(optional, default 0).",
            },
        },
        "required": ["bbox_2d"],
    }

    @classmethod
    def schema_for_frame(cls, coordinate_frame: str) -> dict[str, Any]:
        """The schema with ``bbox_2d`` described in thousandths for ``relative_1000`` (pixels otherwise)."""
        schema = cls.schema()
        if coordinate_frame != "relative_1000":
            return schema
        schema = copy.deepcopy(schema)  # schema() shares the class's parameters dict
        schema["function"]["parameters"]["properties"]["bbox_2d"]["description"] = RELATIVE_BBOX_DESCRIPTION
        return schema

    def execute(self, arguments: dict[str, Any], context: ToolContext) -> ToolResult:
        index = self._image_index(arguments, context)
        image = context.images[index]
        height, width = image.shape[:2]
        given = list(arguments["bbox_2d"])
        box = given
        if context.coordinate_frame == "seen":
            box = box_to_original(tuple(float(v) for v in given), context.seen_sizes[index], (width, height))
        elif context.coordinate_frame == "relative_1000":
            _check_relative(given, context.strict)
            box = box_from_relative(tuple(float(v) for v in given), (width, height))
        # DeepEyes' clamp, operands in its order: max(0, NaN) is 0 and min(width, NaN) is width, so a
        # NaN coordinate (which JSON parsing lets through in visual_toolbox_v2) becomes the image's edge.
        x1, y1, x2, y2 = max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3])
        reason = _invalid_reason(x1, y1, x2, y2)
        if reason:
            read = "in thousandths of" if context.coordinate_frame == "relative_1000" else "clamped to"
            detail = f": {given} {read} the {width}x{height} image is {reason}" if context.strict else ""
            raise ToolError(INVALID_ZOOM + detail)
        x1, y1, x2, y2 = (float(v) for v in (x1, y1, x2, y2))
        left, top, right, bottom = (round(v) for v in (x1, y1, x2, y2))  # as PIL's crop rounds a box
        crop = image[top:bottom, left:right]
        return ToolResult(
            images=(crop,),
            info={"image_index": index, "bbox_given": given, "bbox_image": [x1, y1, x2, y2],
                  "crop_pixels": [left, top, right, bottom]},
        )

    @staticmethod
    def _image_index(arguments: dict[str, Any], context: ToolContext) -> int:
        index = arguments.get("image_index", 0)
        if not context.allow_image_index:
            return 0
        index = int(index)
        if not 0 <= index < len(context.images):
            raise ToolError(f"image_index {index} does not exist; images 0 to {len(context.images) - 1} are available")
        return index


def _check_relative(box: list, strict: bool) -> None:
    """Refuse a box in thousandths that is off the 0..1000 range or inverted, before it becomes pixels.

    The pixel frames clamp a box that runs off the image (DeepEyes' rule); here a coordinate above 1000
    most likely means the model wrote pixels, so cropping a clamped box would answer a question it did
    not ask. The DeepEyes size rules still apply afterwards, to the box in the image's pixels.
    """
    detail = ""
    if not all(0 <= v <= RELATIVE_SCALE for v in box):  # also refuses NaN (visual_toolbox_v2's reading)
        detail = (f": {box} has coordinates outside 0..{RELATIVE_SCALE}; boxes here are thousandths of the "
                  f"image's width and height, from 0 to {RELATIVE_SCALE}")
    elif not (box[0] < box[2] and box[1] < box[3]):
        detail = f": {box} is inverted or empty; it needs x1 < x2 and y1 < y2"
    if detail:
        raise ToolError(INVALID_ZOOM + (detail if strict else ""))


def _invalid_reason(x1: float, y1: float, x2: float, y2: float) -> str:
    """Why DeepEyes would reject this clamped box, or '' when it is acceptable."""
    if not (x1 < x2 and y1 < y2):
        corners = ", ".join(_number(v) for v in (x1, y1, x2, y2))
        return f"[{corners}], which is empty (it lies off the image or is inverted)"
    w, h = x2 - x1, y2 - y1
    if max(w, h) / min(w, h) > MAX_ASPECT:
        return f"{_number(w)}x{_number(h)} pixels, thinner than the allowed aspect ratio of {MAX_ASPECT}"
    if min(w, h) <= MIN_SIDE:
        return f"{_number(w)}x{_number(h)} pixels; both sides must exceed {MIN_SIDE} pixels"
    return ""


def _number(value: float) -> str:
    """A coordinate for a message; ints print exactly (a JSON integer may be too large for a float)."""
    return f"{value:g}" if isinstance(value, float) else str(value)
