"""The policy as an RLlib ``TorchRLModule``: a Qwen-VL model from a local directory, plus PPO's value head.

RLlib's learners own an RLModule (its parameters, its optimizer, its checkpoint); this one wraps the
transformers model. Its state is the model's state dict as CPU torch tensors (RLlib's default converts to
numpy, which has no bfloat16), which is also what env runners load into their generation engines.

With ``model_config["value_head"]`` (PPO: ``algorithm.advantage: gae``) the module also holds the critic: one
linear layer from the last hidden state to a scalar, zero-initialised so that V starts at 0 everywhere. Its
weights are part of the module's state (``value_head.weight``, ``value_head.bias``), so checkpoints hold them,
but not of the inference-only state that ``sync_weights`` sends to env runners, which only generate.

Sharded by FSDP2 (``resources.learner_sharding: fsdp2``) the parameters are DTensors: the state is still the
full one, gathered beforehand on every learner (``LLMLearner.stage_full_state``) and kept in ``staged_state``;
``set_state`` takes a full state and keeps this learner's shards of it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ray.rllib.core.rl_module.torch import TorchRLModule
from torch.distributed.tensor import DTensor, distribute_tensor

from deepeyes_agent.policy.loading import load_model
from deepeyes_agent.training.losses import critic_values, forward_with_values, last_hidden_state

VALUE_HEAD = "value_head."  # prefix of the critic's entries in the module state


class _RLlibOwnRLModuleConfig(logging.Filter):
    """RLlib 2.60's ``RLModule.__init__`` always builds the deprecated ``RLModuleConfig`` itself, whatever a
    subclass passes, and warns about it: a notice about RLlib's own code, dropped here (that message only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RLModule(config=[RLModuleConfig object])" not in record.getMessage()


logging.getLogger("ray._common.deprecation").addFilter(_RLlibOwnRLModuleConfig())


class QwenVLModule(TorchRLModule):
    """``model_config``: ``path`` (local model dir), ``dtype``, ``attn_implementation``, ``gradient_checkpointing``,
    ``value_head`` (add the PPO critic)."""

    def setup(self) -> None:
        cfg = self.model_config or {}
        self.model = load_model(cfg["path"], dtype=cfg.get("dtype", "float32"),
                                attn_implementation=cfg.get("attn_implementation", "sdpa"))
        if cfg.get("gradient_checkpointing"):
            self.model.gradient_checkpointing_enable()
        self.model.config.use_cache = False
        self.value_head: torch.nn.Linear | None = None
        self.staged_state: dict[str, torch.Tensor] | None = None  # FSDP2: the gathered full state
        if cfg.get("value_head"):
            self.value_head = torch.nn.Linear(self.model.lm_head.in_features, 1)  # float32 whatever the model
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

    def _forward(self, batch: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """The backbone's last hidden state (the loss runs the LM head on its generated tokens only) and, with
        the critic, the per-token values."""
        hidden, values = forward_with_values(self.model, self.value_head, batch)
        return {"hidden": hidden} if values is None else {"hidden": hidden, "values": values}

    @torch.no_grad()
    def compute_values(self, batch: dict[str, Any]) -> torch.Tensor:
        """The critic's per-token values [B, T] of a collated batch: no gradient, no LM head."""
        return critic_values(self.value_head, last_hidden_state(self.model, batch))

    @property
    def sharded(self) -> bool:
        return any(isinstance(p, DTensor) for p in self.parameters())

    def full_module_state(self) -> dict[str, torch.Tensor]:
        """The model's and value head's state tensors, as they are (DTensors when sharded)."""
        state = dict(self.model.state_dict())
        if self.value_head is not None:
            state.update({VALUE_HEAD + k: v for k, v in self.value_head.state_dict().items()})
        return state

    def get_state(self, components: Any = None, *, not_components: Any = None, inference_only: bool = False,
                  **kwargs: Any) -> dict[str, torch.Tensor]:
        if self.sharded:
            if self.staged_state is None:
                raise RuntimeError("FSDP2: the full state was not gathered (LLMLearner.stage_full_state)")
            state = dict(self.staged_state)
        else:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.full_module_state().items()}
        if inference_only:
            state = {k: v for k, v in state.items() if not k.startswith(VALUE_HEAD)}
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        tensors = {k: torch.as_tensor(v) for k, v in state.items()}
        staged = None
        if self.sharded:  # keep my shard of every full tensor; learner 0 keeps the full state for get_state
            staged = dict(tensors) if torch.distributed.get_rank() == 0 else None
            current = self.full_module_state()
            tensors = {k: _my_shard(v, current[k]) if isinstance(current.get(k), DTensor) else v
                       for k, v in tensors.items()}
        head = {k[len(VALUE_HEAD):]: tensors.pop(k) for k in list(tensors) if k.startswith(VALUE_HEAD)}
        self.model.load_state_dict(tensors, strict=True)
        if self.value_head is not None:
            self.value_head.load_state_dict(head, strict=True)
        self.staged_state = staged


def _my_shard(full: torch.Tensor, like: DTensor) -> DTensor:
    """This process's shard of a full tensor, laid out like ``like`` (a collective over its mesh)."""
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
