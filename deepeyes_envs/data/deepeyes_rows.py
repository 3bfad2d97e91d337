"""One DeepEyes row (docs/data-format.md) to a Task and back, and the check that a row is fit to train on.

Training must survive bad rows without losing any silently: :func:`validate_deepeyes_row` returns a Task or
a :class:`~deepeyes_envs.data.tasks.BadRow` saying why not, so sources can skip bad rows and list them.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Optional

from ..images import MAX_DECODED_PIXELS, LazyImage, encode_png, to_rgb_array
from ..messages import IMAGE_PLACEHOLDER
from ..prompts import PLAIN_SYSTEM_PROMPT, PLAIN_USER_PROMPT, SYSTEM_PROMPT_V2, USER_PROMPT_V2
from ..registry import PLAIN_ENV, registered_env_names
from . import fields
from .tasks import BadRow, PathLike, Task, TaskError

# Columns every DeepEyes row must have (``env_name`` may be null: the plain env).
REQUIRED_FIELDS = ("data_source", "prompt", "images", "env_name", "reward_model")

# Instruction suffixes stripped when a question has to be recovered from the user text.
_INSTRUCTION_SUFFIXES = (USER_PROMPT_V2, PLAIN_USER_PROMPT)


# --- one DeepEyes row -> Task -------------------------------------------------------------------


def task_from_deepeyes_row(
    row: Mapping[str, Any],
    index: int,
    image_root: Optional[PathLike] = None,
    *,
    source: str = "",
    env_names: Optional[Collection[str]] = None,
) -> Task:
    """Turn one DeepEyes parquet row (docs/deepeyes.md, "Data") into a Task.

    The prompt is kept verbatim (a DeepEyes checkpoint was trained on it); the question comes from
    ``extra_info.question`` or, failing that, from the user text with ``<image>`` and the instruction
    suffix removed; the answer is ``reward_model.ground_truth``. Image paths are resolved against
    ``image_root``. With ``env_names``, an ``env_name`` outside it (an empty one means ``plain``) is
    refused. Any missing or malformed field raises ``TaskError`` naming ``index`` and the field, with
    ``field``, ``index`` and ``source`` set on the error. No image is decoded here.
    """
    try:
        task = _task_from_row(row, index, image_root, source)
        if env_names is not None and (task.env_name or PLAIN_ENV) not in env_names:
            raise TaskError(f"row {index}: env_name {task.env_name!r} is not a registered env; known: "
                            f"{sorted(env_names)}", field="env_name", task_id=task.task_id)
        return task
    except TaskError as exc:
        exc.index = index if exc.index is None else exc.index
        exc.source = exc.source or source
        raise


def _task_from_row(row: Mapping[str, Any], index: int, image_root: Optional[PathLike], source: str) -> Task:
    where = f"row {index}"
    if not isinstance(row, Mapping):
        raise TaskError(f"{where}: expected a mapping, got {type(row).__name__}", field="row")
    for name in REQUIRED_FIELDS:
        if name not in row or (row[name] is None and name != "env_name"):
            raise TaskError(f"{where}: missing field {name!r}", field=name)
    data_source = fields.text(row["data_source"], where, "data_source")
    env_name = "" if row["env_name"] is None else fields.text(row["env_name"], where, "env_name")
    prompt = fields.prompt(row["prompt"], where)
    reward_model = fields.mapping(row["reward_model"], where, "reward_model")
    if reward_model.get("ground_truth") is None:
        raise TaskError(f"{where}: missing field 'reward_model.ground_truth'", field="reward_model.ground_truth")
    answer = fields.scalar_text(reward_model["ground_truth"], where, "reward_model.ground_truth")
    extra_info = {} if row.get("extra_info") is None else fields.mapping(row["extra_info"], where, "extra_info")

    task_id = str(extra_info.get("task_id") or f"{data_source or 'row'}-{extra_info.get('index', index)}")
    images = fields.images(row["images"], where, f"{where} ({task_id})", image_root)
    n_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in prompt)
    if n_placeholders != len(images):
        raise TaskError(f"{where}: prompt has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                        f"{len(images)} images", field="prompt", task_id=task_id)
    if not images:
        raise TaskError(f"{where}: no images; every env needs at least one", field="images", task_id=task_id)

    question = extra_info.get("question")
    if not isinstance(question, str) or not question.strip():
        question = question_from_prompt(prompt)
    return Task(
        question=question,
        answer=answer,
        images=images,
        data_source=data_source,
        env_name=env_name,
        task_id=task_id,
        options=fields.options(extra_info.get("options"), where, "extra_info.options"),
        gt_boxes=fields.boxes(extra_info.get("gt_boxes"), where, "extra_info.gt_boxes"),
        prompt=None if extra_info.get("prompt_generated") else prompt,
        tools=fields.str_tuple(extra_info.get("tools"), where, "extra_info.tools"),
        extra={
            "ability": row.get("ability") or "",
            "split": extra_info.get("split") or "",
            "reward_style": reward_model.get("style") or "",
            "row_index": index,
            "source": source,
        },
    )


def question_from_prompt(prompt: Sequence[Mapping[str, str]]) -> str:
    """The question inside the last user message: placeholders and instruction suffix removed."""
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    text = users[-1] if users else ""
    text = text.replace(IMAGE_PLACEHOLDER, "")
    for suffix in _INSTRUCTION_SUFFIXES:
        if suffix in text:
            text = text[: text.rindex(suffix)]
            break
    return text.strip()


# --- Task -> DeepEyes row ----------------------------------------------------------------------


def deepeyes_prompt(task: Task) -> tuple[dict[str, str], ...]:
    """The prompt DeepEyes would have stored for this task: its own if set, else the v2 (tool) or
    plain style chosen by ``env_name``, one ``<image>`` line per image before the question."""
    if task.prompt is not None:
        return tuple(task.prompt)
    system, suffix = (SYSTEM_PROMPT_V2, USER_PROMPT_V2) if task.env_name else (PLAIN_SYSTEM_PROMPT, PLAIN_USER_PROMPT)
    user = f"{IMAGE_PLACEHOLDER}\n" * len(task.images) + task.question + suffix
    return ({"role": "system", "content": system}, {"role": "user", "content": user})


def task_to_deepeyes_row(task: Task, index: int, split: str = "train", embed_images: bool = True) -> dict[str, Any]:
    """One DeepEyes row for ``task``; images become ``{bytes, path}`` (PNG bytes for pixels).

    A task without its own prompt gets :func:`deepeyes_prompt` and ``extra_info.prompt_generated``,
    so our loaders give it back with ``prompt=None`` and the env keeps using its own prompt style.
    """
    return {
        "data_source": task.data_source,
        "prompt": list(deepeyes_prompt(task)),
        "images": [
            _image_entry(img, embed_images, f"task {task.task_id or index} image {j}")
            for j, img in enumerate(task.images)
        ],
        "ability": str(task.extra.get("ability", "")),
        "env_name": task.env_name or "",
        "reward_model": {"style": str(task.extra.get("reward_style") or "model"), "ground_truth": task.answer},
        "extra_info": {
            "split": split,
            "index": index,
            "answer": task.answer,
            "question": task.question,
            "task_id": task.task_id or None,
            "options": list(task.options) if task.options is not None else None,
            "gt_boxes": [list(map(float, b)) for b in task.gt_boxes] or None,
            "tools": list(task.tools) if task.tools is not None else None,
            "prompt_generated": task.prompt is None,
        },
    }


def _image_entry(image: Any, embed: bool, name: str) -> dict[str, Any]:
    if isinstance(image, LazyImage):
        if isinstance(image.source, (bytes, bytearray)):
            return {"bytes": image.to_bytes(), "path": None}
        if type(image) is LazyImage:  # a file: keep its path beside (or instead of) the bytes
            path = os.fspath(image.source)
            return {"bytes": image.to_bytes() if embed else None, "path": path}
        return {"bytes": image.to_bytes(), "path": None}  # subclasses (synthetic) render on demand
    if isinstance(image, (bytes, bytearray)):
        return {"bytes": bytes(image), "path": None}
    if isinstance(image, (str, os.PathLike)):
        return _image_entry(LazyImage(image, name=name), embed, name)
    return {"bytes": encode_png(to_rgb_array(image, name=name)), "path": None}


# --- is a row fit to train on -----------------------------------------------------------------


def check_task_images(task: Task, max_pixels: int = MAX_DECODED_PIXELS) -> None:
    """Decode each image of ``task``, one at a time, dropping each before the next, as an env would load it.

    Raises ``TaskImageError`` for the first image that is corrupt, truncated, a missing file, larger than
    ``max_pixels`` (refused from its header, before any pixel is decoded) or of a size the processor refuses.
    """
    for i in range(len(task.images)):
        task.load_image(i, max_pixels)


def validate_deepeyes_row(
    row: Mapping[str, Any],
    index: int,
    *,
    image_root: Optional[PathLike] = None,
    source: str = "",
    env_names: Optional[Collection[str]] = None,
    decode_images: bool = True,
    max_image_pixels: int = MAX_DECODED_PIXELS,
) -> Task | BadRow:
    """One DeepEyes row checked as training would use it: the Task, or a :class:`BadRow` saying why not.

    Checks every field, the ``env_name`` (against ``env_names``, default: the registered envs), that
    the prompt's ``<image>`` count matches the images, and (``decode_images``) that every image decodes,
    one at a time, within ``max_image_pixels``.
    """
    try:
        task = task_from_deepeyes_row(row, index, image_root, source=source,
                                      env_names=registered_env_names() if env_names is None else env_names)
        if decode_images:
            check_task_images(task, max_image_pixels)
    except TaskError as exc:
        return BadRow.from_error(exc, index=index, source=source)
    return task
