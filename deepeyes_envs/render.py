"""Pictures and HTML of an episode, for people: zoom boxes drawn on the image, transcripts in notebooks."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from .data.tasks import Box, Task
from .messages import Message

ZOOM_COLOURS = ((230, 60, 60), (250, 160, 20), (60, 120, 240), (170, 60, 220), (20, 170, 170))
GT_COLOUR = (40, 200, 60)
THUMBNAIL_SIDE = 512
MIN_DISPLAY_SIDE = 160  # crops smaller than this are shown enlarged


def draw_boxes(image: np.ndarray, zoom_boxes: Sequence[Box], gt_boxes: Sequence[Box] = (),
               scale: float = 1.0) -> np.ndarray:
    """A copy of ``image`` with ground-truth boxes in green and zoom boxes in turn colours.

    ``scale`` maps box coordinates onto ``image`` when it is a resized copy of the image they refer to.
    """
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    width = max(2, min(canvas.size) // 200)
    for box in gt_boxes:
        draw.rectangle(_ordered(box, scale), outline=GT_COLOUR, width=width)
    for i, box in enumerate(zoom_boxes):
        draw.rectangle(_ordered(box, scale), outline=ZOOM_COLOURS[i % len(ZOOM_COLOURS)], width=width)
    return np.asarray(canvas)


def _ordered(box: Box, scale: float = 1.0) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (v * scale for v in box)
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def image_data_uri(image: np.ndarray) -> str:
    """The image as a PNG data URI, so transcripts are self-contained files."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_tag(image: np.ndarray, label: str = "", zoom_boxes: Sequence[Box] = (), gt_boxes: Sequence[Box] = (),
              max_side: int = THUMBNAIL_SIDE, min_display: int = MIN_DISPLAY_SIDE) -> str:
    """An ``<img>`` of a thumbnail with the boxes drawn on it (after shrinking, so lines stay visible),
    labelled with the real size; small crops are shown enlarged with square pixels."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    thumb = Image.fromarray(np.ascontiguousarray(image))
    if scale < 1.0:
        thumb = thumb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    pixels = np.asarray(thumb)
    if zoom_boxes or gt_boxes:
        pixels = draw_boxes(pixels, zoom_boxes, gt_boxes, scale=scale)
    display = f" width='{min_display}' style='image-rendering:pixelated'" if max(h, w) < min_display else ""
    text = html.escape(label or f"{w}x{h} px")
    return f"<img src='{image_data_uri(pixels)}' title='{text}'{display}/><div class='de-role lbl'>{text}</div>"


class HTMLTranscript:
    """An HTML page that Jupyter displays inline (``_repr_html_``) and that can be saved to a file."""

    def __init__(self, body: str, title: str = "deepeyes transcript"):
        self.body = body
        self.title = title

    def _repr_html_(self) -> str:
        return self.body

    def __str__(self) -> str:
        return self.body

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                     f"</head><body>{self.body}</body></html>")


_STYLE = (
    "<style>.de-t{font-family:sans-serif;max-width:960px}.de-m{border-radius:6px;padding:6px 10px;margin:6px 0}"
    ".de-system{background:#f3f3f3;font-size:85%}.de-user{background:#eef4ff}.de-assistant{background:#fff7e6}"
    ".de-tool{background:#eef4ff}.de-role{font-weight:bold;font-size:80%;color:#555}"
    ".de-m pre{white-space:pre-wrap;margin:2px 0;font-family:monospace}.de-m img{max-width:100%;border:1px solid #ccc}"
    ".de-r td{padding:2px 8px}</style>"
)


def transcript_html(messages: Sequence[Message], zoom_boxes: Sequence[Box], task: Optional[Task],
                    reward_parts: Optional[dict[str, Any]] = None) -> HTMLTranscript:
    """The conversation in order, images inline, the first image with its zoom boxes drawn."""
    rows = [_STYLE, "<div class='de-t'>"]
    if task is not None:
        rows.append(f"<p><b>Task</b> {html.escape(task.task_id)} &middot; answer <code>{html.escape(task.answer)}"
                    f"</code> &middot; {html.escape(task.data_source)}</p>")
    first_image = True
    for msg in messages:
        rows.append(f"<div class='de-m de-{html.escape(msg['role'])}'><div class='de-role'>{html.escape(msg['role'])}"
                    "</div>")
        for part in msg["content"]:
            if part["type"] == "text":
                rows.append(f"<pre>{html.escape(part['text'])}</pre>")
            elif first_image and task is not None:
                rows.append(image_tag(part["image"], zoom_boxes=zoom_boxes, gt_boxes=task.gt_boxes))
                first_image = False
            else:
                rows.append(image_tag(part["image"]))
        rows.append("</div>")
    if reward_parts:
        cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                        for k, v in reward_parts.items())
        rows.append(f"<table class='de-r'><tr><th colspan=2>reward</th></tr>{cells}</table>")
    rows.append("</div>")
    return HTMLTranscript("".join(rows))
