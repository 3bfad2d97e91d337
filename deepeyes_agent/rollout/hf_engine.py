"""A transformers generation engine: one turn for a batch of episode contexts, on CPU or GPU.

Contexts of different lengths are left-padded into one batch (the model computes each row's mRoPE
positions from its attention mask), all images of all rows go in as one ``pixel_values`` block with one
grid row per image, and generation stops per row at ``<|im_end|>`` or a stop string such as
``</tool_call>``. Logprobs are computed from the raw logits of each step with the convention of
``deepeyes_agent.rollout.engine`` so a training forward reproduces them.

With ``reuse_kv_cache=True`` the engine keeps each episode's keys and values between turns, so a turn
only prefills what the context gained since the last one (the previous turn's last token, the env's
observation and its new images) instead of the whole conversation. That path runs its own batched
prefill and decode loop (``model.generate`` cannot resume per-row caches of different lengths): every
row's cache is left-padded into one batch cache, the new tokens are left-padded after it (holes in the
attention mask are fine), positions come from the context (``chat.py`` computed them, so the model
never has to re-derive mRoPE from a partial sequence), and only the NEW images' pixel values and grids
are passed, which is what keeps "image features and image tokens do not match" away. After the turn
each row's valid keys and values are cut out again and kept until :meth:`HFEngine.release`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel

from deepeyes_agent.policy.chat import EpisodeContext, VisionTokenizer
from deepeyes_agent.policy.loading import QwenVLImageProcessor
from deepeyes_agent.policy.logprobs import sampling_logprobs
from deepeyes_agent.rollout.engine import Engine, Generation, SamplingParams


@dataclass
class _KVCache:
    """Keys and values of one episode's first ``len(tokens)`` context tokens, per layer (heads, T, dim)."""

    tokens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class HFEngine(Engine):
    """Batched generation on a transformers model; shares the model object it is given.

    ``reuse_kv_cache=False`` (default) re-encodes each context fully every turn with ``model.generate``;
    ``True`` keeps per-episode keys and values across turns (see the module docstring) until
    :meth:`release` is called for the finished contexts (or they are garbage collected).
    """

    def __init__(self, model: PreTrainedModel, processor: QwenVLImageProcessor, *,
                 reuse_kv_cache: bool = False) -> None:
        self.model = model
        self.processor = processor
        self.vision = VisionTokenizer(processor)
        self.tokenizer = processor.tokenizer
        self.reuse_kv_cache = reuse_kv_cache
        self._caches: weakref.WeakKeyDictionary[EpisodeContext, _KVCache] = weakref.WeakKeyDictionary()

    def release(self, contexts: Sequence[EpisodeContext]) -> None:
        """Drop the cached keys and values of these contexts (their episodes are over)."""
        for ctx in contexts:
            self._caches.pop(ctx, None)

    def close(self) -> None:
        self._caches.clear()

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys and values the engine holds, over all episodes (memory accounting, tests)."""
        return sum(len(c.tokens) for c in self._caches.values())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy new weights into the model in place (a no-op when the learner trains this very model)."""
        self.model.load_state_dict(dict(state_dict), strict=True)

    # ------------------------------------------------------------------ stop handling
    def _stops(self, params: SamplingParams) -> tuple[list[int], list[str]]:
        """Split stop strings into single-token ids (cheap eos checks) and multi-token strings."""
        ids = [self.vision.im_end_id, *params.stop_token_ids]
        strings = []
        for stop in params.stop:
            encoded = self.tokenizer.encode(stop, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(encoded[0])
            else:
                strings.append(stop)
        return list(dict.fromkeys(ids)), strings

    def _cut(self, tokens: list[int], stop_ids: list[int], stop_strings: list[str],
             limit: int) -> tuple[int, str, str | None]:
        """Where a row's turn ends: (length, finish_reason, matched stop)."""
        for i, token in enumerate(tokens[:limit]):
            if token in stop_ids:
                return i + 1, "stop", self.tokenizer.convert_ids_to_tokens(token)
            if stop_strings:
                tail = self.vision.decode(tokens[max(0, i - 16):i + 1])
                for stop in stop_strings:
                    if tail.endswith(stop):
                        return i + 1, "stop", stop
        return min(limit, len(tokens)), "length", None

    # ------------------------------------------------------------------ batching
    def _left_padded(self, contexts: Sequence[EpisodeContext]) -> dict[str, torch.Tensor]:
        length = max(len(c) for c in contexts)
        batch = len(contexts)
        input_ids = torch.full((batch, length), self.vision.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        mm_types = torch.zeros((batch, length), dtype=torch.long)
        for b, ctx in enumerate(contexts):
            n = len(ctx)
            input_ids[b, length - n:] = torch.tensor(ctx.token_ids)
            attention[b, length - n:] = 1
            mm_types[b, length - n:] = torch.tensor(ctx.mm_token_type_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm_types}
        grids = [g for c in contexts for g in c.image_grid_thw]
        if grids:
            inputs["pixel_values"] = torch.cat([c.pixel_values for c in contexts if c.pixel_values is not None])
            inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _generation_config(self, params: SamplingParams, max_new: int, stop_ids: list[int]) -> GenerationConfig:
        sample = params.temperature > 0
        return GenerationConfig(
            do_sample=sample, temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None, top_k=params.top_k if sample else None,
            max_new_tokens=max_new, eos_token_id=stop_ids, pad_token_id=self.vision.pad_token_id,
            suppress_tokens=list(self.vision.vision_token_ids), output_logits=True,
            return_dict_in_generate=True,
        )

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, contexts: Sequence[EpisodeContext], params: SamplingParams) -> list[Generation]:
        """Sample one turn per context (left-padded batch); contexts without budget get empty "length" turns."""
        results: list[Generation | None] = [None] * len(contexts)
        active = [i for i, c in enumerate(contexts) if c.remaining_tokens > 0]
        for i in set(range(len(contexts))) - set(active):
            results[i] = Generation([], [], "length")
        if active:
            for i, gen in zip(active, self._generate_batch([contexts[i] for i in active], params), strict=True):
                results[i] = gen
        return [r for r in results if r is not None]

    def _generate_batch(self, contexts: Sequence[EpisodeContext], params: SamplingParams) -> list[Generation]:
        if self.reuse_kv_cache:
            return self._generate_cached(contexts, params)
        start = time.perf_counter()
        stop_ids, stop_strings = self._stops(params)
        max_new = min(params.max_tokens, max(c.remaining_tokens for c in contexts))
        inputs = self._left_padded(contexts)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        extra: dict[str, Any] = {"stop_strings": stop_strings, "tokenizer": self.tokenizer} if stop_strings else {}
        out = self.model.generate(**inputs, generation_config=self._generation_config(params, max_new, stop_ids),
                                  **extra)
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:].tolist()
        logits = torch.stack(out.logits, dim=1)  # (B, steps, V), raw: before temperature and suppression
        logp = sampling_logprobs(logits, params.temperature, self.vision.vision_token_ids)
        elapsed = time.perf_counter() - start
        generations = []
        for b, ctx in enumerate(contexts):
            limit = min(params.max_tokens, ctx.remaining_tokens)
            n, reason, stop = self._cut(new_tokens[b], stop_ids, stop_strings, limit)
            tokens = new_tokens[b][:n]
            picked = logp[b, torch.arange(n), torch.tensor(tokens, dtype=torch.long)].tolist()
            generations.append(Generation(tokens, picked, reason, self.vision.decode(tokens), stop,
                                          {"generate_s": elapsed, "batch_size": float(len(contexts))}))
        return generations

    # ------------------------------------------------------------------ KV-cache reuse
    def _cache_of(self, ctx: EpisodeContext) -> _KVCache | None:
        """The episode's cache if it still describes a prefix of the context (else it is dropped)."""
        cache = self._caches.get(ctx)
        if cache is None:
            return None
        n = len(cache.tokens)
        if n >= len(ctx) or ctx.token_ids[:n] != cache.tokens:
            del self._caches[ctx]
            return None
        return cache

    def _new_images(self, ctx: EpisodeContext, cached: int) -> range:
        """Indices of the images whose tokens lie after the first ``cached`` tokens (never split)."""
        before = sum(1 for t in ctx.token_ids[:cached] if t == self.vision.vision_start_id)
        return range(before, len(ctx.images))

    def _batch_cache(self, caches: list[_KVCache | None], width: int) -> tuple[DynamicCache, list[int]]:
        """Left-pad every row's cached keys and values to ``width`` columns in one DynamicCache."""
        cache = DynamicCache(config=self.model.config)
        lengths = [len(c.tokens) if c is not None else 0 for c in caches]
        if width == 0:
            return cache, lengths
        sample = next(c for c in caches if c is not None)
        for layer in range(len(sample.keys)):
            heads, _, dim = sample.keys[layer].shape
            keys = sample.keys[layer].new_zeros((len(caches), heads, width, dim))
            values = torch.zeros_like(keys)
            for b, c in enumerate(caches):
                if c is not None:
                    keys[b, :, width - lengths[b]:] = c.keys[layer]
                    values[b, :, width - lengths[b]:] = c.values[layer]
            cache.update(keys, values, layer)
        return cache, lengths

    def _prefill_inputs(self, contexts: Sequence[EpisodeContext], cached: list[int],
                        width: int) -> dict[str, torch.Tensor]:
        """The tokens each row gained since its cache, left-padded after the padded caches."""
        new = [len(ctx) - n for ctx, n in zip(contexts, cached, strict=True)]
        length, batch = max(new), len(contexts)
        input_ids = torch.full((batch, length), self.vision.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width + length), dtype=torch.long)
        positions = torch.zeros((3, batch, length), dtype=torch.long)
        pixels, grids = [], []
        for b, (ctx, n) in enumerate(zip(contexts, cached, strict=True)):
            input_ids[b, length - new[b]:] = torch.tensor(ctx.token_ids[n:], dtype=torch.long)
            attention[b, width - n:width] = 1
            attention[b, width + length - new[b]:] = 1
            positions[:, b, length - new[b]:] = ctx.position_ids[:, n:]
            for i in self._new_images(ctx, n):
                pixels.append(ctx.image_pixel_values(i))
                grids.append(ctx.image_grid_thw[i])
        inputs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions}
        if grids:
            inputs["pixel_values"] = torch.cat(pixels)
            inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _sample(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row from raw last-position logits: vision tokens suppressed, then greedy or
        temperature / top-k / top-p sampling (the logprob is recorded from the untruncated distribution)."""
        logits = logits.float().clone()
        logits[:, list(self.vision.vision_token_ids)] = float("-inf")
        if params.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / params.temperature
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    def _row_done(self, tokens: list[int], limit: int, stop_ids: list[int], stop_strings: list[str]) -> bool:
        if len(tokens) >= limit or tokens[-1] in stop_ids:
            return True
        if stop_strings:
            tail = self.vision.decode(tokens[-16:])
            return any(tail.endswith(stop) for stop in stop_strings)
        return False

    def _generate_cached(self, contexts: Sequence[EpisodeContext], params: SamplingParams) -> list[Generation]:
        """Prefill only what each context gained since its cache, decode the batch, keep the new caches."""
        start = time.perf_counter()
        stop_ids, stop_strings = self._stops(params)
        limits = [min(params.max_tokens, c.remaining_tokens) for c in contexts]
        caches = [self._cache_of(c) for c in contexts]
        width = max(len(c.tokens) if c is not None else 0 for c in caches)
        cache, cached = self._batch_cache(caches, width)
        inputs = self._prefill_inputs(contexts, cached, width)
        prefill_tokens = int(inputs["attention_mask"][:, width:].sum())
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        attention = inputs.pop("attention_mask")
        out = self.model(**inputs, attention_mask=attention, cache=cache, use_cache=True, logits_to_keep=1)
        next_pos = torch.tensor([c.next_position for c in contexts], device=self.device)
        tokens: list[list[int]] = [[] for _ in contexts]
        logprobs: list[list[float]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        for step in range(max(limits)):
            logits = out.logits[:, -1]
            picked = self._sample(logits, params, generator)
            logp = sampling_logprobs(logits, params.temperature, self.vision.vision_token_ids)
            picked_logp = logp.gather(-1, picked[:, None]).squeeze(-1).tolist()
            for b, token in enumerate(picked.tolist()):
                if not done[b]:
                    tokens[b].append(token)
                    logprobs[b].append(picked_logp[b])
                    done[b] = self._row_done(tokens[b], limits[b], stop_ids, stop_strings)
            if all(done):
                break
            attention = torch.cat([attention, attention.new_ones((len(contexts), 1))], dim=1)
            positions = (next_pos + step).view(1, -1, 1).expand(3, -1, -1)
            out = self.model(input_ids=picked[:, None], attention_mask=attention, position_ids=positions,
                             cache=out.cache, use_cache=True, logits_to_keep=1)
        self._keep_caches(contexts, out.cache, attention, tokens)
        elapsed = time.perf_counter() - start
        generations = []
        for b in range(len(contexts)):
            n, reason, stop = self._cut(tokens[b], stop_ids, stop_strings, limits[b])
            gen = tokens[b][:n]
            generations.append(Generation(gen, logprobs[b][:n], reason, self.vision.decode(gen), stop,
                                          {"generate_s": elapsed, "batch_size": float(len(contexts)),
                                           "prefill_tokens": float(prefill_tokens)}))
        return generations

    def _keep_caches(self, contexts: Sequence[EpisodeContext], cache: DynamicCache, attention: torch.Tensor,
                     tokens: list[list[int]]) -> None:
        """Cut each row's valid keys and values out of the batch cache: its context plus all generated
        tokens but the last (which was sampled, never fed)."""
        fed = cache.layers[0].keys.shape[-2]
        for b, ctx in enumerate(contexts):
            keep = len(ctx) + len(tokens[b]) - 1
            columns = attention[b, :fed].nonzero().squeeze(-1)[:keep]
            self._caches[ctx] = _KVCache(
                tokens=ctx.token_ids + tokens[b][:-1],
                keys=[layer.keys[b][:, columns].clone() for layer in cache.layers],
                values=[layer.values[b][:, columns].clone() for layer in cache.layers],
            )
