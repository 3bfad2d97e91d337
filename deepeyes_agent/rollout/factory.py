"""The one way to build a generation engine for a local policy directory, whoever asks (trainer or evaluation).

Both engines must expand every image to the same token count as the processor that builds the episode
contexts, so the vLLM engine always receives the processor's pixel budget (``mm_processor_kwargs``): an
engine built without it would see a different image geometry than the context and reject the prompt.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch

from deepeyes_agent.policy.chat import VisionTokenizer
from deepeyes_agent.policy.loading import QwenVLImageProcessor, load_model
from deepeyes_agent.rollout.engine import Engine

EngineKind = Literal["hf", "vllm"]


def make_engine(kind: EngineKind, model_path: str | os.PathLike, processor: QwenVLImageProcessor, *,
                dtype: str = "float32", device: str | None = None, attn_implementation: str = "sdpa",
                vllm_kwargs: Mapping[str, Any] | None = None, kv_cache: bool = True) -> Engine:
    """An engine for the policy at ``model_path``: ``hf`` (transformers, on ``device``, default cuda when
    there is one; ``kv_cache``: its fastest mode, per-episode keys and values kept between turns, see
    ``hf_engine``) or ``vllm`` (in this process or in the vllm venv's worker, see ``vllm_engine``)."""
    if kind == "hf":
        from deepeyes_agent.rollout.hf_engine import HFEngine

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(model_path, dtype=dtype, device=device, attn_implementation=attn_implementation)
        return HFEngine(model, processor, reuse_kv_cache=kv_cache)
    if kind == "vllm":
        from deepeyes_agent.rollout.vllm_engine import VLLMEngine

        vision = VisionTokenizer(processor)
        kwargs = dict(vllm_kwargs or {})
        budget = {"min_pixels": vision.min_pixels, "max_pixels": vision.max_pixels}
        given = kwargs.setdefault("mm_processor_kwargs", budget)
        if {k: given.get(k) for k in budget} != budget:
            raise ValueError(f"vLLM mm_processor_kwargs {given} differ from the processor's pixel budget {budget}")
        return VLLMEngine(model_path, **kwargs)
    raise ValueError(f"engine must be 'hf' or 'vllm', got {kind!r}")
