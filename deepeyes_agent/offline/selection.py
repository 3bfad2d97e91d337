"""Tool-use-oriented data selection, reproducible and resumable (docs/deepeyes.md, "Data").

DeepEyes kept training samples on which tools can make the difference: the base model is neither always
nor never right with tools, and one-turn answers fail; images under 28 px were skipped. It did this
offline and without a record. Here each sample is played ``k`` times with tools (the row's own env) and
``k`` times without (the plain one-turn env), its two pass rates are logged, and rules applied to those
rates decide what is kept::

    python -m deepeyes_agent.offline.selection --policy /models/Qwen2.5-VL-7B --data train.parquet \
        --out train.selected.parquet --k 8 --band 0 0.5 --plain-max 0

Measuring and filtering are separate on purpose: pass rates go to ``<work dir>/progress.jsonl``, keyed by
row, a chunk of ``--batch-size`` rows at a time, so a killed run picks up at the first unfinished chunk,
and a rerun with other rules re-filters without playing a single episode. The same seed gives the same
output: chunk boundaries are fixed by row number and each chunk's seeds by (seed, chunk), so a resumed run
plays exactly the episodes an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ConfigDict, field_validator

from deepeyes_agent.offline.chunk_log import ChunkLog
from deepeyes_agent.offline.reporting import histogram_png, md_table
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.runners import Runner, add_policy_arguments, runner_from_arguments
from deepeyes_agent.rollout.seeding import derive_seed
from deepeyes_agent.settings import (
    ConfigError,
    JudgeSetting,
    Section,
    add_section_arguments,
    judge_setting,
    judge_text,
    section_from_arguments,
    setting,
)
from deepeyes_envs.data.parquet import load_deepeyes_parquet
from deepeyes_envs.data.tasks import Task, TaskError, TaskSource
from deepeyes_envs.images import ImageError, LazyImage, to_rgb_array

MIN_IMAGE_SIDE = 28  # Qwen-VL's patch merge factor: a smaller side cannot even form one visual token


# ---------------------------------------------------------------------------------------------- rules
class SelectionRules(Section):
    """Which measured samples to keep. A disabled rule is ``None`` (or ``False``).

    * ``band = (low, high)``: useful difficulty, ``low < pass_tools < high`` (DeepEyes: neither never
      nor mostly right; default ``(0, 0.5)``).
    * ``plain_max``: one-turn answers fail, ``pass_plain <= plain_max`` (default 0: every one wrong).
    * ``tools_help``: ``pass_tools > pass_plain``.
    * ``combine``: ``"all"`` keeps samples passing every enabled rule, ``"any"`` those passing one.
    """

    model_config = ConfigDict(frozen=True)

    band: Optional[tuple[float, float]] = setting((0.0, 0.5), "Keep low < pass rate with tools < high.",
                                                names=("LOW", "HIGH"))
    plain_max: Optional[float] = setting(0.0, "Keep pass rate without tools <= this.")
    tools_help: bool = setting(False, "Also require pass rate with tools > without.")
    combine: Literal["all", "any"] = setting("all", "Keep rows passing every enabled rule, or any one.")

    @field_validator("band")
    @classmethod
    def _ordered(cls, band: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if band is not None and not band[0] < band[1]:
            raise ValueError(f"band must be (low, high) with low < high, got {band}")
        return band

    def names(self) -> dict[str, str]:
        """Enabled rules: name -> human description (report rows)."""
        out = {}
        if self.band is not None:
            out["band"] = f"difficulty band: {self.band[0]:g} < pass rate with tools < {self.band[1]:g}"
        if self.plain_max is not None:
            out["plain_fails"] = f"one-turn answers fail: pass rate without tools <= {self.plain_max:g}"
        if self.tools_help:
            out["tools_help"] = "tools help: pass rate with tools > without"
        return out

    def checks(self, record: Mapping[str, Any]) -> dict[str, bool]:
        """Each enabled rule's outcome for one measured record."""
        p_tools, p_plain = record["pass_tools"], record["pass_plain"]
        out = {}
        if self.band is not None:
            out["band"] = self.band[0] < p_tools < self.band[1]
        if self.plain_max is not None:
            out["plain_fails"] = p_plain <= self.plain_max + 1e-12
        if self.tools_help:
            out["tools_help"] = p_tools > p_plain
        return out

    def keep(self, record: Mapping[str, Any]) -> bool:
        if record.get("status") != "measured":
            return False
        results = list(self.checks(record).values())
        if not results:
            return True
        return all(results) if self.combine == "all" else any(results)


# ---------------------------------------------------------------------------------------------- measuring
class SelectionConfig(Section):
    """How samples are measured. Every field goes into the resume check (rules do not): rows with an image
    side under ``min_image_side`` px are recorded as skipped before any rollout, whatever the rules."""

    model_config = ConfigDict(frozen=True)

    k: int = setting(4, "Rollouts per sample, with tools and without each.", ge=1)
    seed: int = setting(0, "Sampling seed.")
    batch_size: int = setting(8, "Rows per chunk (the unit of resuming).", ge=1)
    temperature: float = setting(1.0, "Sampling temperature.", ge=0.0)
    max_tokens: int = setting(1024, "Tokens per generated turn.", ge=1)
    max_turns: Optional[int] = setting(None, "Override of the env's max_turns for rollouts with tools.", ge=1)
    tool_env: str = setting("visual_toolbox_v2", "Env for rows whose env_name is empty.")
    judge: JudgeSetting = judge_setting()
    min_image_side: int = setting(MIN_IMAGE_SIDE, "Skip rows with an image side below this (px).", ge=1)

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature)


def min_image_side(task: Task) -> int:
    """The smallest side over the task's images, from file headers where possible (no full decode)."""
    sides = []
    for i, image in enumerate(task.images):
        if isinstance(image, LazyImage):
            w, h = image.size
        else:
            h, w = to_rgb_array(image, name=f"task {task.task_id!r} image {i}").shape[:2]
        sides.append(min(w, h))
    return min(sides) if sides else 0


def with_tools(task: Task, tool_env: str) -> Task:
    """The task as played with tools: its own env; a plain row goes to ``tool_env`` with that env's prompt."""
    if task.env_name:
        return task
    return dataclasses.replace(task, env_name=tool_env, prompt=None)


def without_tools(task: Task) -> Task:
    """The task as a one-turn question: an agentic row loses its tool-advertising prompt (the plain env
    builds its own); a plain row keeps its prompt (e.g. a math row's boxed-answer instruction)."""
    if task.env_name:
        return dataclasses.replace(task, env_name="", prompt=None)
    return task


def chunk_seed(seed: int, chunk: int, phase: int) -> int:
    """Seeds of one chunk's rollouts (phase 0 with tools, 1 without), independent of any other chunk."""
    return derive_seed(seed, chunk, phase)


def measure(source: TaskSource, runner: Runner, config: SelectionConfig, log: ChunkLog, *,
            limit: Optional[int] = None, progress: bool = True) -> list[dict[str, Any]]:
    """Measure every row's pass rates (continuing ``log``) and return the records, in row order.

    ``limit``: stop once that many rows are recorded (whole chunks, so a later run continues seamlessly).
    """
    def work(chunk: int, rows: range) -> list[dict[str, Any]]:
        return _measure_chunk(source, rows, chunk, runner, config)

    log.run_chunks(len(source), config.batch_size, work, limit=limit, progress="selection" if progress else None,
                   unit="row")
    return sorted(log.finished_records(), key=lambda r: r["row"])


def _measure_chunk(source: TaskSource, rows: Sequence[int], chunk: int, runner: Runner,
                   config: SelectionConfig) -> list[dict[str, Any]]:
    records: dict[int, dict[str, Any]] = {}
    playable: list[tuple[int, Task]] = []
    for row in rows:
        base = {"row": row, "chunk": chunk, "task_id": "", "data_source": "", "env_name": ""}
        try:
            task = source[row]
            base.update(task_id=task.task_id, data_source=task.data_source, env_name=task.env_name or "")
            side = min_image_side(task)
        except (TaskError, ImageError, OSError) as exc:
            records[row] = {**base, "status": "error", "error": str(exc)}
            continue
        base["min_side"] = side
        if side < config.min_image_side:
            records[row] = {**base, "status": "small_image"}
            continue
        records[row] = base
        playable.append((row, task))
    if playable:
        tasks = [t for _, t in playable]
        env_kwargs = {"max_turns": config.max_turns} if config.max_turns else None
        tools = runner.play([with_tools(t, config.tool_env) for t in tasks], n_per_task=config.k,
                            sampling=config.sampling(), env_kwargs=env_kwargs, judge=config.judge,
                            seed=chunk_seed(config.seed, chunk, 0))
        plain = runner.play([without_tools(t) for t in tasks], n_per_task=config.k, sampling=config.sampling(),
                            env_id="plain", judge=config.judge, seed=chunk_seed(config.seed, chunk, 1))
        by_tools, by_plain = tools.groups(), plain.groups()
        for group, (row, _) in enumerate(playable):
            acc_tools = [float(t.acc) for t in by_tools[group]]
            acc_plain = [float(t.acc) for t in by_plain[group]]
            records[row].update(
                status="measured", acc_tools=acc_tools, acc_plain=acc_plain,
                pass_tools=float(np.mean(acc_tools)), pass_plain=float(np.mean(acc_plain)),
                tool_calls=float(np.mean([t.n_tool_calls for t in by_tools[group]])),
            )
    return [records[r] for r in rows]


# ---------------------------------------------------------------------------------------------- outputs
def write_selected(in_path: str | os.PathLike, out_path: str | os.PathLike, rows: Iterable[int],
                   batch_size: int = 64) -> int:
    """Copy the chosen rows of a parquet file verbatim (same schema, same bytes per cell) to ``out_path``.

    Streams the input in small batches, so memory stays bounded on a large, image-heavy file; the output
    appears atomically. Returns the number of rows written.
    """
    keep = np.zeros(pq.ParquetFile(in_path).metadata.num_rows, dtype=bool)
    keep[np.fromiter(rows, dtype=np.int64)] = True
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + f".tmp-{os.getpid()}")
    pf = pq.ParquetFile(in_path)
    written, offset = 0, 0
    try:
        with pq.ParquetWriter(tmp, pf.schema_arrow, compression="zstd") as writer:
            for batch in pf.iter_batches(batch_size=batch_size):
                mask = keep[offset:offset + batch.num_rows]
                offset += batch.num_rows
                if mask.any():
                    writer.write_table(pa.Table.from_batches([batch]).filter(pa.array(mask)))
                    written += int(mask.sum())
        tmp.replace(out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return written


def _bins(k: int) -> list[float]:
    """Histogram edges centred on the possible pass rates 0, 1/k, ..., 1."""
    step = 1.0 / k
    return [-step / 2 + i * step for i in range(k + 2)]


def selection_report(records: Sequence[Mapping[str, Any]], rules: SelectionRules, config: SelectionConfig, *,
                     total_rows: int, kept: int, out_dir: str | os.PathLike, title_lines: Sequence[str] = ()) -> str:
    """The Markdown report (counts per rule and per data_source, the pass-rate histogram), with its PNG."""
    out_dir = Path(out_dir)
    k, min_side = config.k, config.min_image_side
    measured = [r for r in records if r["status"] == "measured"]
    status = Counter(r["status"] for r in records)
    names = rules.names()
    lines = ["# Data selection report", "", *title_lines,
             f"- rows recorded: {len(records)} of {total_rows}"
             + ("" if len(records) == total_rows else " (partial run: rerun the command to continue)"),
             f"- kept: **{kept}**", ""]

    lines += ["## Rules", ""]
    lines += [f"- `{name}`: {text}" for name, text in names.items()]
    lines += [f"- combined with: {rules.combine}" if len(names) > 1 else "",
              f"- images with a side under {min_side} px are skipped before any rollout", ""]

    rule_rows = [[f"image side >= {min_side} px", len(records) - status["small_image"] - status["error"],
                  status["small_image"]]]
    rule_rows += [["load error", "–", status["error"]]] if status["error"] else []
    for name in names:
        passed = sum(rules.checks(r)[name] for r in measured)
        rule_rows.append([f"`{name}`", passed, len(measured) - passed])
    rule_rows.append(["**kept**", kept, len(records) - kept])
    lines += ["## Counts per rule", "", md_table(["rule", "passed", "failed"], rule_rows), ""]

    by_source: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        by_source[r["data_source"] or "(none)"].append(r)
    headers = ["data_source", "rows", "small images", "measured", *[f"`{n}`" for n in names], "kept",
               "mean pass (tools)", "mean pass (no tools)"]
    source_rows = []
    for source, rs in sorted(by_source.items()):
        ms = [r for r in rs if r["status"] == "measured"]
        source_rows.append([
            source, len(rs), sum(r["status"] == "small_image" for r in rs), len(ms),
            *[sum(rules.checks(r)[n] for r in ms) for n in names], sum(rules.keep(r) for r in rs),
            float(np.mean([r["pass_tools"] for r in ms])) if ms else None,
            float(np.mean([r["pass_plain"] for r in ms])) if ms else None,
        ])
    lines += ["## Per data_source", "", md_table(headers, source_rows), ""]

    levels = [i / k for i in range(k + 1)]
    tools = [r["pass_tools"] for r in measured]
    plain = [r["pass_plain"] for r in measured]
    if measured:
        histogram_png(out_dir / "pass_rates.png", {"with tools": tools, "without tools": plain}, bins=_bins(k),
                      title=f"Pass rates over k={k} rollouts ({len(measured)} samples)", xlabel="pass rate")
        lines += ["## Pass rates", "", "![pass rates](pass_rates.png)", ""]
        joint = Counter((round(a * k), round(b * k)) for a, b in zip(tools, plain, strict=True))
        rows = [[f"{lv:.2f}", sum(1 for t in tools if round(t * k) == i), sum(1 for p in plain if round(p * k) == i),
                 *[joint[(i, j)] for j in range(k + 1)]] for i, lv in enumerate(levels)]
        head = ["pass rate", "with tools", "without tools", *[f"plain {lv:.2f}" for lv in levels]]
        lines += ["Samples per pass rate; the right-hand block counts samples by (pass rate with tools = row, "
                  "without tools = column).", "", md_table(head, rows), ""]
    return "\n".join(lines)


@dataclass
class SelectionResult:
    records: list[dict[str, Any]]
    kept_rows: list[int]
    out_path: Path
    report_path: Path
    report: str


def run_selection(data: str | os.PathLike, out: str | os.PathLike, runner: Runner, *,
                  config: SelectionConfig | None = None, rules: SelectionRules | None = None,
                  work_dir: Optional[str | os.PathLike] = None, image_root: Optional[str | os.PathLike] = None,
                  limit: Optional[int] = None, overwrite: bool = False, progress: bool = True) -> SelectionResult:
    """Measure (resuming), filter, write the selected parquet file and the report; see the module docstring."""
    rules = rules or SelectionRules()
    out = Path(out)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.stem + "_selection")
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "progress.jsonl"
    if overwrite and log_path.exists():
        log_path.unlink()
    config = config or SelectionConfig()
    source = load_deepeyes_parquet(data, image_root=image_root)
    settings = {"data": os.path.abspath(os.fspath(data)), "rows": len(source), "policy": runner.describe(),
                **config.model_dump(mode="json")}
    log = ChunkLog(log_path, settings)
    start = time.perf_counter()
    records = measure(source, runner, config, log, limit=limit, progress=progress)
    elapsed = time.perf_counter() - start
    kept_rows = [r["row"] for r in records if rules.keep(r)]
    write_selected(data, out, kept_rows)
    policy = runner.describe()
    title = [f"- input: `{data}` ({len(source)} rows) -> output: `{out}`",
             f"- policy: `{policy.get('path') or policy.get('model')}` ({policy.get('kind')}"
             f"{', engine ' + policy['engine'] if 'engine' in policy else ''})",
             f"- k = {config.k} rollouts with tools and {config.k} without, temperature {config.temperature}, "
             f"max {config.max_tokens} tokens per turn, seed {config.seed}, judge `{judge_text(config.judge)}`",
             f"- this invocation: {elapsed:.1f} s"]
    report = selection_report(records, rules, config, total_rows=len(source), kept=len(kept_rows),
                              out_dir=work, title_lines=title)
    report_path = work / "report.md"
    report_path.write_text(report + "\n", encoding="utf-8")
    return SelectionResult(records, kept_rows, out, report_path, report)


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deepeyes_agent.offline.selection",
                                     description=__doc__.split("\n")[0])
    add_policy_arguments(parser)
    io_ = parser.add_argument_group("data")
    io_.add_argument("--data", required=True, help="DeepEyes parquet file to select from")
    io_.add_argument("--out", required=True, help="selected rows, same parquet format")
    io_.add_argument("--work-dir", help="progress log, report and plot (default: OUT's stem + _selection/)")
    io_.add_argument("--image-root", help="directory that relative image paths are resolved against")
    io_.add_argument("--limit", type=int, help="stop after about this many rows (whole chunks); rerun to continue")
    io_.add_argument("--overwrite", action="store_true", help="discard recorded progress and start again")
    io_.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_section_arguments(parser.add_argument_group("measuring"), SelectionConfig)
    add_section_arguments(parser.add_argument_group("rules"), SelectionRules)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = section_from_arguments(SelectionConfig, args)
        rules = section_from_arguments(SelectionRules, args)
    except ConfigError as exc:
        print(f"selection: {exc}", file=sys.stderr)
        return 2
    runner = runner_from_arguments(args)
    try:
        result = run_selection(args.data, args.out, runner, config=config, rules=rules, work_dir=args.work_dir,
                               image_root=args.image_root, limit=args.limit, overwrite=args.overwrite,
                               progress=not args.no_progress)
    finally:
        runner.close()
    print(f"kept {len(result.kept_rows)} of {len(result.records)} recorded rows -> {result.out_path}")
    print(f"report: {result.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
