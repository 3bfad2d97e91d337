"""Proof of consistency: rollout logprobs equal a training forward's, image tokens equal image grids, no drift.

Multi-turn, multi-image episodes are played with the transformers engine (batched, left-padded, sampling)
against the tiny Qwen2.5-VL, observations carry numpy crops of different sizes, and the assembled
contexts go through one right-padded training forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepeyes_agent.policy.chat import EpisodeContext, PromptTooLongError, VisionTokenizer, collate
from deepeyes_agent.policy.logprobs import token_logprobs
from deepeyes_agent.rollout.engine import Generation, SamplingParams
from deepeyes_agent.rollout.hf_engine import HFEngine
from deepeyes_envs.messages import (
    QWEN_IMAGE,
    image_part,
    message,
    message_images,
    render_qwen,
    strip_end_of_turn,
)

torch.set_num_threads(2)
TOL = 1e-3


@pytest.fixture(scope="module")
def engine(policy):
    return HFEngine(policy.model, policy.processor)


def synthetic_image(height: int = 320, width: int = 480, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: a deterministic image whose crops differ in content and size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def first_messages(image: np.ndarray, question: str = "What is written on the sign?") -> tuple:
    return (message("system", "You are a helpful assistant."),
            message("user", image_part(image), "\n" + question + "\nThink first, then answer."))


def zoom_observation(crop: np.ndarray) -> tuple:
    return (message("user", "<tool_response>", image_part(crop), "\nAnswer now.</tool_response>"),)


def error_observation() -> tuple:
    return (message("user", "Error: ZOOM IN ARGUMENTS ARE INVALID"),)


def check_image_invariants(ctx: EpisodeContext) -> None:
    """Image pads == sum of t*h*w/merge^2 over the grids, and pixel rows == sum of t*h*w."""
    merge = ctx.vision.merge_size
    grids = ctx.image_grid_thw
    assert len(grids) == len(ctx.images)
    assert ctx.num_image_tokens == sum(t * h * w // merge**2 for t, h, w in grids)
    rows = 0 if ctx.pixel_values is None else ctx.pixel_values.shape[0]
    assert rows == sum(t * h * w for t, h, w in grids)


def play(engine: HFEngine, processor, observations: list[list[tuple]], params: SamplingParams,
         images: list[np.ndarray]) -> tuple[list[EpisodeContext], list[list[tuple]]]:
    """Play len(images) episodes together: generate, then observe, turn by turn; return contexts and the
    conversations (env messages + assistant texts) that the contexts must render."""
    contexts = [EpisodeContext(processor, first_messages(im), max_total_tokens=4096) for im in images]
    conversations = [list(first_messages(im)) for im in images]
    for turn in range(len(observations[0]) + 1):
        generations = engine.generate(contexts, params)
        for ctx, conv, gen, obs in zip(contexts, conversations, generations, observations, strict=True):
            assert len(gen.token_ids) == len(gen.logprobs) > 0
            ctx.append_generated(gen.token_ids, gen.logprobs)
            assert ctx.last_generated_text() == gen.text
            conv.append(message("assistant", strip_end_of_turn(gen.text)))
            if turn < len(obs):
                assert ctx.append_observation(obs[turn])
                conv.extend(obs[turn])
            check_image_invariants(ctx)
    return contexts, conversations


@pytest.fixture(scope="module")
def episodes(engine, policy):
    big = synthetic_image(320, 480, seed=0)
    tall = synthetic_image(400, 260, seed=1)
    observations = [
        [zoom_observation(big[40:200, 60:300]), zoom_observation(big[100:160, 10:470])],
        [error_observation(), zoom_observation(tall[0:350, 20:120]), zoom_observation(tall[200:260, 0:260])],
    ]
    # Episodes of unequal turn counts play the same number of turns here; pad the shorter plan.
    observations[0].append(zoom_observation(big[0:90, 0:90]))
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    return play(engine, policy.processor, observations, params, [big, tall])


def test_logprobs_match_training_forward(policy, episodes) -> None:
    contexts, _ = episodes
    batch = collate(contexts)
    suppress = contexts[0].vision.vision_token_ids
    with torch.no_grad():
        recomputed = token_logprobs(policy.model, batch, temperature=1.0, suppress_token_ids=suppress)
    mask = batch["loss_mask"].bool()
    assert mask.sum() == sum(sum(len(t) for t in c.generated_turns()) for c in contexts) == 2 * 4 * 12
    diff = (recomputed[mask] - batch["old_logprobs"][mask]).abs().max().item()
    assert diff < TOL, diff
    # The recorded logprobs are real: not all equal, and clearly off the uniform distribution's.
    assert batch["old_logprobs"][mask].std() > 1e-3


def test_each_episode_alone_matches_too(policy, episodes) -> None:
    contexts, _ = episodes
    for ctx in contexts:
        inputs = ctx.to_model_inputs()
        with torch.no_grad():
            lp = token_logprobs(policy.model, inputs, 1.0, ctx.vision.vision_token_ids)[0]
        mask = torch.tensor(ctx.loss_mask, dtype=torch.bool)
        assert (lp[mask] - torch.tensor(ctx.logprobs)[mask]).abs().max().item() < TOL


def test_positions_match_model_rope_index(policy, episodes) -> None:
    for ctx in episodes[0]:
        inputs = ctx.to_model_inputs()
        expected, _ = policy.model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"])
        assert torch.equal(inputs["position_ids"], expected)
        assert len(ctx.image_grid_thw) >= 3
        assert len({tuple(g) for g in ctx.image_grid_thw}) >= 2  # images of different sizes


def test_mm_token_type_ids_are_needed_without_positions(policy, episodes) -> None:
    """The PLATFORM.md trap: the model only finds mRoPE positions itself when given mm_token_type_ids."""
    ctx = episodes[0][0]
    inputs = ctx.to_model_inputs()
    suppress = ctx.vision.vision_token_ids
    mask = torch.tensor(ctx.loss_mask, dtype=torch.bool)
    recorded = torch.tensor(ctx.logprobs)[mask]
    with torch.no_grad():
        own = {k: v for k, v in inputs.items() if k != "position_ids"}
        lp_own = token_logprobs(policy.model, own, 1.0, suppress)[0][mask]
        policy.model.model.rope_deltas = None
        flat = {k: v for k, v in own.items() if k != "mm_token_type_ids"}
        lp_flat = token_logprobs(policy.model, flat, 1.0, suppress)[0][mask]
    assert (lp_own - recorded).abs().max() < TOL
    assert (lp_flat - recorded).abs().max() > TOL  # 1-D positions: beyond the tolerance


def test_context_text_equals_rendered_conversation(episodes) -> None:
    for ctx, conversation in zip(*episodes, strict=True):
        expected = render_qwen(conversation, add_generation_prompt=False)
        # Each image renders as one pad in the chat text; the context holds its expanded run.
        pieces = expected.split(QWEN_IMAGE)
        assert len(pieces) - 1 == len(ctx.image_grid_thw) == len(message_images(conversation))
        expanded = pieces[0]
        for grid, piece in zip(ctx.image_grid_thw, pieces[1:], strict=True):
            pads = "<|image_pad|>" * ctx.vision.grid_tokens(grid)
            expanded += f"<|vision_start|>{pads}<|vision_end|>" + piece
        decoded = ctx.decode()
        assert expanded.startswith(decoded)
        assert expanded[len(decoded):] in ("\n", "<|im_end|>\n")  # the last turn is not closed yet


def test_masks_and_segments(episodes) -> None:
    for ctx in episodes[0]:
        kinds = [s.kind for s in ctx.segments]
        assert kinds[0] == "prompt" and kinds[1::2] == ["generated"] * 4 and kinds[2::2] == ["observation"] * 3
        for seg in ctx.segments:
            values = set(ctx.loss_mask[seg.start:seg.end])
            assert values == ({1} if seg.kind == "generated" else {0})
        assert len(ctx.logprobs) == len(ctx.loss_mask) == len(ctx) == ctx.position_ids.shape[1]


def test_collate_right_pads(episodes) -> None:
    contexts = episodes[0]
    batch = collate(contexts, pad_to=max(len(c) for c in contexts) + 5)
    for b, ctx in enumerate(contexts):
        n = len(ctx)
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
        assert not batch["loss_mask"][b, n:].any()
        assert torch.equal(batch["position_ids"][:, b, :n], ctx.position_ids)
        tail = batch["position_ids"][:, b, n:]
        assert torch.equal(tail[:, 0], torch.full((3,), ctx.next_position))
        assert (tail.diff(dim=1) == 1).all()
    assert batch["image_grid_thw"].shape[0] == sum(len(c.image_grid_thw) for c in contexts)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())


def test_prompt_equals_stock_processor_output(policy) -> None:
    image = synthetic_image(210, 330, seed=3)
    msgs = first_messages(image)
    ctx = EpisodeContext(policy.processor, msgs)
    stock = policy.processor(text=[render_qwen(msgs)], images=[image], return_tensors="pt")
    assert ctx.token_ids == stock["input_ids"][0].tolist()
    assert ctx.mm_token_type_ids == stock["mm_token_type_ids"][0].tolist()
    assert torch.equal(ctx.pixel_values, stock["pixel_values"])
    assert ctx.image_grid_thw == [tuple(stock["image_grid_thw"][0].tolist())]


def test_over_budget_observation_is_dropped_whole(policy) -> None:
    image = synthetic_image(300, 300, seed=4)
    vision = VisionTokenizer(policy.processor)
    crop = image[0:280, 0:200]
    probe = EpisodeContext(policy.processor, first_messages(image), vision=vision)
    probe.append_generated([vision.im_end_id], [0.0])
    before = len(probe)
    probe.append_observation(zoom_observation(crop))
    need = len(probe) - before
    assert need > vision.grid_tokens(vision.image_grid(crop)) > 1

    for budget, fits in ((before + need, True), (before + need - 1, False)):
        ctx = EpisodeContext(policy.processor, first_messages(image), max_total_tokens=budget, vision=vision)
        ctx.append_generated([vision.im_end_id], [0.0])
        snapshot = (list(ctx.token_ids), len(ctx.images), ctx.pixel_values.shape[0], len(ctx.segments))
        assert ctx.append_observation(zoom_observation(crop)) is fits
        assert ctx.truncated is not fits
        if fits:
            assert len(ctx) == budget and ctx.remaining_tokens == 0
        else:  # nothing of the observation got in: no half image, no stray text
            assert (list(ctx.token_ids), len(ctx.images), ctx.pixel_values.shape[0], len(ctx.segments)) == snapshot
        check_image_invariants(ctx)


def test_prompt_over_budget_raises(policy) -> None:
    with pytest.raises(PromptTooLongError):
        EpisodeContext(policy.processor, first_messages(synthetic_image()), max_prompt_tokens=20)


def test_generated_tokens_are_checked(policy) -> None:
    ctx = EpisodeContext(policy.processor, first_messages(synthetic_image(64, 64)), max_total_tokens=200)
    with pytest.raises(ValueError, match="vision tokens"):
        ctx.append_generated([ctx.vision.image_token_id], [0.0])
    with pytest.raises(ValueError, match="logprobs"):
        ctx.append_generated([1, 2], [0.0])
    with pytest.raises(ValueError, match="budget"):
        ctx.append_generated([1] * (ctx.remaining_tokens + 1), [0.0] * (ctx.remaining_tokens + 1))


def test_observation_after_tool_call_stop_closes_the_turn(policy) -> None:
    ctx = EpisodeContext(policy.processor, first_messages(synthetic_image(64, 64)))
    tool_end = ctx.vision.tokenizer.convert_tokens_to_ids("</tool_call>")
    ctx.append_generated([tool_end], [-1.0])
    ctx.append_observation(error_observation())
    obs = ctx.segments[-1]
    assert ctx.decode(ctx.token_ids[obs.start:obs.end]).startswith("<|im_end|>\n<|im_start|>user\nError:")
    assert ctx.loss_mask[obs.start] == 0


# ---------------------------------------------------------------------- the engine's stopping rules
def _greedy(engine: HFEngine, ctx: EpisodeContext, **kw) -> Generation:
    return engine.generate([ctx], SamplingParams(temperature=0.0, **kw))[0]


def test_engine_stops_and_lengths(engine, policy) -> None:
    ctx = EpisodeContext(policy.processor, first_messages(synthetic_image(64, 96)), max_total_tokens=4096)
    free = _greedy(engine, ctx, max_tokens=6, stop=())
    assert free.finish_reason == "length" and len(free.token_ids) == 6
    assert _greedy(engine, ctx, max_tokens=6, stop=()).token_ids == free.token_ids  # greedy is deterministic

    by_id = _greedy(engine, ctx, max_tokens=6, stop=(), stop_token_ids=(free.token_ids[2],))
    first = free.token_ids.index(free.token_ids[2]) + 1
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:first]

    text = engine.vision.decode(free.token_ids[:3])
    by_text = _greedy(engine, ctx, max_tokens=6, stop=(text,))
    assert by_text.finish_reason == "stop" and by_text.text.endswith(text) and len(by_text.token_ids) <= 3

    tight = EpisodeContext(policy.processor, first_messages(synthetic_image(64, 96)), max_total_tokens=len(ctx) + 2)
    capped = engine.generate([tight, ctx], SamplingParams(max_tokens=6, stop=(), seed=0))
    assert [len(g.token_ids) for g in capped] == [2, 6]
    assert all(g.finish_reason == "length" for g in capped)


def test_engine_never_emits_vision_tokens(engine, policy) -> None:
    ctx = EpisodeContext(policy.processor, first_messages(synthetic_image(64, 64)))
    gen = engine.generate([ctx], SamplingParams(max_tokens=40, seed=7, stop=()))[0]
    assert not set(gen.token_ids) & set(engine.vision.vision_token_ids)
