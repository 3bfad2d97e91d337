"""Qwen-VL policies and their processors, loaded from local directories only.

Two problems shape this module. First, nothing may reach a model hub: every loader takes a local
directory and passes ``local_files_only=True``, so a missing file is an error, never a download.
Second, the stock Qwen-VL processors of transformers 5.x insist on a video processor that imports
torchvision, which is broken beside a CPU torch; :class:`QwenVLImageProcessor` is the image-only
processor used everywhere instead (PIL backend, the same ``smart_resize`` geometry).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import AutoTokenizer, PreTrainedModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from deepeyes_envs.messages import IMAGE_PAD, VIDEO_PAD

_MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


class QwenVLImageProcessor(ProcessorMixin):
    """Image-only processor for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (no video slot, no torchvision).

    Calling it with ``text`` (containing one ``<|image_pad|>`` per image) and ``images`` returns
    ``input_ids`` with each pad expanded to the image's token count, ``pixel_values``,
    ``image_grid_thw`` and ``mm_token_type_ids``, like the stock processors do for images.
    """

    return_mm_token_type_ids = True

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_PAD
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        """Expand one image placeholder to ``t*h*w / merge^2`` pad tokens (used by ``__call__``)."""
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * int(grid.prod() // self.merge_size**2)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"]


class Policy(NamedTuple):
    """A loaded policy: the model and its image-only processor (unpack as ``model, processor``)."""

    model: PreTrainedModel
    processor: QwenVLImageProcessor


def _local_dir(path: str | os.PathLike) -> Path:
    """Resolve a model directory, refusing anything that would need a hub download."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p} is not a local model directory (no config.json); deepeyes never downloads from a hub, "
            "download the model first (e.g. `huggingface-cli download ... --local-dir DIR`)"
        )
    return p


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def load_processor(path: str | os.PathLike, *, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> QwenVLImageProcessor:
    """Load the tokenizer and the PIL image processor of a local Qwen-VL directory.

    One class serves every family: Qwen3-VL checkpoints ship the same Qwen2-VL image processor (transformers
    maps qwen3_vl to it), and what differs, patch 16 and mean = std = 0.5, is read from the directory's
    preprocessor_config.json. ``min_pixels`` / ``max_pixels`` override the saved pixel budget (e.g. a small
    budget for CPU runs).
    """
    p = _local_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    overrides: dict[str, int] = {}
    if min_pixels is not None:
        overrides["min_pixels"] = min_pixels
    if max_pixels is not None:
        overrides["max_pixels"] = max_pixels
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(p, local_files_only=True, **overrides)
    return QwenVLImageProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


def model_class(model_type: str) -> type[PreTrainedModel]:
    """The transformers class for a Qwen-VL ``model_type`` (qwen2_vl, qwen2_5_vl, qwen3_vl)."""
    import transformers

    if model_type not in _MODEL_CLASSES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {sorted(_MODEL_CLASSES)}")
    return getattr(transformers, _MODEL_CLASSES[model_type])


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Load a Qwen-VL model from a local directory, in eval mode, on ``device``."""
    p = _local_dir(path)
    model_type = json.loads((p / "config.json").read_text())["model_type"]
    model = model_class(model_type).from_pretrained(
        p, local_files_only=True, dtype=_resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    return model.to(device).eval()


def load_policy(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32,
                device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                min_pixels: int | None = None, max_pixels: int | None = None) -> Policy:
    """Load a policy model and its processor from one local directory (never from a hub)."""
    model = load_model(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    processor = load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)
    return Policy(model, processor)
