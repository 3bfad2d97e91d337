"""Reproducible benchmark evaluation: V* Bench, HR-Bench and the synthetic mini benchmark.

What DeepEyes did, made a command (docs/deepeyes.md, "Evaluation and published numbers"): greedy decoding, up
to 11 model calls per sample, a stop at ``</tool_call>`` and ``<|im_end|>``, rule matching first and an LLM judge
only where the rules cannot decide; and what it did not: options shuffled with a fixed seed
(``benchmark_files.py``),
resumable runs, every trajectory saved, one report::

    python -m deepeyes_agent.offline.evaluate --policy /models/DeepEyes-7B --benchmark vstar:/data/vstar_bench \
        --benchmark hrbench:/data/hr_bench_4k.tsv --out runs/deepeyes-7b
    python -m deepeyes_agent.offline.evaluate --endpoint http://127.0.0.1:8000/v1 --benchmark synthetic:40 --out runs/x

Output directory: ``run.json`` (settings), per benchmark ``<name>/samples.jsonl`` (one line per sample, in
chunks, the resume log) and ``<name>/trajectories/chunk-NNNNN/`` (saved with
:mod:`deepeyes_agent.rollout.trajectory`), then ``results.json`` (every sample's result with its trajectory
reference, and the metrics), ``report.md`` and ``plots/*.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import ConfigDict

from deepeyes_agent.offline.benchmark_files import Benchmark, category_of, load_benchmark
from deepeyes_agent.offline.chunk_log import ChunkLog
from deepeyes_agent.offline.reporting import bar_png, histogram_png, md_table, pct
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.metrics import episode_metrics
from deepeyes_agent.rollout.runners import Runner, add_policy_arguments, runner_from_arguments
from deepeyes_agent.rollout.seeding import derive_seed
from deepeyes_agent.rollout.trajectory import save_trajectories
from deepeyes_agent.settings import (
    JudgeSetting,
    Section,
    add_section_arguments,
    build,
    given_arguments,
    judge_setting,
    judge_text,
    setting,
)
from deepeyes_envs.judges import Judge, JudgeRequest, Verdict, make_judge, match_rules, option_letter

# docs/deepeyes.md, "Evaluation and published numbers": accuracy (%) as published.
PUBLISHED = {
    "Qwen2.5-VL-7B": {"vstar": 71.2, "hrbench_4k": 68.8, "hrbench_8k": 65.3},
    "DeepEyes-7B": {"vstar": 90.1, "hrbench_4k": 75.1, "hrbench_8k": 72.6},
}


# ---------------------------------------------------------------------------------------------- judging
class EvalJudge(Judge):
    """Rules first (option letter, ``"X."``, exact text, containment of the correct option's text), then
    the LLM judge for what the rules leave undecided; with no LLM, undecided answers score 0.

    Containment is checked against the correct option's *text* as well as its letter, so "it is red" is
    right when "red" is the answer's option, and an answer naming two options' texts is not.
    """

    name = "eval"

    def __init__(self, llm: Optional[Judge] = None):
        self.llm = llm

    def _rules(self, request: JudgeRequest) -> Optional[Verdict]:
        match = match_rules(request, containment=True)
        if match.correct or match.certain:
            return Verdict(float(match.correct), "rule", raw=match.rule)
        letter = option_letter(request.ground_truth, request.options)
        if letter and request.options:
            text = request.options[ord(letter) - ord("A")]
            by_text = match_rules(dataclasses.replace(request, ground_truth=text), containment=True)
            if by_text.correct:
                return Verdict(1.0, "rule", raw=f"option text {by_text.rule}")
        return None

    def judge(self, request: JudgeRequest) -> Verdict:
        return self.judge_batch([request])[0]

    def judge_batch(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        verdicts = [self._rules(r) for r in requests]
        undecided = [i for i, v in enumerate(verdicts) if v is None]
        if undecided and self.llm is not None:
            for i, v in zip(undecided, self.llm.judge_batch([requests[i] for i in undecided]), strict=True):
                verdicts[i] = v
        return [v if v is not None else Verdict(0.0, "rule", raw="none") for v in verdicts]

    def __repr__(self) -> str:
        return f"EvalJudge(llm={self.llm!r})"


# ---------------------------------------------------------------------------------------------- settings
class EvalConfig(Section):
    """How samples are played. All of it goes into the resume check.

    The evaluation's own rules decide first (:class:`EvalJudge`); ``judge`` decides what they leave undecided,
    and ``'rule'`` scores those 0. An LLM judge whose retries run out falls back to the rules (its
    ``on_failure: fallback`` default), so an unreachable judge costs accuracy on hard answers, not the run.
    """

    model_config = ConfigDict(frozen=True)

    k: int = setting(1, "Samples per question (Avg@k, Pass@k).", ge=1)
    temperature: float = setting(0.0, "Sampling temperature (0: greedy).", ge=0.0)
    max_turns: int = setting(11, "Model calls per sample (DeepEyes evaluated with 11).", ge=1)
    max_tokens: int = setting(1024, "Tokens per model call.", ge=1)
    seed: int = setting(0, "Option shuffling and sampling seed.")
    shuffle: bool = setting(True, "Shuffle multiple-choice options with the seed (the released order inflates "
                                  "scores).")
    env: str = setting("visual_toolbox_v2", "Env the samples are played in.")
    env_kwargs: dict = setting({}, "More keyword arguments for the env (e.g. prompt_style, tools); max_turns "
                                   "is set by max_turns.")
    batch_size: int = setting(8, "Samples per chunk (the unit of resuming).", ge=1)
    judge: JudgeSetting = judge_setting()
    synthetic_size: tuple[int, int] = setting((1920, 1080), "Image size (width, height) of the synthetic benchmark.",
                                            names=("W", "H"))

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature)

    def make_judge(self) -> EvalJudge:
        return EvalJudge(None if self.judge == "rule" else make_judge(self.judge))


# ---------------------------------------------------------------------------------------------- running
def evaluate_benchmark(bench: Benchmark, runner: Runner, config: EvalConfig, out_dir: Path, *,
                       limit: Optional[int] = None, progress: bool = True, settings: Mapping[str, Any]
                       ) -> list[dict[str, Any]]:
    """Play (resuming) one benchmark in fixed chunks and return its sample records in task order."""
    log = ChunkLog(out_dir / bench.name / "samples.jsonl", {**settings, "benchmark": bench.name,
                                                           "source": bench.source, "samples": len(bench)})
    tasks = bench.tasks[:limit] if limit is not None else bench.tasks
    judge = config.make_judge()

    def play(chunk: int, items: range) -> list[dict[str, Any]]:
        chunk_tasks = [tasks[i] for i in items]
        trajs = runner.play(chunk_tasks, n_per_task=config.k, sampling=config.sampling(), env_id=config.env,
                            env_kwargs={**config.env_kwargs, "max_turns": config.max_turns}, judge=judge,
                            seed=derive_seed(config.seed, chunk))
        rel = f"{bench.name}/trajectories/chunk-{chunk:05d}"
        save_trajectories(trajs, out_dir / rel)
        groups = trajs.groups()
        return [_sample_record(bench, task, groups[g], chunk, rel) for g, task in enumerate(chunk_tasks)]

    log.run_chunks(len(tasks), config.batch_size, play, progress=bench.name if progress else None)
    order = {t.task_id: i for i, t in enumerate(tasks)}
    return sorted((r for r in log.finished_records() if r["task_id"] in order), key=lambda r: order[r["task_id"]])


def _sample_record(bench: Benchmark, task: Any, trajs: Sequence[Any], chunk: int, rel: str) -> dict[str, Any]:
    runs = []
    for traj in trajs:
        calls = [c for turn in traj.turns for c in turn.tool_calls]
        runs.append({**episode_metrics(traj), "answer": str(traj.reward_parts.get("answer", "")),
                     "judge_source": traj.reward_parts.get("judge_source"), "end_reason": traj.end_reason,
                     "ious": [float(c["iou"]) for c in calls if isinstance(c.get("iou"), (int, float))],
                     "trajectory": {"dir": rel, "uid": traj.uid}})
    accs = [r["acc"] for r in runs]
    record = {"benchmark": bench.name, "task_id": task.task_id, "category": category_of(task), "chunk": chunk,
              "question": task.question, "options": list(task.options or []), "answer": task.answer,
              "answer_text": task.extra.get("answer_text"), "gt_boxes": [list(b) for b in task.gt_boxes],
              "acc": float(np.mean(accs)), "pass": float(max(accs)), "runs": runs}
    bad = next((t for t in trajs if t.end_reason == "bad_task"), None)
    if bad is not None:  # the env could not reset on this row (its image does not decode, say): not scored
        record["bad_row"] = {"error": bad.info.get("error", ""), **bad.info.get("bad_row", {})}
    return record


# ---------------------------------------------------------------------------------------------- metrics
def benchmark_metrics(records: Sequence[Mapping[str, Any]], overall: str, k: int) -> dict[str, Any]:
    """Per-category and overall accuracy (Avg@k: the mean over the k runs), Pass@k, tool-use numbers.

    Rows that could not be played (``bad_row``: the env could not reset on them) are counted and listed, not
    scored: a broken file is the benchmark's fault, not the policy's, and a silent 0 would hide it.
    """
    bad_rows = [{"task_id": r["task_id"], **r["bad_row"]} for r in records if r.get("bad_row")]
    records = [r for r in records if not r.get("bad_row")]
    by_cat: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_cat[r["category"]].append(r)
    categories = {c: {"n": len(rs), "acc": float(np.mean([r["acc"] for r in rs]))} for c, rs in sorted(by_cat.items())}
    runs = [run for r in records for run in r["runs"]]
    ious = [v for run in runs for v in run["ious"]]
    micro = float(np.mean([r["acc"] for r in records])) if records else None
    cat_mean = float(np.mean([v["acc"] for v in categories.values()])) if categories else None
    return {
        "n": len(records), "k": k, "overall_rule": overall,
        "overall": micro if overall == "micro" else cat_mean, "micro": micro,
        "categories": categories,
        "pass_at_k": float(np.mean([r["pass"] for r in records])) if records else None,
        "tool_calls_per_sample": float(np.mean([run["tool_calls"] for run in runs])) if runs else None,
        "invalid_calls_per_sample": float(np.mean([run["invalid_calls"] for run in runs])) if runs else None,
        "tool_call_rate": float(np.mean([run["tool_calls"] > 0 for run in runs])) if runs else None,
        "turns_per_sample": float(np.mean([run["turns"] for run in runs])) if runs else None,
        "mean_iou": float(np.mean(ious)) if ious else None, "n_iou_boxes": len(ious),
        "end_reasons": dict(sorted(_count(run["end_reason"] for run in runs).items())),
        "skipped_rows": len(bad_rows), "bad_rows": bad_rows,
    }


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for item in items:
        out[str(item)] += 1
    return dict(out)


# ---------------------------------------------------------------------------------------------- report
def evaluation_report(results: Mapping[str, Any], out_dir: Path) -> str:
    """The Markdown report, with its plots written to ``out_dir/plots``."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    s = results["settings"]
    policy = s["policy"]
    k = s["k"]
    source = policy.get("source")
    benches = "; ".join(f"`{name}` ({bench['source']})" for name, bench in results["benchmarks"].items())
    lines = ["# Evaluation report", "",
             f"- policy: `{policy.get('path') or policy.get('model')}` ({policy.get('kind')}"
             f"{', ' + source if source else ''}"
             f"{', checkpoint ' + policy['checkpoint'] if policy.get('checkpoint') else ''}"
             f"{', engine ' + policy['engine'] if 'engine' in policy else ''}"
             f"{', ' + policy['base_url'] if 'base_url' in policy else ''})",
             f"- benchmarks: {benches}",
             f"- env `{s['env']}` {json.dumps(s.get('env_kwargs') or {})}, up to {s['max_turns']} model calls per "
             f"sample, temperature {s['temperature']}, max {s['max_tokens']} tokens per call, k = {k}, seed "
             f"{s['seed']}" + (f"; defaults from the run of `{s['run_settings']}`" if s.get("run_settings") else ""),
             f"- options shuffled: {'yes, seed ' + str(s['seed']) if s['shuffle'] else 'no (original order)'}; "
             f"judge: rules first, then {_judge_line(s['judge'])}",
             ""]
    acc_label = f"Avg@{k}" if k > 1 else "accuracy"
    summary = []
    for name, bench in results["benchmarks"].items():
        m = bench["metrics"]
        summary.append([name, m["n"], pct(m["overall"]), *([pct(m["pass_at_k"])] if k > 1 else []),
                        m["tool_calls_per_sample"], m["invalid_calls_per_sample"], m["tool_call_rate"], m["mean_iou"]])
    head = ["benchmark", "samples", f"overall {acc_label} (%)", *([f"Pass@{k} (%)"] if k > 1 else []),
            "tool calls / sample", "invalid calls / sample", "samples with a tool call", "mean zoom IoU"]
    lines += ["## Summary", "", md_table(head, summary), "",
              "Overall: micro average over samples for V* and the synthetic set, mean of the single and cross "
              "categories for HR-Bench (as published).", ""]
    for name, bench in results["benchmarks"].items():
        m = bench["metrics"]
        rows = [[c, v["n"], pct(v["acc"])] for c, v in m["categories"].items()]
        rows.append(["**overall**", m["n"], pct(m["overall"])])
        ends = ", ".join(f"{k_}: {v}" for k_, v in m["end_reasons"].items())
        lines += [f"## {name}", "", f"Source: `{bench['source']}`", "",
                  md_table(["category", "samples", f"{acc_label} (%)"], rows), "",
                  f"Episode endings: {ends}. Zoom boxes with a ground-truth IoU: {m['n_iou_boxes']}.", ""]
        if m.get("bad_rows"):
            lines += [f"{len(m['bad_rows'])} row(s) could not be played and are not scored:", "",
                      *[f"- `{b['task_id']}`: {b.get('error', '')}" for b in m["bad_rows"]], ""]
    bars = {name: {c: 100 * v["acc"] for c, v in b["metrics"]["categories"].items()}
            for name, b in results["benchmarks"].items()}
    if any(bars.values()):
        bar_png(plots / "accuracy.png", bars, title=f"{acc_label} per category", ylabel="%")
        calls = {name: [run["tool_calls"] for r in b["samples"] for run in r["runs"]]
                 for name, b in results["benchmarks"].items()}
        top = int(max([max(v) for v in calls.values() if v] + [1]))
        histogram_png(plots / "tool_calls.png", calls, bins=[i - 0.5 for i in range(top + 2)],
                      title="Tool calls per episode", xlabel="tool calls", ylabel="episodes")
        lines += ["## Plots", "", "![accuracy per category](plots/accuracy.png)", "",
                  "![tool calls per episode](plots/tool_calls.png)", ""]
    pub = [[model, *[f"{v:.1f}" for v in nums.values()]] for model, nums in PUBLISHED.items()]
    ours = [results["benchmarks"].get(b, {}).get("metrics", {}).get("overall") for b in ("vstar", "hrbench_4k",
                                                                                         "hrbench_8k")]
    if any(v is not None for v in ours):
        pub.append(["**this run**", *[pct(v) for v in ours]])
    lines += ["## Published numbers (docs/deepeyes.md)", "",
              md_table(["model", "V* (%)", "HR-Bench 4K (%)", "HR-Bench 8K (%)"], pub), "",
              "DeepEyes reported that an unshuffled option order (the correct option always first) inflated "
              "scores by about 5 points; this run's order is as stated above.", ""]
    return "\n".join(lines)


def _judge_line(spec: Any) -> str:
    return "nothing (rule-only)" if spec == "rule" else f"the judge `{judge_text(spec)}`"


# ---------------------------------------------------------------------------------------------- the command
def run_evaluation(benchmarks: Sequence[Benchmark], runner: Runner, out_dir: str | os.PathLike, *,
                   config: EvalConfig | None = None, limit: Optional[int] = None, overwrite: bool = False,
                   progress: bool = True, run_settings_from: Optional[str] = None) -> dict[str, Any]:
    """Evaluate (resuming what ``out_dir`` holds), write results.json, report.md and plots; return results.
    ``run_settings_from`` names the run whose settings the config defaulted to (the report says so)."""
    config = config or EvalConfig()
    names = [b.name for b in benchmarks]
    if len(set(names)) != len(names):
        raise ValueError(f"two benchmarks share a name ({names}): give them different settings or evaluate them "
                         "into different --out directories")
    out = Path(out_dir)
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"policy": runner.describe(), **config.model_dump(mode="json")}
    if run_settings_from:
        settings["run_settings"] = run_settings_from
    (out / "run.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    start = time.perf_counter()
    results: dict[str, Any] = {"settings": settings, "benchmarks": {}}
    for bench in benchmarks:
        records = evaluate_benchmark(bench, runner, config, out, limit=limit, progress=progress, settings=settings)
        metrics = benchmark_metrics(records, bench.overall, config.k)
        results["benchmarks"][bench.name] = {"source": bench.source, "metrics": metrics, "samples": records}
    results["elapsed_s"] = time.perf_counter() - start
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "results.json")
    report = evaluation_report(results, out)
    (out / "report.md").write_text(report + "\n", encoding="utf-8")
    results["report"] = report
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deepeyes_agent.offline.evaluate",
                                     description=__doc__.split("\n")[0])
    add_policy_arguments(parser)
    parser.add_argument("--run-settings", metavar="DIR",
                        help="take the env, turn and token defaults (and the heldout benchmark) from this export, run "
                             "or checkpoint; automatic for a --policy from a run, needed with --endpoint")
    b = parser.add_argument_group("benchmarks and output")
    b.add_argument("--benchmark", action="append", required=True,
                   help="vstar:DIR, hrbench:FILE (.tsv or .parquet), synthetic[:N][,key=value...] (e.g. "
                        "synthetic:64,kind=toy_zoom,frame_layout=random,seed=7) or heldout[:N] (the run's held-out "
                        "tasks); repeat for several")
    b.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    b.add_argument("--limit", type=int, help="evaluate only the first N samples of each benchmark")
    b.add_argument("--overwrite", action="store_true", help="delete what --out holds and start again")
    b.add_argument("--no-progress", action="store_true")
    add_section_arguments(parser.add_argument_group("evaluation (env, env kwargs, turns and tokens left unset "
                                                    "default to the run's, for a policy from a run)"), EvalConfig)
    return parser


def run_defaults(run: Mapping[str, Any]) -> dict[str, Any]:
    """EvalConfig values from a training run's settings (``policy.export.run_settings``): a policy is scored in
    the env, with the turns and reply length, it was trained and evaluated with, and the env reads boxes in the
    frame the policy's image processor shows it (a player behind an endpoint has no processor to ask)."""
    kwargs = {**(run.get("image_geometry") or {}), **(run.get("env_kwargs") or {})}
    out: dict[str, Any] = {}
    if "max_turns" in kwargs:
        out["max_turns"] = int(kwargs.pop("max_turns"))
    if run.get("env_id"):
        out["env"] = run["env_id"]
    if kwargs:
        out["env_kwargs"] = kwargs
    if run.get("max_tokens"):
        out["max_tokens"] = int(run["max_tokens"])
    return out


def _policy_run_settings(args: argparse.Namespace) -> tuple[dict[str, Any], Optional[str]]:
    """The run settings the evaluation defaults to, and where they came from (None: no run)."""
    from deepeyes_agent.policy.export import resolve_policy_source, source_settings

    where = args.run_settings or args.policy
    if where is None:
        return {}, None
    source = resolve_policy_source(where)
    settings = source_settings(source)
    if args.run_settings and not settings:
        raise ValueError(f"--run-settings {args.run_settings}: no run settings there (an export by train.py or "
                         "`python -m deepeyes_agent.policy export`, a run directory or one of its checkpoints)")
    return settings, str(source.run_dir or source.path) if settings else None


def config_from_arguments(args: argparse.Namespace, defaults: Mapping[str, Any]) -> EvalConfig:
    """The command line's settings over the run's; given env kwargs go on top of the run's, not instead."""
    given = given_arguments(EvalConfig, args)
    if isinstance(given.get("env_kwargs"), dict):
        given["env_kwargs"] = {**defaults.get("env_kwargs", {}), **given["env_kwargs"]}
    return build(EvalConfig, {**defaults, **given})


def main(argv: Optional[list[str]] = None) -> int:
    from deepeyes_agent.policy.export import PolicySourceError

    args = build_parser().parse_args(argv)
    try:
        run, run_from = _policy_run_settings(args)
        config = config_from_arguments(args, run_defaults(run))
        benchmarks = [load_benchmark(spec, seed=config.seed, shuffle=config.shuffle, env_name=config.env,
                                     synthetic_size=config.synthetic_size, run_data=run.get("data"))
                      for spec in args.benchmark]
    except (ValueError, PolicySourceError, FileNotFoundError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    runner = runner_from_arguments(args, run)
    try:
        results = run_evaluation(benchmarks, runner, args.out, config=config, limit=args.limit,
                                 overwrite=args.overwrite, progress=not args.no_progress, run_settings_from=run_from)
    finally:
        runner.close()
    for name, bench in results["benchmarks"].items():
        m = bench["metrics"]
        skipped = f", {m['skipped_rows']} bad row(s) skipped" if m["skipped_rows"] else ""
        print(f"{name}: overall {pct(m['overall'])}% over {m['n']} samples, "
              f"{m['tool_calls_per_sample']:.2f} tool calls per sample{skipped}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
