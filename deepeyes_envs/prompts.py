"""Prompt texts.

The two ``*_V2`` strings are interoperability constants: DeepEyes checkpoints were trained on them,
so visual_toolbox_v2 reproduces them byte for byte (including the two trailing spaces on the
example lines and ``"required":["bbox"]``). Everything else here is our own wording, and the tool
list of the ``dynamic`` style is generated from the tools' JSON schemas.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

SYSTEM_PROMPT_V2 = """You are a helpful assistant.

# Tools
You may call one or more functions to assist with the user query.
You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type":"function","function":{"name":"image_zoom_in_tool","description":"Zoom in on a specific region of an image by cropping it based on a bounding box (bbox) and an optional object label.","parameters":{"type":"object","properties":{"bbox_2d":{"type":"array","items":{"type":"number"},"minItems":4,"maxItems":4,"description":"The bounding box of the region to zoom in, as [x1, y1, x2, y2], where (x1, y1) is the top-left corner and (x2, y2) is the bottom-right corner."},"label":{"type":"string","description":"The name or label of the object in the specified bounding box (optional)."}},"required":["bbox"]}}}
</tools>

# How to call a tool
Return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>

**Example**:  
<tool_call>  
{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [10, 20, 100, 200], "label": "the apple on the desk"}}  
</tool_call>"""

USER_PROMPT_V2 = (
    "\nThink first, call **image_zoom_in_tool** if needed, then answer. Format strictly as:  "
    "<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
)

PLAIN_SYSTEM_PROMPT = "You are a helpful assistant."

PLAIN_USER_PROMPT = "\nThink first, then answer. Format strictly as:  <think>...</think>  <answer>...</answer> "


# What the dynamic prompt says about coordinates, by the env's coordinate frame (pixels unless listed).
PIXEL_COORDINATES_NOTE = "Pixel coordinates refer to the image as you see it."
COORDINATE_NOTES = {
    "relative_1000": "Box coordinates are thousandths of the image's width and height: 0 to 1000 on each axis, "
                     "whatever the image's size.",
}


def dynamic_system_prompt(tool_schemas: Iterable[dict], coordinate_frame: str = "seen") -> str:
    """A system prompt listing the given tools, one JSON schema per line.

    A newly registered tool appears here without anyone editing prompt text. ``coordinate_frame`` picks
    the sentence that tells the model how boxes are measured, so a Qwen3-VL policy (thousandths) is not
    told to write pixels.
    """
    schemas = list(tool_schemas)
    if not schemas:
        return PLAIN_SYSTEM_PROMPT
    listing = "\n".join(json.dumps(s, separators=(",", ":")) for s in schemas)
    example = {"name": schemas[0]["function"]["name"], "arguments": _example_arguments(schemas[0])}
    return (
        "You are a helpful assistant.\n\n"
        "# Tools\n"
        "Functions you can call while you reason are described inside <tools></tools> tags:\n"
        f"<tools>\n{listing}\n</tools>\n\n"
        "# Calling a tool\n"
        "Write one JSON object per call, holding the function name and its arguments, "
        "inside <tool_call></tool_call> tags:\n"
        "<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>\n"
        "Each result comes back in the next user turn inside <tool_response></tool_response> tags. "
        f"{COORDINATE_NOTES.get(coordinate_frame, PIXEL_COORDINATES_NOTE)}\n\n"
        f"For example:\n<tool_call>\n{json.dumps(example)}\n</tool_call>"
    )


def dynamic_user_prompt(tool_names: Iterable[str]) -> str:
    """The instruction appended to the question (and to tool responses) in the dynamic style."""
    names = ", ".join(f"**{n}**" for n in tool_names)
    return (
        f"\nThink first, call {names} if it helps, then answer. Format strictly as:  "
        "<think>...</think>  <tool_call>...</tool_call> (if tools needed)  <answer>...</answer> "
    )


def _example_arguments(schema: dict) -> dict:
    """Arguments for the prompt's example call: the tool's own ``example`` if it gives one."""
    function = schema["function"]
    if "example" in function:
        return function["example"]
    props = function.get("parameters", {}).get("properties", {})
    return {k: v.get("examples", [None])[0] for k, v in props.items() if "examples" in v}
