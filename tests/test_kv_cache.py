"""KV-cache reuse in the transformers engine: same tokens and logprobs as re-encoding, less prefill.

Multi-turn, multi-image episodes (crops of different sizes, an error turn) are played by an engine that
re-encodes every turn and by one that keeps each episode's keys and values; greedy decoding must give the
same tokens and logprobs within float32 noise, and sampled episodes must match a training forward pass. The
batched cache path is checked on the batches that stress it: rows of very different cached lengths, a GRPO
group's identical prompts (prefilled once), rows whose turns end at different steps (they leave the decoding
batch) and images arriving in some rows only.
"""

from __future__ import annotations

import pytest
import torch
from test_chat_consistency import error_observation, first_messages, play, synthetic_image, zoom_observation

from deepeyes_agent.policy.chat import EpisodeContext, collate
from deepeyes_agent.policy.logprobs import token_logprobs
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine, draw

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
    plain = play(HFEngine(policy.model, policy.processor, reuse_kv_cache=False), policy.processor, observations, params,
                 images)[0]
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


def _mixed_batch(policy, engine: HFEngine) -> list[EpisodeContext]:
    """A deep episode (four turns and three crops already in ``engine``'s cache, then a short error message), two
    fresh rollouts of one prompt, and a fresh episode of another image whose budget leaves room for 2 tokens."""
    observations, images = plan()
    deep = play(engine, policy.processor, [observations[0]], SamplingParams(max_tokens=4, temperature=0.0, stop=()),
                images[:1])[0][0]
    deep.append_observation(error_observation())
    group = [EpisodeContext(policy.processor, first_messages(images[1]), max_total_tokens=4096) for _ in range(2)]
    other = first_messages(synthetic_image(200, 200, seed=9))
    short = EpisodeContext(policy.processor, other, max_total_tokens=len(EpisodeContext(policy.processor, other)) + 2)
    return [deep, *group, short]


def test_mixed_batch_matches_re_encoding(policy) -> None:
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    contexts = _mixed_batch(policy, engine)
    deep, fresh, _, short = contexts
    cached = len(engine._caches[deep].tokens)
    assert len(deep) > 2 * len(fresh) and cached > len(fresh)  # very different cached and prefilled lengths
    params = SamplingParams(max_tokens=9, temperature=0.0, stop=())
    plain = HFEngine(policy.model, policy.processor, reuse_kv_cache=False).generate(contexts, params)
    reused = engine.generate(contexts, params)
    assert [len(g.token_ids) for g in reused] == [9, 9, 9, 2]  # the short row leaves the batch after 2 steps
    for a, b in zip(plain, reused, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < TOL
    metrics = reused[0].metrics
    # the group's prompt is prefilled once; the deep row only what it gained; the crop-sized and the prompt-sized
    # prefills go in separate batches
    assert metrics["prefill_tokens"] == (len(deep) - cached) + len(fresh) + len(short)
    assert metrics["prefill_batches"] >= 2
    assert engine.cached_tokens == sum(len(c) + len(g.token_ids) - 1 for c, g in zip(contexts, reused, strict=True))


def test_mixed_sampled_turns_match_training_forward(policy) -> None:
    """Sampled turns of the mixed batch, then a turn where only some rows got an image (one an error message,
    one an image, the short row is out of budget): every recorded logprob equals a training forward's."""
    engine = HFEngine(policy.model, policy.processor, reuse_kv_cache=True)
    contexts = _mixed_batch(policy, engine)
    _, images = plan()
    for turn, seed in enumerate((11, 12)):
        gens = engine.generate(contexts, SamplingParams(max_tokens=7, seed=seed, stop=()))
        for i, (ctx, gen) in enumerate(zip(contexts, gens, strict=True)):
            ctx.append_generated(gen.token_ids, gen.logprobs)
            if turn == 0 and i == 1:
                assert ctx.append_observation(zoom_observation(images[1][0:200, 0:120]))
            elif turn == 0 and i in (0, 2):
                assert ctx.append_observation(error_observation())
    assert contexts[1].generated_turns()[0] != contexts[2].generated_turns()[0]  # one prompt, two samples
    assert len(contexts[3].generated_turns()[1]) == 0  # no budget left: an empty turn
    batch = collate(contexts)
    with torch.no_grad():
        recomputed = token_logprobs(policy.model, batch, 1.0, contexts[0].vision.vision_token_ids)
    mask = batch["loss_mask"].bool()
    assert int(mask.sum()) == 4 * 4 + 7 * 2 + 2 * 7 * 2 + 2  # deep, group, short
    assert (recomputed[mask] - batch["old_logprobs"][mask]).abs().max().item() < TOL


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).expand(20000, 6).contiguous()
    share = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=6) / 20000
    assert (share[[0, 2, 5]] == 0).all()
    assert torch.allclose(share[[1, 3, 4]], torch.tensor([0.5, 0.3, 0.2]), atol=0.015)
