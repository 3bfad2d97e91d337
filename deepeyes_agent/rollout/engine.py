"""The generation-engine interface shared by the transformers and vLLM engines.

An engine generates ONE assistant turn for each of a batch of episode contexts. It reads the context's
token ids and images (never its text) and returns the new tokens with their logprobs, so the rollout loop
can append them verbatim with ``EpisodeContext.append_generated``.

Logprob convention (both engines): ``log softmax(logits / temperature)`` of the sampled token with the
vision tokens removed from the distribution (``deepeyes_agent.policy.logprobs.sampling_logprobs``), not truncated
by top-p / top-k; a training forward with the same temperature reproduces it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from deepeyes_agent.policy.chat import EpisodeContext

FinishReason = Literal["stop", "length"]

# Stop at the end of a tool call (so the tool runs at once) or at the end of the turn.
DEFAULT_STOP = ("</tool_call>",)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one turn. ``max_tokens`` is further capped by each context's remaining budget.

    ``stop`` strings end a turn and stay in its output (the env parses ``</tool_call>``); the end-of-turn
    token ``<|im_end|>`` always stops, as do ``stop_token_ids``. ``temperature == 0`` is greedy.
    """

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = DEFAULT_STOP
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters {self}")


@dataclass
class Generation:
    """One generated turn: tokens exactly as sampled, their logprobs, and why generation stopped."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    text: str = ""
    stop: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} tokens but {len(self.logprobs)} logprobs")


class Engine(ABC):
    """Generates one turn for a batch of episode contexts."""

    @abstractmethod
    def generate(self, contexts: Sequence[EpisodeContext], params: SamplingParams) -> list[Generation]:
        """One :class:`Generation` per context, in order. Contexts are not modified."""

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace the policy weights (after an optimizer step). Engines sharing the learner's model
        object need not override this."""
        raise NotImplementedError(f"{type(self).__name__} cannot load new weights")

    def release(self, contexts: Sequence[EpisodeContext]) -> None:  # noqa: B027 - optional hook
        """Forget per-episode state (e.g. cached keys and values) of finished contexts."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the engine's resources."""
