"""A transformers generation engine: one turn for a batch of episode contexts, on CPU or GPU.

Contexts of different lengths are left-padded into one batch (the model computes each row's mRoPE
positions from its attention mask), all images of all rows go in as one ``pixel_values`` block with one
grid row per image, and generation stops per row at ``<|im_end|>`` or a stop string such as
``</tool_call>``. Logprobs are computed from the raw logits of each step with the convention of
``deepeyes_agent.rollout.engine`` so a training forward reproduces them.

With ``reuse_kv_cache=True`` (the default, and the fastest mode: ``benchmarks/rollout.py``) the engine
keeps each episode's keys and values between turns, so a turn only prefills what the context gained since
the last one (the previous turn's last token, the env's observation and its new images) instead of the
whole conversation. That path runs its own batched prefill and decode loop (``model.generate`` cannot
resume per-row caches of different lengths):

- prefill: rows that are fresh copies of one prompt (a GRPO group's first turn) are prefilled once; the
  others go in batches of similar new-token counts (sorted, cut where left padding would exceed half the
  real tokens, ``PREFILL_PADDING``), each row's cache left-padded after the batch's widest; positions come
  from the context (``chat.py`` computed them, so the model never has to re-derive mRoPE from a partial
  sequence), and only the NEW images' pixel values and grids are passed, which is what keeps "image
  features and image tokens do not match" away;
- decode: all rows in one buffer per layer, allocated once per turn with room for every step (a step
  writes its column in place, no concatenation); once a quarter of the batch has finished
  (``LEAVE_SHARE``) the finished rows leave it, with the left padding no remaining row needs;
- each row's valid keys and values are cut out as it leaves and kept until :meth:`HFEngine.release`.

The cache costs memory: every running episode's keys and values stay on the device between turns
(``cached_tokens``), about what ``model.generate`` allocates for the same batch within one turn.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

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

    ``reuse_kv_cache=True`` (default) keeps per-episode keys and values across turns (see the module
    docstring) until :meth:`release` is called for the finished contexts (or they are garbage collected);
    ``False`` re-encodes each context fully every turn with ``model.generate``.
    """

    def __init__(self, model: PreTrainedModel, processor: QwenVLImageProcessor, *,
                 reuse_kv_cache: bool = True) -> None:
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

    @staticmethod
    def _sample(logp: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
        """One token per row from the rows' sampling logprobs (``sampling_logprobs``: vision tokens already out of
        the distribution): greedy, or drawn after the top-k / top-p cut (the logprob is recorded uncut)."""
        if params.temperature == 0:
            return logp.argmax(dim=-1)
        if params.top_k:
            kth = torch.topk(logp, min(params.top_k, logp.shape[-1]), dim=-1).values[:, -1:]
            logp = logp.masked_fill(logp < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logp, order = torch.sort(logp, descending=True, dim=-1)
            probs = sorted_logp.softmax(-1)
            drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
            logp = logp.scatter(-1, order, sorted_logp.masked_fill(drop, float("-inf")))
        return draw(logp.softmax(-1), generator)

    def _row_done(self, tokens: list[int], limit: int, stop_ids: list[int], stop_strings: list[str]) -> bool:
        if len(tokens) >= limit or tokens[-1] in stop_ids:
            return True
        if stop_strings:
            tail = self.vision.decode(tokens[-16:])
            return any(tail.endswith(stop) for stop in stop_strings)
        return False

    def _generate_cached(self, contexts: Sequence[EpisodeContext], params: SamplingParams) -> list[Generation]:
        """Prefill only what each context gained since its cache (once per distinct fresh prompt, in batches of
        similar lengths), decode all rows together while finished ones leave, keep the new caches."""
        start = time.perf_counter()
        stop_ids, stop_strings = self._stops(params)
        limits = [min(params.max_tokens, c.remaining_tokens) for c in contexts]
        caches = [self._cache_of(c) for c in contexts]
        owners = self._owners(contexts, caches)
        new = [len(ctx) - (len(c.tokens) if c is not None else 0) for ctx, c in zip(contexts, caches, strict=True)]
        distinct = [b for b, owner in enumerate(owners) if owner == b]
        groups = _prefill_groups(new, distinct)
        logits: list[torch.Tensor | None] = [None] * len(contexts)
        kvs: list[_KVCache | None] = [None] * len(contexts)
        for rows in groups:
            group_logits, group_kvs = self._prefill(contexts, caches, rows)
            for i, row in enumerate(rows):
                logits[row], kvs[row] = group_logits[i], group_kvs[i]
        self.release(contexts)  # the old caches live on in ``kvs``: do not hold them twice while decoding
        tokens, logprobs = self._decode(contexts, [kvs[o] for o in owners], torch.stack([logits[o] for o in owners]),
                                        limits, params, stop_ids, stop_strings)
        elapsed = time.perf_counter() - start
        metrics = {"generate_s": elapsed, "batch_size": float(len(contexts)),
                   "prefill_tokens": float(sum(new[b] for b in distinct)), "prefill_batches": float(len(groups))}
        generations = []
        for b in range(len(contexts)):
            n, reason, stop = self._cut(tokens[b], stop_ids, stop_strings, limits[b])
            gen = tokens[b][:n]
            generations.append(Generation(gen, logprobs[b][:n], reason, self.vision.decode(gen), stop, dict(metrics)))
        return generations

    def _owners(self, contexts: Sequence[EpisodeContext], caches: list[_KVCache | None]) -> list[int]:
        """For each row, the row whose prefill it shares: fresh contexts with the same tokens and pixels (the
        rollouts of one task, a GRPO group, on their first turn) are prefilled once."""
        owners = list(range(len(contexts)))
        firsts: dict[tuple[int, ...], list[int]] = {}
        for b, (ctx, cache) in enumerate(zip(contexts, caches, strict=True)):
            if cache is not None:
                continue
            candidates = firsts.setdefault(tuple(ctx.token_ids), [])
            owners[b] = next((o for o in candidates if _same_pixels(ctx, contexts[o])), b)
            if owners[b] == b:
                candidates.append(b)
        return owners

    def _prefill(self, contexts: Sequence[EpisodeContext], caches: list[_KVCache | None],
                 rows: list[int]) -> tuple[torch.Tensor, list[_KVCache]]:
        """One batched forward over the tokens that ``rows`` gained since their caches: each row's last-position
        logits (raw) and its keys and values over its whole context."""
        group = [contexts[r] for r in rows]
        old = [caches[r] for r in rows]
        width = max(len(c.tokens) if c is not None else 0 for c in old)
        cache, cached = self._batch_cache(old, width)
        inputs = self._prefill_inputs(group, cached, width)
        out = self.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        kvs = [_cut(out.cache, inputs["attention_mask"], i, ctx.token_ids) for i, ctx in enumerate(group)]
        return out.logits[:, -1], kvs

    def _decode(self, contexts: Sequence[EpisodeContext], kvs: list[_KVCache], logits: torch.Tensor,
                limits: list[int], params: SamplingParams, stop_ids: list[int],
                stop_strings: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        """Sample every row's turn, one token per step for all rows still running (their caches in one buffer);
        rows leave the batch once a quarter of it has finished, and every row's cache is kept as it leaves."""
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        width = max(len(kv.tokens) for kv in kvs)
        cache = _decode_cache(kvs, width, max(limits) - 1)
        attention = torch.zeros((len(kvs), width + max(limits) - 1), dtype=torch.long, device=self.device)
        for b, kv in enumerate(kvs):
            attention[b, width - len(kv.tokens):width] = 1
        next_pos = torch.tensor([c.next_position for c in contexts], device=self.device)
        rows = list(range(len(contexts)))  # the context of each batch row
        tokens: list[list[int]] = [[] for _ in contexts]
        logprobs: list[list[float]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        for step in range(max(limits)):
            logp = sampling_logprobs(logits, params.temperature, self.vision.vision_token_ids)
            picked = self._sample(logp, params, generator)
            picked_logp = logp.gather(-1, picked[:, None]).squeeze(-1).tolist()
            for i, (b, token) in enumerate(zip(rows, picked.tolist(), strict=True)):
                if not done[b]:
                    tokens[b].append(token)
                    logprobs[b].append(picked_logp[i])
                    done[b] = self._row_done(tokens[b], limits[b], stop_ids, stop_strings)
            finished = [i for i, b in enumerate(rows) if done[b]]
            if len(finished) == len(rows):
                break
            if len(finished) * LEAVE_SHARE >= len(rows):
                self._keep_caches(contexts, cache, attention, [(i, rows[i]) for i in finished], tokens)
                stay = [i for i, b in enumerate(rows) if not done[b]]
                attention = _keep_rows(cache, attention, stay)
                next_pos, picked, rows = next_pos[stay], picked[stay], [rows[i] for i in stay]
            column = cache.get_seq_length()
            attention[:, column] = 1
            positions = (next_pos + step).view(1, -1, 1).expand(3, -1, -1)
            out = self.model(input_ids=picked[:, None], attention_mask=attention[:, :column + 1],
                             position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
        self._keep_caches(contexts, cache, attention, list(enumerate(rows)), tokens)
        return tokens, logprobs

    def _keep_caches(self, contexts: Sequence[EpisodeContext], cache: Cache, attention: torch.Tensor,
                     rows: list[tuple[int, int]], tokens: list[list[int]]) -> None:
        """Cut the valid keys and values of (batch row, context) pairs out of the decode cache: the context plus
        all generated tokens but the last (which was sampled, never fed)."""
        for i, b in rows:
            self._caches[contexts[b]] = _cut(cache, attention, i, contexts[b].token_ids + tokens[b][:-1])


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` [B, V] with those probabilities (inverse CDF: one uniform number per row,
    where ``torch.multinomial`` took a tenth of a decoding step on the CPU). Never an index of probability 0."""
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, dtype=cdf.dtype, generator=generator) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).clamp_(max=probs.shape[-1] - 1)
    # u rounded up to the total (or a cut tail) would land on a token of probability 0: take the likeliest
    return torch.where(probs.gather(-1, picked) > 0, picked, probs.argmax(-1, keepdim=True)).squeeze(-1)


# A finished row stays in the decode batch (computed, its tokens ignored) until this share of the batch has
# finished: dropping rows copies the remaining rows' caches, about the cost of one decoding step.
LEAVE_SHARE = 4
# A prefill batch of rows left-padded to its longest holds at most this many token slots per real token: rows
# that gained an image are not batched with rows that gained a short error message.
PREFILL_PADDING = 1.5


def _prefill_groups(new: list[int], rows: list[int]) -> list[list[int]]:
    """``rows`` sorted by how many tokens they prefill (``new``), cut into batches of little padding."""
    groups: list[list[int]] = []
    for row in sorted(rows, key=lambda r: new[r]):
        if groups and (len(groups[-1]) + 1) * new[row] <= PREFILL_PADDING * (sum(new[r] for r in groups[-1])
                                                                              + new[row]):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def _same_pixels(a: EpisodeContext, b: EpisodeContext) -> bool:
    pa, pb = a.pixel_values, b.pixel_values
    return (pa is None and pb is None) or (pa is not None and pb is not None and torch.equal(pa, pb))


class _DecodeLayer(DynamicLayer):
    """One layer's keys and values while decoding: a buffer allocated once per turn with room for every step, so
    a step writes its column in place (``DynamicLayer`` concatenates, copying the whole cache at every step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.is_initialized, self.device = True, keys.device
        self._set(keys, values, length)

    def _set(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self._set(self.key_buffer, self.value_buffer, end)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def keep_rows(self, rows: torch.Tensor, start: int) -> None:
        """Keep only these batch rows, and drop the first ``start`` columns (padding in all of them)."""
        self._set(self.key_buffer[rows, :, start:], self.value_buffer[rows, :, start:], self.length - start)


def _decode_cache(kvs: list[_KVCache], width: int, steps: int) -> Cache:
    """Every row's keys and values right-aligned at column ``width`` of one buffer per layer, with ``steps``
    free columns after it."""
    layers = []
    for layer in range(len(kvs[0].keys)):
        heads, _, dim = kvs[0].keys[layer].shape
        keys = kvs[0].keys[layer].new_zeros((len(kvs), heads, width + steps, dim))
        values = torch.zeros_like(keys)
        for b, kv in enumerate(kvs):
            keys[b, :, width - len(kv.tokens):width] = kv.keys[layer]
            values[b, :, width - len(kv.tokens):width] = kv.values[layer]
        layers.append(_DecodeLayer(keys, values, width))
    return Cache(layers=layers)


def _keep_rows(cache: Cache, attention: torch.Tensor, stay: list[int]) -> torch.Tensor:
    """Drop the other rows from the decode cache, and the left padding no staying row needs any more; returns
    the staying rows' attention mask, cut the same way."""
    index = torch.tensor(stay, device=attention.device)
    kept = attention[index]
    start = int(kept[:, :cache.get_seq_length()].any(dim=0).nonzero()[0])
    for layer in cache.layers:
        layer.keep_rows(index, start)
    return kept[:, start:].contiguous()


def _cut(cache: Cache, attention: torch.Tensor, row: int, tokens: list[int]) -> _KVCache:
    """A batch row's keys and values of its first ``len(tokens)`` attended columns, copied out of a batch cache
    (one slice when they are contiguous, as after decoding; gathered when padding splits them, as after a prefill
    of rows that gained different numbers of tokens)."""
    fed = cache.layers[0].keys.shape[-2]
    columns = attention[row, :fed].nonzero().squeeze(-1)[:len(tokens)]
    first, last = int(columns[0]), int(columns[-1])
    if last - first + 1 == len(columns):
        def take(t: torch.Tensor) -> torch.Tensor:
            return t[row, :, first:last + 1].clone(memory_format=torch.contiguous_format)
    else:
        def take(t: torch.Tensor) -> torch.Tensor:
            return t[row][:, columns]
    return _KVCache(tokens=list(tokens), keys=[take(layer.keys) for layer in cache.layers],
                    values=[take(layer.values) for layer in cache.layers])
