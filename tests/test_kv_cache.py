"""KV-cache reuse in the transformers engine: same tokens and logprobs as re-encoding, less prefill.

Multi-turn, multi-image episodes (crops of different sizes, an error turn) are played by an engine that
re-encodes every turn and by one that keeps each episode's keys and values; greedy decoding must give the
same tokens and logprobs within float32 noise, and sampled episodes must match a training forward pass.
"""

from __future__ import annotations

import pytest
import torch
from test_chat_consistency import error_observation, play, synthetic_image, zoom_observation

from deepeyes_agent.policy.chat import collate
from deepeyes_agent.policy.logprobs import token_logprobs
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine

torch.set_num_threads(2)
TOL = 1e-4


def plan() -> tuple[list[list[tuple]], list]:
    big, tall = synthetic_image(320, 480, seed=0), synthetic_image(400, 260, seed=1)
    observations = [
        [zoom_observation(big[40:200, 60:300]), zoom_observation(big[100:160, 10:470]), zoom_observation(big[0:90, 0:90])],
        [error_observation(), zoom_observation(tall[0:350, 20:120]), zoom_observation(tall[200:260, 0:260])],
    ]
    return observations, [big, tall]


@pytest.fixture(scope="module")
def greedy_pair(policy):
    observations, images = plan()
    params = SamplingParams(max_tokens=8, temperature=0.0, stop=())
    plain = play(HFEngine(policy.model, policy.processor), policy.processor, observations, params, images)[0]
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    reused = play(engine, policy.processor, observations, params, images)[0]
    return plain, reused, engine


def test_reuse_gives_the_same_tokens_and_logprobs(greedy_pair) -> None:
    plain, reused, _ = greedy_pair
    for a, b in zip(plain, reused, strict=True):
        assert a.token_ids == b.token_ids
        assert len(a.image_grid_thw) >= 3
        diff = max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))
        assert diff < TOL, diff


def test_sampled_reuse_matches_training_forward(policy) -> None:
    observations, images = plan()
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    contexts = play(engine, policy.processor, observations, SamplingParams(max_tokens=8, seed=5), images)[0]
    batch = collate(contexts)
    with torch.no_grad():
        recomputed = token_logprobs(policy.model, batch, 1.0, contexts[0].vision.vision_token_ids)
    mask = batch["loss_mask"].bool()
    assert mask.sum() > 0
    assert (recomputed[mask] - batch["old_logprobs"][mask]).abs().max().item() < TOL


def test_only_new_tokens_are_prefilled_and_release_frees(policy, greedy_pair) -> None:
    _, reused, engine = greedy_pair
    assert engine.cached_tokens == sum(len(c) - 1 for c in reused)  # all but each last sampled token
    observations, images = plan()
    ctx = reused[0]
    ctx.append_observation(zoom_observation(images[0][0:64, 0:200]))
    before = engine._caches[ctx].tokens
    gen = engine.generate([ctx], SamplingParams(max_tokens=3, temperature=0.0, stop=()))[0]
    # Prefill covers the last sampled token, the observation and its image: not the whole context.
    assert gen.metrics["prefill_tokens"] == len(ctx) - len(before) < len(ctx) / 2
    engine.release(reused)
    assert engine.cached_tokens == 0


def test_a_changed_context_is_not_served_from_a_stale_cache(policy, greedy_pair) -> None:
    _, reused, _ = greedy_pair
    observations, images = plan()
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    ctx = play(engine, policy.processor, [observations[0][:1]], SamplingParams(max_tokens=4, temperature=0.0, stop=()),
               images[:1])[0][0]
    ctx.token_ids[5] = ctx.token_ids[6]  # someone edited the context: the cache no longer describes it
    assert engine._cache_of(ctx) is None and engine.cached_tokens == 0
