"""The one place where turns become tokens: an episode's context, grown turn by turn.

Multi-turn VLM RL breaks in two classic ways: "image features and image tokens do not match" (an image's
pad tokens disagree with its pixels) and drift between rollout and training (generated text re-tokenized
differently than it was sampled). :class:`EpisodeContext` rules both out by construction:

- generated tokens are appended exactly as the engine produced them, never re-tokenized from text;
- observations are rendered by ``deepeyes_envs.messages`` (the Qwen chat layout) and tokenized with
  their images; each image's token count is computed from its size BEFORE anything is appended, so an
  observation that does not fit the token budget is dropped whole (the episode is then truncated);
- every token carries its loss mask (1 only on generated tokens), its sampling logprob and its 3-D
  multimodal RoPE position, computed incrementally over the whole interleaved sequence exactly as
  Qwen-VL's ``get_rope_index`` does, so training never has to guess positions.

A trainer stacks finished contexts with :func:`collate` and runs one forward pass over them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from deepeyes_agent.policy.loading import QwenVLImageProcessor
from deepeyes_envs.messages import (
    END_OF_TEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Message,
    message_images,
    render_qwen,
    render_qwen_observation,
)

# DeepEyes budget: 8192 prompt tokens + 20480 response tokens (docs/deepeyes.md, "The v2 env").
DEFAULT_MAX_PROMPT_TOKENS = 8192
DEFAULT_MAX_TOTAL_TOKENS = 8192 + 20480

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "mm_token_type_ids", "pixel_values",
                    "image_grid_thw")

SegmentKind = Literal["prompt", "generated", "observation"]


class PromptTooLongError(ValueError):
    """The first observation alone exceeds the prompt budget: the task cannot be played."""


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens from one source, ``[start, end)``, holding images ``[image_start, image_end)``."""

    kind: SegmentKind
    start: int
    end: int
    image_start: int
    image_end: int


@dataclass(frozen=True)
class EncodedTurn:
    """A rendered and tokenized piece of chat, pads expanded, before it joins a context."""

    token_ids: list[int]
    pixel_values: torch.Tensor | None
    image_grid_thw: list[tuple[int, int, int]]
    images: list[np.ndarray]


class VisionTokenizer:
    """Tokenization rules of one Qwen-VL processor: text, image grids, pad expansion and positions.

    Holds only what the processor fixes (special token ids, patch and merge sizes, pixel budget), so one
    instance can serve every episode that uses the same processor.
    """

    def __init__(self, processor: QwenVLImageProcessor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        ip = self.image_processor
        self.patch_size = int(ip.patch_size)
        self.merge_size = int(ip.merge_size)
        self.temporal_patch_size = int(ip.temporal_patch_size)
        size = ip.size
        self.min_pixels = int(size["shortest_edge"] if isinstance(size, dict) else size.shortest_edge)
        self.max_pixels = int(size["longest_edge"] if isinstance(size, dict) else size.longest_edge)
        convert = self.tokenizer.convert_tokens_to_ids
        self.image_token_id = int(convert(IMAGE_PAD))
        self.video_token_id = int(convert(VIDEO_PAD))
        self.vision_start_id = int(convert(VISION_START))
        self.vision_end_id = int(convert(VISION_END))
        self.im_end_id = int(convert(IM_END))
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else convert(END_OF_TEXT))

    @property
    def vision_token_ids(self) -> tuple[int, ...]:
        """Tokens a policy must never generate: a stray image pad would break the next forward pass."""
        return (self.image_token_id, self.video_token_id, self.vision_start_id, self.vision_end_id)

    def image_grid(self, image: np.ndarray) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an HxWx3 image after the processor's ``smart_resize``; no pixels touched."""
        height, width = int(image.shape[0]), int(image.shape[1])
        h, w = smart_resize(height, width, factor=self.patch_size * self.merge_size,
                            min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return (1, h // self.patch_size, w // self.patch_size)

    def grid_tokens(self, grid: Sequence[int]) -> int:
        """Number of ``<|image_pad|>`` tokens (merged patches) for one grid: t*h*w / merge^2."""
        t, h, w = (int(x) for x in grid)
        return t * h * w // self.merge_size**2

    def text_ids(self, text: str) -> list[int]:
        """Token ids of chat text, one ``<|image_pad|>`` per image (not yet expanded)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count(self, text: str, images: Sequence[np.ndarray]) -> int:
        """Tokens ``text`` with ``images`` will take once pads are expanded; cheap (no pixel processing)."""
        return self._count(self.text_ids(text), images)

    def _count(self, ids: list[int], images: Sequence[np.ndarray]) -> int:
        return len(ids) - len(images) + sum(self.grid_tokens(self.image_grid(im)) for im in images)

    def encode(self, text: str, images: Sequence[np.ndarray], ids: list[int] | None = None) -> EncodedTurn:
        """Tokenize ``text`` and process ``images``; each single pad becomes its image's token run."""
        ids = self.text_ids(text) if ids is None else ids
        n_pads = sum(1 for i in ids if i == self.image_token_id)
        if n_pads != len(images):
            raise ValueError(f"text has {n_pads} image pads but {len(images)} images were given")
        if not images:
            return EncodedTurn(ids, None, [], [])
        pil = [Image.fromarray(np.ascontiguousarray(im)) for im in images]
        processed = self.image_processor(images=pil, return_tensors="pt")
        grids = [tuple(int(x) for x in row) for row in processed["image_grid_thw"].tolist()]
        expected = [self.image_grid(im) for im in images]
        if grids != expected:  # the budget check relied on the predicted grids: they must be the real ones
            raise RuntimeError(f"image processor gave grids {grids}, smart_resize predicted {expected}")
        expanded: list[int] = []
        runs = iter(grids)
        for token in ids:
            if token == self.image_token_id:
                expanded.extend([token] * self.grid_tokens(next(runs)))
            else:
                expanded.append(token)
        return EncodedTurn(expanded, processed["pixel_values"], grids, list(images))

    def positions(self, token_ids: Sequence[int], grids: Sequence[Sequence[int]], start: int) -> tuple[np.ndarray, int]:
        """3-D mRoPE positions of a token run starting at text position ``start``; returns (3xN, next start).

        Text tokens advance all three axes together; an image's tokens get (start, start+row, start+col) on
        the merged grid, and the text after it resumes at start + max(h, w) / merge. This is the rule of
        Qwen-VL's ``get_rope_index``, applied incrementally so earlier positions never change.
        """
        ids = np.asarray(token_ids, dtype=np.int64)
        out = np.empty((3, len(ids)), dtype=np.int64)
        runs = iter(grids)
        i, pos = 0, start
        while i < len(ids):
            if ids[i] != self.image_token_id:
                j = i
                while j < len(ids) and ids[j] != self.image_token_id:
                    j += 1
                out[:, i:j] = np.arange(pos, pos + j - i)
                pos += j - i
                i = j
                continue
            t, h, w = (int(x) for x in next(runs))
            gh, gw = h // self.merge_size, w // self.merge_size
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            n = t * gh * gw
            out[0, i:i + n] = tt.reshape(-1) + pos
            out[1, i:i + n] = hh.reshape(-1) + pos
            out[2, i:i + n] = ww.reshape(-1) + pos
            pos += max(h, w) // self.merge_size
            i += n
        return out, pos

    def decode(self, token_ids: Iterable[int]) -> str:
        """Text of tokens with special tokens kept (the env parses tags and strips a final ``<|im_end|>``)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


class EpisodeContext:
    """One episode's token context: ids, images, loss mask, logprobs and mRoPE positions, grown per turn.

    Start it from the env's first observation (``obs["messages"]``), then alternate
    :meth:`append_generated` (the engine's tokens, verbatim) and :meth:`append_observation` (the env's
    answer). When ``append_observation`` returns False the observation did not fit the token budget and
    was dropped: the episode must end as truncated (:attr:`truncated` is set).
    """

    def __init__(self, processor: QwenVLImageProcessor, messages: Sequence[Message], *,
                 max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS,
                 max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
                 vision: VisionTokenizer | None = None) -> None:
        self.vision = vision if vision is not None else VisionTokenizer(processor)
        self.max_total_tokens = int(max_total_tokens)
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.images: list[np.ndarray] = []
        self.image_grid_thw: list[tuple[int, int, int]] = []
        self.segments: list[Segment] = []
        self.truncated = False
        self._pixel_values: list[torch.Tensor] = []
        self._positions: list[np.ndarray] = []
        self._next_position = 0
        text, images = render_qwen(messages, add_generation_prompt=True), message_images(messages)
        ids = self.vision.text_ids(text)
        n = self.vision._count(ids, images)
        limit = min(self.max_total_tokens, max_prompt_tokens or self.max_total_tokens)
        if n > limit:
            raise PromptTooLongError(f"prompt takes {n} tokens, above the budget of {limit}")
        self._append(self.vision.encode(text, images, ids), "prompt")

    # ------------------------------------------------------------------ growing the context
    def append_generated(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> None:
        """Append one generated turn exactly as sampled (loss mask 1), with its per-token logprobs."""
        token_ids = [int(t) for t in token_ids]
        if len(token_ids) != len(logprobs):
            raise ValueError(f"{len(token_ids)} tokens but {len(logprobs)} logprobs")
        if len(self) + len(token_ids) > self.max_total_tokens:
            raise ValueError(f"generation of {len(token_ids)} tokens overflows the budget: only "
                             f"{self.remaining_tokens} left (engines must cap max_tokens at remaining_tokens)")
        forbidden = set(self.vision.vision_token_ids).intersection(token_ids)
        if forbidden:
            raise ValueError(f"generated tokens contain vision tokens {sorted(forbidden)}; engines must suppress "
                             "them (see VisionTokenizer.vision_token_ids)")
        encoded = EncodedTurn(token_ids, None, [], [])
        self._append(encoded, "generated", logprobs=[float(x) for x in logprobs])

    def append_written(self, text: str, *, ends_turn: bool) -> None:
        """Append a turn that was written, not sampled (an SFT demonstration), as an engine would have produced
        it: a turn that ends the episode closes with ``<|im_end|>``; one that calls a tool stops at
        ``</tool_call>``, where generation stops. Its logprobs are 0 (there was no sampling distribution)."""
        ids = self.vision.text_ids(text) + ([self.vision.im_end_id] if ends_turn else [])
        self.append_generated(ids, [0.0] * len(ids))

    def append_observation(self, messages: Sequence[Message]) -> bool:
        """Append the env's observation (loss mask 0) if it fits the budget; False means dropped, truncate.

        If the last turn did not end with ``<|im_end|>`` (it stopped at ``</tool_call>``), the closing
        ``<|im_end|>`` is added first, as an observation token, so the context reads exactly as the chat
        template renders the conversation.
        """
        if not messages:
            return True
        text = render_qwen_observation(messages)
        if self.token_ids and self.token_ids[-1] != self.vision.im_end_id:
            text = self.vision.tokenizer.convert_ids_to_tokens(self.vision.im_end_id) + text
        images = message_images(messages)
        ids = self.vision.text_ids(text)
        if len(self) + self.vision._count(ids, images) > self.max_total_tokens:
            self.truncated = True
            return False
        self._append(self.vision.encode(text, images, ids), "observation")
        return True

    def _append(self, turn: EncodedTurn, kind: SegmentKind, logprobs: list[float] | None = None) -> None:
        start, image_start = len(self.token_ids), len(self.images)
        positions, self._next_position = self.vision.positions(turn.token_ids, turn.image_grid_thw,
                                                               self._next_position)
        self.token_ids.extend(turn.token_ids)
        self.loss_mask.extend([1 if kind == "generated" else 0] * len(turn.token_ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(turn.token_ids))
        self._positions.append(positions)
        self.images.extend(turn.images)
        self.image_grid_thw.extend(turn.image_grid_thw)
        if turn.pixel_values is not None:
            self._pixel_values.append(turn.pixel_values)
        self.segments.append(Segment(kind, start, len(self.token_ids), image_start, len(self.images)))

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def remaining_tokens(self) -> int:
        """How many tokens may still be generated or observed before the budget is spent."""
        return self.max_total_tokens - len(self)

    @property
    def prompt_length(self) -> int:
        return self.segments[0].end

    @property
    def num_image_tokens(self) -> int:
        return sum(1 for t in self.token_ids if t == self.vision.image_token_id)

    @property
    def mm_token_type_ids(self) -> list[int]:
        """0 for text, 1 for image tokens: transformers 5.x needs it to compute mRoPE itself."""
        image = self.vision.image_token_id
        return [1 if t == image else 0 for t in self.token_ids]

    @property
    def position_ids(self) -> torch.Tensor:
        """(3, L) mRoPE positions over the whole interleaved sequence."""
        return torch.from_numpy(np.concatenate(self._positions, axis=1))

    @property
    def next_position(self) -> int:
        """Text position the next appended token will get (the model's ``rope_deltas`` + length)."""
        return self._next_position

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """Patches of all images in order, concatenated (one image's rows follow the previous image's)."""
        return torch.cat(self._pixel_values) if self._pixel_values else None

    def image_pixel_values(self, index: int) -> torch.Tensor:
        """Patches of one image: the rows a KV-cache-reusing engine passes for a new image."""
        offsets = np.cumsum([0] + [t * h * w for t, h, w in self.image_grid_thw])
        return self.pixel_values[offsets[index]:offsets[index + 1]]

    def generated_turns(self) -> list[list[int]]:
        """Token ids of each generated turn, in order."""
        return [self.token_ids[s.start:s.end] for s in self.segments if s.kind == "generated"]

    def decode(self, token_ids: Iterable[int] | None = None) -> str:
        """Text of ``token_ids`` (default: the whole context), special tokens kept."""
        return self.vision.decode(self.token_ids if token_ids is None else token_ids)

    def last_generated_text(self) -> str:
        """The last generated turn as text for ``env.step`` (special tokens kept)."""
        turns = self.generated_turns()
        if not turns:
            raise ValueError("nothing has been generated yet")
        return self.decode(turns[-1])

    def to_model_inputs(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Batch-of-one tensors for a forward pass (``input_ids``, ``position_ids`` (3,1,L), pixels, ...)."""
        return {k: v for k, v in collate([self], device=device).items() if k in MODEL_INPUT_KEYS}


def collate(contexts: Sequence[EpisodeContext], device: str | torch.device | None = None,
            pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad contexts into one training batch.

    Returns the model inputs (``input_ids``, ``attention_mask``, ``position_ids`` of shape (3, B, L),
    ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``) plus ``loss_mask`` and ``old_logprobs``
    (B, L). Padding has attention 0 and loss mask 0; its positions continue each row's last position so
    they stay monotone (they are never attended to). ``pixel_values`` and ``image_grid_thw`` are absent
    when no context has an image.
    """
    if not contexts:
        raise ValueError("no contexts to collate")
    length = max(max(len(c) for c in contexts), pad_to or 0)
    batch = len(contexts)
    pad_id = contexts[0].vision.pad_token_id
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    loss_mask = torch.zeros((batch, length), dtype=torch.long)
    old_logprobs = torch.zeros((batch, length), dtype=torch.float32)
    mm_types = torch.zeros((batch, length), dtype=torch.long)
    positions = torch.zeros((3, batch, length), dtype=torch.long)
    for b, ctx in enumerate(contexts):
        n = len(ctx)
        input_ids[b, :n] = torch.tensor(ctx.token_ids, dtype=torch.long)
        attention[b, :n] = 1
        loss_mask[b, :n] = torch.tensor(ctx.loss_mask, dtype=torch.long)
        old_logprobs[b, :n] = torch.tensor(ctx.logprobs, dtype=torch.float32)
        mm_types[b, :n] = torch.tensor(ctx.mm_token_type_ids, dtype=torch.long)
        positions[:, b, :n] = ctx.position_ids
        positions[:, b, n:] = torch.arange(ctx.next_position, ctx.next_position + length - n)
    pixels = [c.pixel_values for c in contexts if c.pixel_values is not None]
    grids = [g for c in contexts for g in c.image_grid_thw]
    out = {
        "input_ids": input_ids, "attention_mask": attention, "position_ids": positions,
        "mm_token_type_ids": mm_types, "loss_mask": loss_mask, "old_logprobs": old_logprobs,
    }
    if grids:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
