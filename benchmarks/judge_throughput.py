"""Judge throughput: DeepEyes's one-request-at-a-time scoring beside LLMJudge's concurrent batch.

A local OpenAI-compatible server (tests/fault_server.py, in its own process so its CPU is not counted)
answers every request after a fixed delay, standing in for a judge LLM whose latency dominates. Both sides
judge unique answers (no cache hits, no rule shortcuts), in the same run:

* sequential: a plain synchronous ``openai`` client, one request after the other, as DeepEyes does. At 50 ms
  a request 4,096 of them take 205 s, so a sample is timed and the total extrapolated (the table says so);
* concurrent: ``LLMJudge.judge_batch`` with ``--concurrency`` requests in flight.

Per-request CPU overhead is this process's CPU time during the concurrent batch divided by its requests.

    python benchmarks/judge_throughput.py                  # 4,096 judgements, 64 in flight, 50 ms
    python benchmarks/judge_throughput.py --n 512 --sample 32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from deepeyes_envs.judges import PROMPT_VERSION, JudgeRequest, LLMJudge, build_prompt
from deepeyes_envs.judges.prompt import SYSTEM_MESSAGE

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "tests" / "fault_server.py"


def start_server(delay: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--delay", str(delay), "--reply", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("LISTENING"):
        proc.kill()
        raise RuntimeError(f"the benchmark server did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def make_requests(n: int) -> list[JudgeRequest]:
    return [JudgeRequest(f"What colour is object {i}?", "red", f"probably crimson ({i})") for i in range(n)]


def run_sequential(url: str, requests: list[JudgeRequest]) -> float:
    """The DeepEyes way: one blocking chat completion after another. Returns seconds."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="EMPTY")
    model = client.models.list().data[0].id
    start = time.perf_counter()
    for r in requests:
        prompt = build_prompt(r.question, r.ground_truth, r.answer)
        client.chat.completions.create(
            model=model,
            messages=[{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}],
            temperature=0.3,
        )
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


def run_concurrent(url: str, requests: list[JudgeRequest], concurrency: int) -> tuple[float, float, dict]:
    """LLMJudge.judge_batch; returns (seconds, CPU seconds of this process, judge counters)."""
    judge = LLMJudge(base_url=url, concurrency=concurrency, cache_size=0, on_failure="raise")
    judge.judge(JudgeRequest("warm-up", "red", "warm-up answer"))  # model discovery and first connection
    judge.reset_stats()
    cpu0, start = time.process_time(), time.perf_counter()
    verdicts = judge.judge_batch(requests)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    stats = judge.stats()
    judge.close()
    assert all(v.source == "llm" and v.correct == 1.0 for v in verdicts), "every judgement must come from the LLM"
    return elapsed, cpu, stats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="judgements (DeepEyes: 256 prompts x 16 rollouts)")
    parser.add_argument("--sample", type=int, default=256, help="sequential requests actually timed")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--delay", type=float, default=0.05, help="server latency per request, seconds")
    args = parser.parse_args(argv)

    proc, url = start_server(args.delay)
    try:
        requests = make_requests(args.n)
        sample = min(args.sample, args.n)
        seq_sample = run_sequential(url, requests[:sample])
        seq_total = seq_sample / sample * args.n
        conc, cpu, stats = run_concurrent(url, requests, args.concurrency)
    finally:
        proc.terminate()
        proc.wait(10)

    result = {
        "n": args.n,
        "sequential_s": seq_total,
        "concurrent_s": conc,
        "speedup": seq_total / conc,
        "cpu_ms_per_request": 1000 * cpu / args.n,
        "in_flight_max": stats["in_flight_max"],
    }
    extrapolated = f"extrapolated from {sample} timed" if sample < args.n else "all timed"
    print(f"judge throughput: {args.n} judgements, server latency {args.delay * 1000:.0f} ms, "
          f"prompt {PROMPT_VERSION}, {os.cpu_count()} CPUs")
    print("| mode | in flight | wall time (s) | judgements/s | note |")
    print("|---|---:|---:|---:|---|")
    print(f"| sequential (DeepEyes) | 1 | {seq_total:.1f} | {args.n / seq_total:.1f} | {extrapolated} |")
    print(f"| LLMJudge.judge_batch | {args.concurrency} | {conc:.2f} | {args.n / conc:.0f} | "
          f"max in flight seen {stats['in_flight_max']} |")
    print(f"| ratio | | **{result['speedup']:.1f}x** | | target >= 30x |")
    print(f"client CPU per request: {result['cpu_ms_per_request']:.2f} ms (target < 2 ms); "
          f"judge latency mean {stats['latency_mean_s'] * 1000:.0f} ms")
    print(f"RESULT judge_throughput: {result['speedup']:.1f}x (target >= 30x)")
    return result


if __name__ == "__main__":
    main()
