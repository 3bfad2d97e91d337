"""Loss-head memory and time at the 7B's vocabulary and hidden size: the full-logits head beside the chunked one.

The loss head is what turns the backbone's last hidden state into the loss: the LM head, the float32
log-softmax with the sampling temperature and the suppressed vision tokens, the picked logprob and the
entropy, the token-level loss, and the backward of all of it (to the hidden state and the LM head's weight).
Both paths run on the same hidden state (drawn at random: its values change neither memory nor time; the
backbone is the same for both and left out) and the same batch, one sequence of T tokens of which 15% are
generated (the rest: prompt, images and observations, with loss mask 0):

- ``full logits`` (the learner before): logits at every position, ``log_softmax`` over [T, V];
- ``chunked`` (``policy.logprobs.token_stats``): the generated tokens' hidden states gathered first, the
  LM head run a chunk of positions at a time, again in the backward.

Peak memory is the most bytes of tensors alive at once between the start of the loss and the end of its
backward (a ``TorchDispatchMode`` follows every storage an op creates until it is freed), gradients included.
Where a path would not fit this machine (``--max-gb``) it is not run: its peak is then *estimated* by the same
tracker under ``FakeTensorMode`` (shapes and dtypes only, nothing allocated), and it has no time. The estimate
is checked against a real run of the full-logits head at the smallest length. On the CPU, float32::

    python benchmarks/loss_memory.py                     # T = 1024 (both timed), 4096, 16384: ~15 min on 2 cores
    python benchmarks/loss_memory.py --hidden 64 --vocab 4096 --lengths 256,1024   # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from deepeyes_agent.policy import logprobs as lean_head
from deepeyes_agent.policy.logprobs import entropy_from_logits, sampling_logits

GENERATED_SHARE = 0.15
TURNS = 4  # the generated tokens come in this many runs, each after an observation
VISION_TOKENS = (151652, 151653, 151655, 151656)  # Qwen2.5-VL's, suppressed from the sampling distribution
TEMPERATURE = 1.0
ENTROPY_COEF = 0.01


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created under this mode and still alive, and their peak (works with fake
    tensors too: it reads sizes, never data). Views and in-place results of tensors made before (the weight's
    transpose, say) share an input's storage and are not counted: they allocate nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.finalize] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._tracked.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._tracked and key not in inputs:
                    nbytes = storage.nbytes()
                    self._tracked[key] = weakref.finalize(storage, self._freed, key, nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


def full_logits_token_stats(hidden: Tensor, lm_head: nn.Module, input_ids: Tensor, scored: Tensor | None = None,
                            temperature: float = 1.0, suppress_token_ids: tuple[int, ...] = (),
                            chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The learner's loss head before ``token_stats`` (the baseline): every position's logits, log-softmax [T, V]."""
    scaled = sampling_logits(lm_head(hidden)[:, :-1], temperature, suppress_token_ids)
    picked = torch.log_softmax(scaled, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    zero = torch.zeros_like(picked[:, :1])
    return torch.cat([zero, picked], dim=1), torch.cat([zero, entropy_from_logits(scaled)], dim=1)


PATHS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"full logits": full_logits_token_stats,
                                                           "chunked": lean_head.token_stats}


def suppressed(vocab: int) -> tuple[int, ...]:
    """Qwen2.5-VL's vision tokens, or the last four ids of a smaller vocabulary."""
    return VISION_TOKENS if vocab > max(VISION_TOKENS) else tuple(range(vocab - 4, vocab))


def make_batch(length: int, vocab: int, seed: int = 0) -> dict[str, Tensor]:
    """One sequence: a prompt, then TURNS x (generated run, observation), 15% of the tokens generated."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (1, length), generator=g)
    input_ids[torch.isin(input_ids, torch.tensor(suppressed(vocab)))] = 0
    loss_mask = torch.zeros(1, length, dtype=torch.long)
    run = max(1, round(GENERATED_SHARE * length / TURNS))
    stride = length // TURNS
    for turn in range(TURNS):
        end = (turn + 1) * stride
        loss_mask[0, end - run:end] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "old_logprobs": torch.full((1, length), -2.0),
            "advantages": torch.full((1, length), 0.5)}


def surrogate_loss(logprobs: Tensor, entropy: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """The token-level loss on the head's output (PPO ratio times advantage, entropy bonus), token-mean over the
    generated tokens. Only [B, T] tensor ops, no value read back (``FakeTensorMode`` has none)."""
    mask = batch["loss_mask"].float()
    ratio = torch.exp((logprobs - batch["old_logprobs"]) * mask)
    tokens = mask.sum().clamp(min=1.0)
    return (-(ratio * batch["advantages"] * mask).sum() - ENTROPY_COEF * (entropy * mask).sum()) / tokens


def head_step(path: str, lm_head: nn.Module, hidden: Tensor, batch: dict[str, Tensor]) -> int:
    """One loss and backward through ``path``'s head; returns its peak live bytes."""
    with LiveBytes() as tracker:
        logprobs, entropy = PATHS[path](hidden, lm_head, batch["input_ids"], batch["loss_mask"], TEMPERATURE,
                                        suppressed(lm_head.out_features))
        surrogate_loss(logprobs, entropy, batch).backward()
    return tracker.peak


def measure(path: str, length: int, hidden_size: int, vocab: int) -> tuple[int, float]:
    """Peak bytes and seconds of a real run (fresh tensors; gradients dropped afterwards)."""
    lm_head = nn.Linear(hidden_size, vocab, bias=False)
    hidden = torch.randn(1, length, hidden_size, requires_grad=True)
    batch = make_batch(length, vocab)
    start = time.perf_counter()
    peak = head_step(path, lm_head, hidden, batch)
    return peak, time.perf_counter() - start


def estimate(path: str, length: int, hidden_size: int, vocab: int) -> int:
    """Peak bytes of ``path`` under ``FakeTensorMode``: the same tracker, no memory allocated. The chunked head
    picks rows by value (``nonzero``), which fake tensors cannot, so only the full-logits head is estimated."""
    if path != "full logits":
        raise ValueError("only the full-logits head runs on fake tensors")
    real = make_batch(length, vocab)
    with FakeTensorMode() as fake:
        batch = {k: fake.from_tensor(v) for k, v in real.items()}
        lm_head = nn.Linear(hidden_size, vocab, bias=False)
        hidden = torch.empty(1, length, hidden_size, requires_grad=True)
        return head_step(path, lm_head, hidden, batch)


def head_parameter_bytes(hidden_size: int, vocab: int) -> int:
    return 4 * hidden_size * vocab


def run_benchmark(lengths: list[int], hidden_size: int, vocab: int, max_gb: float,
                  threads: int) -> tuple[list[dict[str, Any]], dict[str, float] | None]:
    """Every (length, path): peak (measured, or estimated where it would not fit) and time; plus the check of
    the estimator against the first real full-logits run (None if none fitted)."""
    torch.set_num_threads(threads)
    rows = []
    for length in lengths:
        for path in PATHS:
            row: dict[str, Any] = {"tokens": length, "generated": int(make_batch(length, vocab)["loss_mask"].sum()),
                                   "path": path, "seconds": None}
            fits = True
            if path == "full logits":
                row["estimated_bytes"] = estimate(path, length, hidden_size, vocab)
                fits = row["estimated_bytes"] + head_parameter_bytes(hidden_size, vocab) <= max_gb * 1e9
            if fits:
                row["peak_bytes"], row["seconds"] = measure(path, length, hidden_size, vocab)
                row["how"] = "measured"
            else:
                row["peak_bytes"], row["how"] = row["estimated_bytes"], "estimated (FakeTensorMode)"
            rows.append(row)
    for length in lengths:
        full, lean = (r for r in rows if r["tokens"] == length)
        lean["memory_ratio"] = full["peak_bytes"] / lean["peak_bytes"]
        if full["seconds"] is not None:
            lean["time_ratio"] = full["seconds"] / lean["seconds"]
    checked = next((r for r in rows if r["path"] == "full logits" and r["how"] == "measured"), None)
    if checked is None:
        return rows, None
    return rows, {"tokens": checked["tokens"], "estimated_bytes": checked["estimated_bytes"],
                  "measured_bytes": checked["peak_bytes"]}


def format_table(rows: list[dict[str, Any]], check: dict[str, float] | None) -> str:
    lines = ["| T | generated | head | peak GB | peak | time s | memory: full / chunked | time: full / chunked |",
             "|---" * 8 + "|"]
    for r in rows:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        memory = f"{r['memory_ratio']:.1f}x" if "memory_ratio" in r else ""
        speed = f"{r['time_ratio']:.2f}x" if "time_ratio" in r else ("" if r["path"] != "chunked" else "-")
        lines.append(f"| {r['tokens']} | {r['generated']} | {r['path']} | {r['peak_bytes'] / 1e9:.3f} | {r['how']} "
                     f"| {seconds} | {memory} | {speed} |")
    if check is None:
        lines.append("\nestimator check: no full-logits run fitted --max-gb")
    else:
        lines.append(f"\nestimator check, full logits at T = {check['tokens']}: FakeTensorMode "
                     f"{check['estimated_bytes'] / 1e9:.3f} GB, measured {check['measured_bytes'] / 1e9:.3f} GB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096,16384", help="sequence lengths T, comma-separated")
    parser.add_argument("--hidden", type=int, default=3584, help="hidden size (Qwen2.5-VL-7B: 3584)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary (Qwen2.5-VL: 151,936)")
    parser.add_argument("--max-gb", type=float, default=10.0,
                        help="run a path for real only if its estimated peak plus the LM head fit in this many GB")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    rows, check = run_benchmark(lengths, args.hidden, args.vocab, args.max_gb, args.threads)
    print(format_table(rows, check))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "estimator_check": check}, indent=2) + "\n")
    largest = next(r for r in rows if r["tokens"] == lengths[-1] and r["path"] == "chunked")
    print(f"RESULT loss_memory: {largest['memory_ratio']:.1f}x (target >= 8x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
