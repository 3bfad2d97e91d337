"""A trained policy out of its run: any checkpoint as a Hugging Face model directory, and back.

RLlib keeps the learner's weights in ``checkpoints/iter_N/learner_group/learner/rl_module/default_policy/
module_state.pkl`` (the RL module's state: the model's state dict, plus ``value_head.*`` for PPO's critic),
beside optimizer moments and sampler state that no user of the policy wants. :func:`export_policy` writes
that state as what every tool already reads::

    OUT/  model.safetensors  config.json  generation_config.json      (save_pretrained, safetensors)
          tokenizer.json  tokenizer_config.json  chat_template.jinja  preprocessor_config.json  (the base's,
                                                 with the run's pixel budget written in)
          README.md                              the model card: run, iteration, held-out table, how to load
          deepeyes_export.json                   where it came from and the settings it was trained and
                                                 evaluated with (env, turns, tokens), for offline.evaluate

``transformers``' ``AutoModelForImageTextToText`` / ``AutoProcessor`` and vLLM load it as any Qwen-VL
checkpoint. PPO's value head is not part of the policy and is left out (the card says so). ``train.py``
exports the final policy to ``<run_dir>/final/``; ``python -m deepeyes_agent.policy export SOURCE OUT`` does
it for any checkpoint. :func:`resolve_policy_source` tells a model directory, an export, a run directory
and a checkpoint apart, so the evaluation commands take any of them.

This module knows run directories only by their files (``config.yaml``, ``checkpoints/iter_N/DONE``,
``metrics.jsonl``): the policy layer sits below training and imports nothing from it. torch and transformers
are imported when a checkpoint is read, so the driver and the evaluation command import this module cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from deepeyes_agent.run_records import METRICS_FILE, metric_cell, read_metrics

if TYPE_CHECKING:
    import torch

CHECKPOINT_PREFIX = "iter_"
MODULE_STATE = Path("learner_group", "learner", "rl_module", "default_policy", "module_state.pkl")
VALUE_HEAD = "value_head."  # the PPO critic's entries in the RL module's state (training.rllib.module)
EXPORT_INFO = "deepeyes_export.json"
FINAL_DIR = "final"  # <run_dir>/final: what train.py exports at the end of a run
# What a Qwen-VL directory holds besides the weights: copied from the base as they are.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")

SourceKind = Literal["model", "export", "run", "checkpoint"]


class PolicySourceError(ValueError):
    """A path that is not something a policy can be read from, or a checkpoint that does not fit its base."""


# ------------------------------------------------------------------------------------------ what a path is
def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (``checkpoints/iter_N`` with its ``DONE`` marker); half-written ``tmp-*``
    ones are ignored."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if checkpoint_iteration(p) is not None and (p / "DONE").exists()]
    return max(done, key=checkpoint_iteration, default=None)


def checkpoint_iteration(checkpoint: Path) -> int | None:
    """The iteration a checkpoint was saved at (``iter_N``), or None for a directory named otherwise."""
    name = checkpoint.name
    if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit():
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def is_checkpoint(path: Path) -> bool:
    return (path / "rllib_checkpoint.json").is_file() and (path / "learner_group").is_dir()


def is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or ((path / "config.yaml").is_file() and (path / METRICS_FILE).exists())


@dataclasses.dataclass(frozen=True)
class PolicySource:
    """What a path holds a policy as.

    ``kind``: ``"model"`` (a Hugging Face directory), ``"export"`` (one this module wrote: it carries the run's
    settings), ``"run"`` (a ``train.py`` run directory) or ``"checkpoint"`` (an RLlib checkpoint).
    ``model_dir`` is a directory loadable as it is (for a run: its ``final/`` export when that is of the
    newest checkpoint), or None when the checkpoint must be exported first; ``checkpoint`` is the one to
    export then.
    """

    kind: SourceKind
    path: Path
    model_dir: Path | None = None
    checkpoint: Path | None = None
    run_dir: Path | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-able name of the policy (what evaluation's resume check and report show)."""
        out: dict[str, Any] = {"source": self.kind, "path": str(self.path)}
        if self.checkpoint is not None:
            out["checkpoint"] = str(self.checkpoint)
        return out


def resolve_policy_source(path: str | os.PathLike) -> PolicySource:
    """Tell what ``path`` is: a model directory, an export, a run directory or a checkpoint (see
    :class:`PolicySource`); anything else is a :class:`PolicySourceError` saying what was expected."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise PolicySourceError(f"{p} does not exist")
    if p.is_dir() and (p / "config.json").is_file():
        return PolicySource("export" if (p / EXPORT_INFO).is_file() else "model", p, model_dir=p)
    if p.is_dir() and is_checkpoint(p):
        run_dir = p.parent.parent if p.parent.name == "checkpoints" else None
        return PolicySource("checkpoint", p, checkpoint=p, run_dir=run_dir)
    if p.is_dir() and is_run_dir(p):
        checkpoint = latest_checkpoint(p)
        final = p / FINAL_DIR
        final_iteration = _export_info(final).get("iteration") if (final / "config.json").is_file() else None
        if checkpoint is None and final_iteration is None:
            raise PolicySourceError(f"{p} is a run directory without a complete checkpoint (checkpoints/iter_N "
                                    "with its DONE file) or an exported final/ policy: has it run an iteration?")
        if checkpoint is None or final_iteration == checkpoint_iteration(checkpoint):
            return PolicySource("run", p, model_dir=final, checkpoint=checkpoint, run_dir=p)
        return PolicySource("run", p, checkpoint=checkpoint, run_dir=p)
    raise PolicySourceError(
        f"{p} is neither a model directory (config.json), an exported run (config.json and {EXPORT_INFO}), a run "
        "directory (config.yaml, checkpoints/iter_N) nor an RLlib checkpoint (rllib_checkpoint.json, learner_group/)")


def _export_info(model_dir: Path) -> dict[str, Any]:
    path = model_dir / EXPORT_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def run_settings(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings an exported policy was trained with (env, turns, tokens, pixel budget, held-out data), as
    :func:`export_policy` recorded them; ``{}`` for a directory it did not write."""
    return dict(_export_info(Path(model_dir)).get("settings") or {})


# ------------------------------------------------------------------------------------------ reading a checkpoint
class _TensorUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds torch tensors in plain containers and nothing else: a module state holds no
    other object, and refusing every other global keeps a stray (or hostile) pickle from running code at export
    time. The storages inside are read with ``torch.load(..., weights_only=True)``, where torch's own pickle
    helper would read them with no restriction at all."""

    SAFE = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
            ("torch._utils", "_rebuild_parameter"), ("torch", "Size"), ("torch", "device")}

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_weights_only
        if (module, name) in self.SAFE or (module == "torch" and (
                name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a module state holds tensors only; refusing to load {module}.{name}")


def _load_storage_weights_only(data: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def load_module_state(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The RL module's state in an RLlib checkpoint of a ``train.py`` run: parameter name -> CPU tensor."""
    path = Path(checkpoint) / MODULE_STATE
    if not path.is_file():
        raise PolicySourceError(f"{checkpoint}: no {MODULE_STATE} (is this a checkpoint of train.py's DeepEyes "
                                "algorithm? its learner writes the policy's weights there)")
    import torch

    with path.open("rb") as f:
        state = _TensorUnpickler(f).load()
    if not isinstance(state, Mapping) or not state:
        raise PolicySourceError(f"{path}: expected a non-empty mapping of parameter names to tensors")
    return {str(k): torch.as_tensor(v) for k, v in state.items()}


def read_run_config(run_dir: Path | None) -> dict[str, Any]:
    """A run directory's resolved ``config.yaml`` as plain data (``{}`` when there is none)."""
    path = run_dir / "config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------ export
@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_policy` wrote and how long it took."""

    out: Path
    checkpoint: Path
    iteration: int | None
    base: Path
    seconds: float
    size_bytes: int
    dropped: tuple[str, ...]  # state entries left out (PPO's value head)

    def summary(self) -> str:
        dropped = f"; left out {len(self.dropped)} value-head tensor(s)" if self.dropped else ""
        at = f"iteration {self.iteration}" if self.iteration is not None else self.checkpoint.name
        return (f"exported {at} of {self.checkpoint} to {self.out} in {self.seconds:.1f} s "
                f"({self.size_bytes / 1e6:.1f} MB){dropped}")


def export_policy(source: str | os.PathLike, out: str | os.PathLike, *, base: str | os.PathLike | None = None
                  ) -> ExportResult:
    """Write the policy of a checkpoint (or of a run's newest checkpoint) to ``out`` as a model directory.

    ``base`` is the model directory training started from (default: ``model.path`` in the run's
    ``config.yaml``): it gives the architecture, tokenizer, chat template and image processor, and the
    checkpoint's tensors must fit it exactly. ``out`` is written beside itself first and renamed into place,
    so an interrupted export never leaves a directory that looks complete.
    """
    import torch
    import transformers

    from deepeyes_agent.policy.loading import load_model

    transformers.utils.logging.disable_progress_bar()  # a loading and a writing bar per tiny export
    start = time.perf_counter()
    src = resolve_policy_source(source)
    if src.checkpoint is None:
        raise PolicySourceError(f"{src.path} is already a model directory ({src.kind}); export takes a run "
                                "directory or a checkpoint")
    run_config = read_run_config(src.run_dir)
    model_cfg = run_config.get("model") or {}
    base_dir = _base_dir(base, model_cfg, src.checkpoint)
    state = load_module_state(src.checkpoint)
    dropped = tuple(sorted(k for k in state if k.startswith(VALUE_HEAD)))
    weights = {k: v for k, v in state.items() if not k.startswith(VALUE_HEAD)}
    dtype = next((v.dtype for v in weights.values() if v.is_floating_point()), torch.float32)
    model = load_model(base_dir, dtype=dtype)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise PolicySourceError(f"{src.checkpoint} does not fit the base model {base_dir} (pass the model training "
                                f"started from with --base): {str(exc)[:600]}") from None
    out = Path(out).expanduser().resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        _copy_processor(base_dir, tmp, model_cfg.get("min_pixels"), model_cfg.get("max_pixels"))
        iteration = checkpoint_iteration(src.checkpoint)
        records = read_metrics(src.run_dir) if src.run_dir is not None else []
        info = _info(src, base_dir, iteration, dropped, run_config)
        geometry = image_geometry(tmp)
        if geometry:
            info["settings"]["image_geometry"] = geometry
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(info, records, model.num_parameters()))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return ExportResult(out, src.checkpoint, iteration, base_dir, time.perf_counter() - start, size, dropped)


def _base_dir(base: str | os.PathLike | None, model_cfg: Mapping[str, Any], checkpoint: Path) -> Path:
    given = base if base is not None else model_cfg.get("path")
    if not given:
        raise PolicySourceError(f"{checkpoint}: no run config.yaml names the model training started from; pass it "
                                "with --base DIR")
    path = Path(given).expanduser()
    if not (path / "config.json").is_file():
        where = "--base" if base is not None else "model.path of the run's config.yaml"
        raise PolicySourceError(f"the base model {path} ({where}) is not a local model directory (no config.json); "
                                "pass the model training started from with --base DIR")
    return path.resolve()


def _copy_processor(base: Path, out: Path, min_pixels: int | None, max_pixels: int | None) -> None:
    """The base's tokenizer, chat template and image processor files, with the run's pixel budget (when it
    overrode the saved one) written into ``preprocessor_config.json``: every loader then sees the images at
    the resolution the policy was trained on."""
    for name in PROCESSOR_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    path = out / "preprocessor_config.json"
    if path.is_file() and (min_pixels is not None or max_pixels is not None):
        cfg = json.loads(path.read_text())
        size = dict(cfg.get("size") or {})
        if min_pixels is not None:
            cfg["min_pixels"] = size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            cfg["max_pixels"] = size["longest_edge"] = int(max_pixels)
        cfg["size"] = size
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def settings_from_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings an evaluation of a run's policy defaults to: its env and env kwargs, reply and episode
    token budgets, pixel budget and held-out data (what ``deepeyes_export.json`` keeps as ``settings``)."""
    section = {k: run_config.get(k) or {} for k in ("model", "env", "rollout", "data")}
    rollout, data = section["rollout"], section["data"]
    settings = {
        "env_id": section["env"].get("env_id") or None, "env_kwargs": section["env"].get("kwargs") or {},
        "max_tokens": rollout.get("max_tokens"), "max_total_tokens": rollout.get("max_total_tokens"),
        "max_prompt_tokens": rollout.get("max_prompt_tokens"), "eval_temperature": rollout.get("eval_temperature"),
        "min_pixels": section["model"].get("min_pixels"), "max_pixels": section["model"].get("max_pixels"),
        "data": {k: data.get(k) for k in ("source", "kind", "options", "n_eval", "eval_seed") if k in data},
    }
    return {k: v for k, v in settings.items() if v not in (None, {})}


def image_geometry(model_dir: Path, min_pixels: int | None = None, max_pixels: int | None = None
                   ) -> dict[str, int] | None:
    """The pixel budget and resize factor a model directory's image processor reads images with (``min_pixels``
    / ``max_pixels`` override the saved budget): what an env needs to read boxes in the frame the model saw.

    A local player gets them from its processor (``rollout.loop.env_kwargs_for``); a player behind an endpoint
    cannot, so the export records them and an endpoint evaluation passes them to the env.
    """
    path = model_dir / "preprocessor_config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    size = cfg.get("size") or {}
    low = min_pixels or cfg.get("min_pixels") or size.get("shortest_edge")
    high = max_pixels or cfg.get("max_pixels") or size.get("longest_edge")
    if not (low and high and cfg.get("patch_size") and cfg.get("merge_size")):
        return None
    return {"min_pixels": int(low), "max_pixels": int(high),
            "image_factor": int(cfg["patch_size"]) * int(cfg["merge_size"])}


def source_settings(src: PolicySource) -> dict[str, Any]:
    """The run settings of any policy source: an export's recorded ones, a run's or checkpoint's from its
    ``config.yaml`` (the image geometry from the base it names), ``{}`` for a plain model directory."""
    if src.model_dir is not None:
        return run_settings(src.model_dir)
    run_config = read_run_config(src.run_dir)
    settings = settings_from_run_config(run_config)
    model_cfg = run_config.get("model") or {}
    if model_cfg.get("path"):
        geometry = image_geometry(Path(model_cfg["path"]), model_cfg.get("min_pixels"), model_cfg.get("max_pixels"))
        if geometry:
            settings["image_geometry"] = geometry
    return settings


def policy_model_dir(src: PolicySource) -> tuple[Path, Callable[[], None]]:
    """A loadable directory for ``src`` and what to call when done with it: the directory itself, or a checkpoint
    exported into a temporary directory (removed by the callback)."""
    if src.model_dir is not None:
        return src.model_dir, lambda: None
    tmp = Path(tempfile.mkdtemp(prefix="deepeyes-export-"))
    try:
        out = export_policy(src.checkpoint, tmp / "policy").out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, lambda: shutil.rmtree(tmp, ignore_errors=True)


def _info(src: PolicySource, base: Path, iteration: int | None, dropped: Sequence[str],
          run_config: Mapping[str, Any]) -> dict[str, Any]:
    """``deepeyes_export.json``: provenance, and the settings an evaluation of this policy should default to."""
    return {"format": 1, "checkpoint": str(src.checkpoint), "run_dir": str(src.run_dir) if src.run_dir else None,
            "run_name": run_config.get("name"), "iteration": iteration, "iterations": run_config.get("iterations"),
            "base_model": str(base), "advantage": (run_config.get("algorithm") or {}).get("advantage"),
            "value_head_dropped": list(dropped), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "settings": settings_from_run_config(run_config)}


# ------------------------------------------------------------------------------------------ the model card
CARD_COLUMNS = (("acc", "accuracy"), ("tool_call_rate", "tool-call rate"), ("acc_with_tool", "accuracy with the tool"),
                ("acc_without_tool", "accuracy without"), ("iou", "zoom IoU"),
                ("box_centre_hit", "box centre in the target"))


def heldout_table(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown rows of every held-out evaluation of the run (and the end-of-run controls), as logged."""
    rows = [(str(r["iteration"]), r) for r in records if r.get("kind") == "eval"]
    rows += [(f"{r['iteration']}, control {r.get('control')}", r) for r in records if r.get("kind") == "control"]
    if not rows:
        return []
    lines = ["| iteration | " + " | ".join(h for _, h in CARD_COLUMNS) + " |", "|---|" + "---|" * len(CARD_COLUMNS)]
    for label, record in rows:
        lines.append(f"| {label} | " + " | ".join(metric_cell(record.get(k)) for k, _ in CARD_COLUMNS) + " |")
    return lines


def model_card(info: Mapping[str, Any], records: Sequence[Mapping[str, Any]], n_parameters: int) -> str:
    """``README.md`` of an export: what it is, where it came from, how it scored, how to load, evaluate, serve."""
    name = info.get("run_name") or Path(str(info.get("run_dir") or info["checkpoint"])).name
    s = info.get("settings") or {}
    env = s.get("env_id") or "the env each task names"
    table = heldout_table(records)
    data = s.get("data") or {}
    trained = f" (advantage `{info['advantage']}`)" if info.get("advantage") else ""
    of = f" of {info['iterations']}" if info.get("iterations") else ""
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text", "tags: [deepeyes, grpo, rllib]",
        "---", "", f"# {name}: a policy trained with deepeyes", "",
        f"A Qwen-VL policy ({n_parameters:,} parameters) trained by `train.py`{trained} to think with images (call "
        f"`image_zoom_in_tool` mid-reasoning), exported from checkpoint `{info['checkpoint']}` (iteration "
        f"{info.get('iteration')}{of}) on {info['exported_at']}. Base model: `{info['base_model']}`.", "",
    ]
    if info.get("value_head_dropped"):
        lines += ["The run trained a PPO value head (the critic: a linear layer on the last hidden state); it is not "
                  "part of the policy and is **left out** of this export "
                  f"({len(info['value_head_dropped'])} tensors). The checkpoint still holds it.", ""]
    else:
        lines += ["The run trained no value head: these are all of the checkpoint's weights.", ""]
    lines += ["## Held-out evaluation", ""]
    if table:
        lines += [f"Greedy, on the run's held-out tasks ({data.get('n_eval', '?')} of `{data.get('kind') or '?'}` "
                  f"{json.dumps(data.get('options') or {})}, seed {data.get('eval_seed', '?')}), in `{env}` "
                  f"{json.dumps(s.get('env_kwargs') or {})}:", "", *table, ""]
    else:
        lines += ["The run logged no held-out evaluation.", ""]
    lines += [
        "## Use", "", "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
        "model = AutoModelForImageTextToText.from_pretrained(DIR)",
        "processor = AutoProcessor.from_pretrained(DIR)  # its chat template renders the env's messages exactly",
        "```", "",
        "Evaluate it (the settings above are the defaults; a synthetic benchmark of the same family scores it on "
        "other placements and seeds), or serve it with vLLM's OpenAI-compatible server and evaluate that:", "",
        "```bash", "python -m deepeyes_agent.offline.evaluate --policy DIR --benchmark heldout --out runs/eval",
        "python -m vllm.entrypoints.openai.api_server --model DIR --port 8000  # --dtype float32 on a CPU",
        "python -m deepeyes_agent.offline.evaluate --endpoint http://127.0.0.1:8000/v1 --run-settings DIR "
        "--benchmark heldout --out runs/eval-vllm", "```", "",
        f"`{EXPORT_INFO}` records the checkpoint and the settings the run trained and evaluated with (env `{env}`, "
        f"at most {s['max_tokens']} tokens per reply); `offline.evaluate` defaults to them." if s.get("max_tokens")
        else f"`{EXPORT_INFO}` records the checkpoint it came from.", ""]
    return "\n".join(lines)
