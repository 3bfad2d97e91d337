"""The driver loop of ``train.py``: build the run, resume it, warm-start it, train it, report it.

Everything about one iteration lives in ``DeepEyesAlgorithm.training_step``; this module does what happens
around iterations: the run directory (config.yaml, the tiny model, checkpoints, trajectories, metrics,
TensorBoard, report), Ray start-up, resume from the newest checkpoint, the SFT warm start, evaluation,
checkpointing and the progress display.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from deepeyes_agent.policy.export import CHECKPOINT_PREFIX, FINAL_DIR, latest_checkpoint
from deepeyes_agent.training.config import TrainConfig
from deepeyes_agent.training.run_log import RunLog, format_line


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(algo: Any, run_dir: Path, iteration: int, keep: int) -> Path:
    """Save through RLlib's ``save_to_path`` into a temp dir, then rename: a kill never leaves a torn one."""
    folder = run_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{iteration}"
    tmp = folder / f"tmp-{CHECKPOINT_PREFIX}{iteration}"
    shutil.rmtree(tmp, ignore_errors=True)
    algo.save_to_path(str(tmp))
    (tmp / "DONE").write_text(str(iteration))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    complete = sorted((p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)),
                      key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------ run setup
def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run directory, build the tiny model if asked, and write the resolved config."""
    run_dir = cfg.run_dir.resolve()  # RLlib's checkpointing reads paths as URIs: relative ones fail
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.build_tiny and cfg.model.tiny_base == "pretrained":
        from deepeyes_agent.policy.pretrain import pretrained_tiny_base

        cfg.model.path = str(pretrained_tiny_base())
    elif cfg.model.build_tiny:
        model_dir = run_dir / "tiny_model"
        if not (model_dir / "config.json").exists():
            from deepeyes_agent.policy.tiny import build_tiny_qwen2_5_vl

            build_tiny_qwen2_5_vl(model_dir, seed=cfg.seed)
        cfg.model.path = str(model_dir.resolve())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def _token_auth_default_notice(record: logging.LogRecord) -> bool:
    """Ray announces, at every local start, that token authentication is on by default. The local instance keeps
    that default (turning it off is what the notice offers); only the announcement is dropped."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster.")


def start_ray(cfg: TrainConfig, address: str | None) -> bool:
    """Connect to a cluster (``address``) or start a small local Ray; returns True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
        return False
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_token_auth_default_notice)
    ray.init(num_cpus=cfg.resources.ray_num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False,
             object_store_memory=cfg.resources.object_store_mb * 1024 * 1024, logging_level=logging.WARNING)
    return True


def save_samples(algo: Any, run_dir: Path, iteration: int) -> Path | None:
    """Write the iteration's sample trajectories in the trajectory format (``trajectories/iter_N``)."""
    if not algo.last_samples:
        return None
    from deepeyes_agent.rollout.trajectory import save_trajectories

    return save_trajectories(algo.last_samples, run_dir / "trajectories" / f"iter_{iteration}")


def write_skipped_rows(bad_rows: dict[str, dict[str, Any]], run_dir: Path) -> Path:
    """``skipped_rows.jsonl``: every row skipped so far and why, one JSON object a line (rewritten whole, so a
    resumed run lists each row once)."""
    import json

    path = run_dir / "skipped_rows.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in bad_rows.values()))
    return path


# ------------------------------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, address: str | None = None, echo: Any = print) -> dict[str, Any]:
    """Run (or resume) the training described by ``cfg`` (and, with ``logging.no_tool_control``, the same run with
    the tools disabled, after it); returns the final held-out metrics and paths."""
    import ray

    started_ray = start_ray(cfg, address)
    try:
        result = _run(cfg, echo)
        control = None
        if cfg.logging.no_tool_control:
            variant = no_tool_variant(cfg)
            echo(f"control: the same run with the tools disabled, into {variant.run_dir}")
            control = _run(variant, lambda line: echo(f"[no tool] {line}"))
            result["control"] = control
        if cfg.logging.report:
            from deepeyes_agent.training.run_report import headline_table, write_report

            control_dir = control["run_dir"] if control else None
            result["report"] = str(write_report(result["run_dir"], cfg.to_dict(), control_dir=control_dir))
            echo(f"report: {result['report']}")
            echo("held-out evaluation (greedy):\n" + headline_table(result["run_dir"], control_dir))
        return result
    finally:
        if started_ray:
            ray.shutdown()


def no_tool_variant(cfg: TrainConfig) -> TrainConfig:
    """The control of a tool run: the same settings with no tool to call (an env call is answered with an error),
    demonstrations that answer directly, and a run directory of its own beside the run's."""
    data = cfg.to_dict()
    data["name"] = f"{cfg.name}_no_tool"
    data["env"]["kwargs"] = {**cfg.env.kwargs, "tools": []}
    data["sft"]["include_zoom"] = False
    data["logging"].update(run_dir=str(cfg.run_dir.resolve() / "no_tool"), no_tool_control=False, report=False,
                           zoom_controls=False)
    return TrainConfig.model_validate(data)


def _run(cfg: TrainConfig, echo: Any) -> dict[str, Any]:
    """One run: build, resume, warm-start, train with held-out evaluations, save what it learned."""
    import torch
    import transformers

    from deepeyes_agent.training.rllib.algorithm import DeepEyesConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.utils.logging.disable_progress_bar()  # a bar per model load (learner, runner, reference)
    torch.set_num_threads(cfg.resources.torch_threads)
    torch.manual_seed(cfg.seed)
    run_dir = prepare_run_dir(cfg)
    algo = log = None
    try:
        t0 = time.perf_counter()
        algo = DeepEyesConfig.from_run_config(cfg).build_algo()
        checkpoint = latest_checkpoint(run_dir) if cfg.resume else None
        if checkpoint is not None:
            algo.restore_from_path(str(checkpoint))
            echo(f"resumed from {checkpoint} (iteration {algo.iteration})")
        start = algo.iteration
        log = RunLog(run_dir, cfg.logging.tensorboard, resume_iteration=start if checkpoint is not None else None)
        echo(f"run dir {run_dir} | built in {time.perf_counter() - t0:.1f} s | iterations {start}..{cfg.iterations}")
        _warm_start(algo, cfg, log, echo)
        if start == 0 and cfg.logging.eval_every:
            evaluation = _evaluate(algo, cfg, log, run_dir, 0)
            echo(format_line(0, cfg.iterations, {f"eval/{k}": v for k, v in evaluation.items()}))
            save_checkpoint(algo, run_dir, 0, cfg.logging.keep_checkpoints)
        _iterations(algo, cfg, log, run_dir, start, echo)
        if cfg.logging.zoom_controls:
            _zoom_controls(algo, cfg, log, echo)
        if algo.bad_rows:  # held-out rows too
            write_skipped_rows(algo.bad_rows, run_dir)
        final = export_final(run_dir, echo)
        from deepeyes_agent.run_records import read_metrics

        evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
        return {"run_dir": str(run_dir), "first_eval": evals[0] if evals else {},
                "last_eval": evals[-1] if evals else {}, "final": str(final)}
    finally:
        if log is not None:
            log.close()
        if algo is not None:
            algo.stop()


def export_final(run_dir: Path, echo: Any) -> Path:
    """The final policy as a Hugging Face model directory, ``<run_dir>/final`` (``policy.export``): what leaves
    the run, for transformers, vLLM and ``offline.evaluate``; rewritten by a resumed run."""
    from deepeyes_agent.policy.export import export_policy

    result = export_policy(latest_checkpoint(run_dir), run_dir / FINAL_DIR)
    echo(f"final policy: {result.out} ({result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s"
         f"{', value head left out' if result.dropped else ''})")
    return result.out


def _warm_start(algo: Any, cfg: TrainConfig, log: RunLog, echo: Any) -> None:
    """The SFT warm start on scripted demonstrations, once per run (a resumed run has it in its checkpoint)."""
    if algo.sft_done:
        return
    from tqdm import tqdm

    with tqdm(total=cfg.sft.steps, desc="SFT warm start", unit="step", disable=not cfg.logging.progress,
              dynamic_ncols=True) as sft_bar:
        def sft_progress(record: dict[str, float]) -> None:
            sft_bar.update(1)
            sft_bar.set_postfix(nll=f"{record['sft_nll']:.3f}")

        history = algo.run_sft(progress=sft_progress)
    for rec in history:
        log.log(0, rec, kind="sft")
    if history:
        echo(f"SFT warm start: {len(history)} steps, NLL {history[0]['sft_nll']:.3f} -> {history[-1]['sft_nll']:.3f}")


def _evaluate(algo: Any, cfg: TrainConfig, log: RunLog, run_dir: Path, iteration: int) -> dict[str, float]:
    """Held-out evaluation, logged; its sample trajectories saved (``trajectories/eval_N``) for the report."""
    evaluation = algo.evaluate_heldout(keep=cfg.logging.n_saved_trajectories)
    log.log(iteration, evaluation, kind="eval")
    if algo.last_eval_samples:
        from deepeyes_agent.rollout.trajectory import save_trajectories

        save_trajectories(algo.last_eval_samples, run_dir / "trajectories" / f"eval_{iteration}")
    return evaluation


def _zoom_controls(algo: Any, cfg: TrainConfig, log: RunLog, echo: Any) -> None:
    """The final policy on the held-out tasks under each control (``rollout.controls``), logged as ``control``
    records: with its most common zoom box everywhere, with the centre box (of that size) everywhere, and after
    an oracle first zoom on the ground truth."""
    from deepeyes_agent.rollout.controls import Control, centre_box

    if algo.last_eval_top_box is None:  # a resumed finished run: find the policy's boxes again
        algo.evaluate_heldout()
    common = algo.last_eval_top_box
    controls = {"oracle_zoom": Control("oracle_zoom", margin=cfg.sft.zoom_margin)}
    if common is not None:
        side = ((common[2] - common[0]) + (common[3] - common[1])) / 2
        seen = _seen_size_of_first_eval_image(cfg)
        controls = {"fixed_box_common": Control("fixed_box", tuple(common)),
                    "fixed_box_centre": Control("fixed_box", centre_box(seen, side)), **controls}
    for name, control in controls.items():
        metrics = algo.evaluate_heldout(control=control)
        log.log(cfg.iterations, {"control": name, "box": list(control.box) if control.box else None, **metrics},
                kind="control")
        where = f" {list(control.box)}" if control.box else ""
        echo(f"control {name}{where}: held-out accuracy {metrics.get('acc', float('nan')):.3f}, "
             f"tool-call rate {metrics.get('tool_call_rate', float('nan')):.3f}")


def _seen_size_of_first_eval_image(cfg: TrainConfig) -> tuple[int, int]:
    from deepeyes_agent.policy.chat import VisionTokenizer
    from deepeyes_agent.policy.loading import load_processor
    from deepeyes_agent.training.tasks import make_task_source
    from deepeyes_envs.images import seen_size

    vision = VisionTokenizer(load_processor(cfg.model.path, min_pixels=cfg.model.min_pixels,
                                            max_pixels=cfg.model.max_pixels))
    height, width = make_task_source(cfg.data, "eval")[0].load_images()[0].shape[:2]
    return seen_size(width, height, vision.min_pixels, vision.max_pixels, vision.patch_size * vision.merge_size)


def _iterations(algo: Any, cfg: TrainConfig, log: RunLog, run_dir: Path, start: int, echo: Any) -> None:
    from tqdm import tqdm

    from deepeyes_agent.training.rllib.algorithm import iteration_record

    bar = tqdm(total=cfg.iterations, initial=start, desc="iterations", unit="it", disable=not cfg.logging.progress,
               dynamic_ncols=True)
    write = bar.write if cfg.logging.progress else echo
    for iteration in range(start + 1, cfg.iterations + 1):
        metrics = iteration_record(algo.train())
        log.log(iteration, metrics, kind="train")
        if algo.last_samples:
            save_samples(algo, run_dir, iteration)
        if metrics.get("data/skipped_rows"):
            write_skipped_rows(algo.bad_rows, run_dir)
            write(f"skipped {metrics['data/skipped_rows']:.0f} bad row(s) this iteration, {len(algo.bad_rows)} in all: "
                  f"{run_dir / 'skipped_rows.jsonl'}")
        shown = dict(metrics)
        last = iteration == cfg.iterations
        if cfg.logging.eval_every and (iteration % cfg.logging.eval_every == 0 or last):
            evaluation = _evaluate(algo, cfg, log, run_dir, iteration)
            shown.update({f"eval/{k}": v for k, v in evaluation.items()})
        bar.update(1)
        bar.set_postfix(reward=f"{metrics.get('reward', 0):+.2f}", acc=f"{metrics.get('acc', 0):.2f}")
        write(format_line(iteration, cfg.iterations, shown))
        if metrics.get("health/tool_collapse"):
            write(f"WARNING: tool-call collapse: the tool-call rate {metrics['tool_call_rate']:.2f} has stayed below "
                  f"{cfg.logging.collapse_share:.0%} of its best ({metrics['health/tool_call_rate_best']:.2f}) for "
                  f"{metrics['health/tool_call_low_streak']:.0f} iterations")
        if iteration % cfg.logging.checkpoint_every == 0 or last:
            save_checkpoint(algo, run_dir, iteration, cfg.logging.keep_checkpoints)
    bar.close()
