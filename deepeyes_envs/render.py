"""Pictures and HTML of an episode, for people: zoom boxes drawn on the image, transcripts in notebooks."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from .messages import Message
from .tasks import Box, Task

ZOOM_COLOURS = ((230, 60, 60), (250, 160, 20), (60, 120, 240), (170, 60, 220), (20, 170, 170))
GT_COLOUR = (40, 200, 60)
THUMBNAIL_SIDE = 512


def draw_boxes(image: np.ndarray, zoom_boxes: Sequence[Box], gt_boxes: Sequence[Box] = ()) -> np.ndarray:
    """A copy of ``image`` with ground-truth boxes in green and zoom boxes in turn colours."""
    canvas = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(canvas)
    width = max(2, min(canvas.size) // 200)
    for box in gt_boxes:
        draw.rectangle(_ordered(box), outline=GT_COLOUR, width=width)
    for i, box in enumerate(zoom_boxes):
        draw.rectangle(_ordered(box), outline=ZOOM_COLOURS[i % len(ZOOM_COLOURS)], width=width)
    return np.asarray(canvas)


def _ordered(box: Box) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))


def image_data_uri(image: np.ndarray, max_side: int = THUMBNAIL_SIDE) -> str:
    """A small PNG of the image as a data URI, so transcripts are self-contained files."""
    pil = Image.fromarray(np.ascontiguousarray(image))
    pil.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
                continue
            image = part["image"]
            if first_image and task is not None:
                image = draw_boxes(image, zoom_boxes, task.gt_boxes)
                first_image = False
            h, w = part["image"].shape[:2]
            rows.append(f"<img src='{image_data_uri(image)}' title='{w}x{h}'/><div class='de-role'>{w}x{h} px</div>")
        rows.append("</div>")
    if reward_parts:
        cells = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                        for k, v in reward_parts.items())
        rows.append(f"<table class='de-r'><tr><th colspan=2>reward</th></tr>{cells}</table>")
    rows.append("</div>")
    return HTMLTranscript("".join(rows))
