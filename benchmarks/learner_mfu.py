"""Learner MFU on a GPU: a randomly initialised Qwen2.5-VL-3B-sized model (config only, nothing downloaded).

Times the learner's actual training step (``deepeyes_agent.training.losses.rl_loss``: backbone forward, the LM
head and clipped policy loss over generated tokens, backward, AdamW step) on synthetic multi-turn batches (text +
one image per sequence, half the tokens generated), and reports

    MFU = model FLOPs per second / peak FLOPs per second,
    model FLOPs per step ~ 6 * N_params * tokens + 12 * layers * hidden * seq_len * tokens  (attention, causal /2)

with the peak from ``--peak-tflops`` (defaults: H100 SXM 989, H200 989 dense bf16 TFLOPs; auto-picked from the
device name). Run on a GPU machine::

    python benchmarks/learner_mfu.py                      # 3B-sized, bf16, batch 8 x 2048 tokens
    python benchmarks/learner_mfu.py --seq-len 4096 --batch 4 --peak-tflops 989
    python benchmarks/learner_mfu.py --tiny --device cpu --dtype float32  # wiring check on a CPU

Besides MFU against the card's spec sheet, the table compares the step's model FLOP rate with a baseline
measured in the same run: a large square matmul in the same dtype on the same device, i.e. what this card
delivers right now. Their ratio stays meaningful on a shared or throttled machine, where the spec does not.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def qwen2_5_vl_3b_config():
    """The published Qwen2.5-VL-3B-Instruct shapes (text 36 layers x 2048, vision 32 x 1280)."""
    from transformers import Qwen2_5_VLConfig

    text = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643}
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=True)


def tiny_config():
    from deepeyes_agent.policy.tiny import tiny_qwen2_5_vl_config, train_tiny_tokenizer

    return tiny_qwen2_5_vl_config(train_tiny_tokenizer())


def synthetic_batch(cfg, batch: int, seq_len: int, image_side: int, device: str) -> dict[str, torch.Tensor]:
    """Sequences of text + one image (``image_side`` px square) each, half of the text tokens generated."""
    vc = cfg.vision_config
    grid = image_side // vc.patch_size
    n_image_tokens = grid * grid // vc.spatial_merge_size**2
    if seq_len < n_image_tokens + 16:
        raise SystemExit(f"--seq-len {seq_len} cannot hold a {image_side} px image ({n_image_tokens} tokens) "
                         "and some text: raise --seq-len or lower --image-side")
    vocab = cfg.text_config.vocab_size
    ids = torch.randint(0, min(vocab, 150000), (batch, seq_len))
    special = torch.tensor([cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id])
    ids[torch.isin(ids, special)] = 0  # random text must not contain vision tokens (the tiny vocab has them)
    ids[:, 8:8 + n_image_tokens] = cfg.image_token_id
    ids[:, 7] = cfg.vision_start_token_id
    ids[:, 8 + n_image_tokens] = cfg.vision_end_token_id
    mm = (ids == cfg.image_token_id).long()
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.long)
    loss_mask[:, seq_len // 2:] = 1
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size**2
    pixels = torch.randn(batch * grid * grid, patch_dim)
    grids = torch.tensor([[1, grid, grid]] * batch)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm,
           "pixel_values": pixels, "image_grid_thw": grids, "loss_mask": loss_mask,
           "old_logprobs": torch.full((batch, seq_len), -2.0),
           "advantages": torch.randn(batch, 1).expand(batch, seq_len).clone()}
    return {k: v.to(device) for k, v in out.items()}


def model_flops(n_params: int, n_layers: int, hidden: int, batch: int, seq_len: int) -> float:
    tokens = batch * seq_len
    dense = 6.0 * n_params * tokens
    attention = 12.0 * n_layers * hidden * seq_len * tokens / 2  # causal: half the score matrix
    return dense + attention


def matmul_tflops(device: str, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """The baseline: TFLOP/s of an n x n x n matmul in ``dtype`` on ``device``, best of ``repeats``."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_learner_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg, device: str, steps: int,
                      warmup: int) -> float:
    """Mean seconds of one learner step (forward, clipped loss, backward, clip, AdamW) after ``warmup`` steps."""
    from deepeyes_agent.training.losses import LossSettings, last_hidden_state, rl_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    suppress = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    normalizer = float(batch["loss_mask"].sum())
    times = []
    for step in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        loss, _ = rl_loss(model.lm_head, last_hidden_state(model, batch), batch, LossSettings(), suppress, normalizer)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def format_table(r: dict) -> str:
    rows = [("model parameters (B)", f"{r['params_b']:.3f}"), ("tokens per step", f"{r['tokens_per_step']}"),
            ("step (s)", f"{r['step_s']:.3f}"), ("tokens/s", f"{r['tokens_per_s']:.0f}"),
            ("model TFLOP/s", f"{r['model_tflops_per_s']:.2f}"),
            ("baseline: matmul TFLOP/s", f"{r['matmul_tflops_per_s']:.2f}"),
            ("model / matmul", f"{r['vs_matmul']:.3f}"),
            ("peak TFLOP/s (spec)", "-" if r["peak_tflops"] is None else f"{r['peak_tflops']:.0f}"),
            ("MFU (vs spec)", "-" if r["mfu"] is None else f"{r['mfu']:.3f}")]
    width = max(len(k) for k, _ in rows)
    lines = [f"learner step on {r['device']}, {r['dtype']}", f"{'quantity':<{width}}  value",
             f"{'-' * width}  -----"]
    return "\n".join(lines + [f"{k:<{width}}  {v}" for k, v in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--image-side", type=int, default=448)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOPs of the card")
    parser.add_argument("--matmul-size", type=int, default=None, help="baseline matmul side (8192 GPU, 1024 CPU)")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of 3B (wiring check)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_config() if args.tiny else qwen2_5_vl_3b_config()
    cfg._attn_implementation = args.attn
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    batch = synthetic_batch(cfg, args.batch, args.seq_len, args.image_side, args.device)
    step_s = time_learner_step(model, batch, cfg, args.device, args.steps, args.warmup)
    baseline = matmul_tflops(args.device, dtype, args.matmul_size or (8192 if args.device == "cuda" else 1024))
    tc = cfg.text_config
    flops = model_flops(n_params, tc.num_hidden_layers, tc.hidden_size, args.batch, args.seq_len)
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), 989.0)
    achieved = flops / step_s / 1e12
    result = {"params_b": n_params / 1e9, "tokens_per_step": args.batch * args.seq_len, "step_s": step_s,
              "tokens_per_s": args.batch * args.seq_len / step_s, "model_tflops_per_s": achieved,
              "matmul_tflops_per_s": baseline, "vs_matmul": achieved / baseline,
              "peak_tflops": peak, "mfu": achieved / peak if peak else None, "dtype": args.dtype,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
              "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else None}
    print(json.dumps(result) if args.json else format_table(result))
    if not args.json:  # the model's FLOP rate as a share of a plain matmul's on the same device, same run
        print(f"RESULT learner_mfu: {result['vs_matmul']:.2f}x (target >= 0.5x)")


if __name__ == "__main__":
    main()
