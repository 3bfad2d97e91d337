"""The policy as an RLlib ``TorchRLModule``: a Qwen-VL model from a local directory.

RLlib's learners own an RLModule (its parameters, its optimizer, its checkpoint); this one wraps the
transformers model. Its state is the model's state dict as CPU torch tensors (RLlib's default converts to
numpy, which has no bfloat16), which is also what env runners load into their generation engines.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.core.rl_module.torch import TorchRLModule

from deepeyes_agent.models import load_model


class QwenVLModule(TorchRLModule):
    """``model_config``: ``path`` (local model dir), ``dtype``, ``attn_implementation``, ``gradient_checkpointing``."""

    def setup(self) -> None:
        cfg = self.model_config or {}
        self.model = load_model(cfg["path"], dtype=cfg.get("dtype", "float32"),
                                attn_implementation=cfg.get("attn_implementation", "sdpa"))
        if cfg.get("gradient_checkpointing"):
            self.model.gradient_checkpointing_enable()
        self.model.config.use_cache = False

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        return {"logits": self.model(**{k: batch[k] for k in keys if batch.get(k) is not None}).logits}

    def get_state(self, components: Any = None, *, not_components: Any = None, inference_only: bool = False,
                  **kwargs: Any) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
