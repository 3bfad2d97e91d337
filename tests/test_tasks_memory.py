"""Peak memory: 2,000 4K tasks from a parquet file are read lazily and decoded one at a time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Runs in a fresh interpreter so its peak RSS is this workload's alone, not the test session's.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from deepeyes_envs.data.parquet import load_deepeyes_parquet, write_deepeyes_parquet
    from deepeyes_envs.images import LazyImage
    from deepeyes_envs.synthetic import SyntheticTaskSource

    path, n, stride = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    start = time.perf_counter()
    # Real synthetic 4K tasks; the flat background keeps each PNG near 100 KB. PNG-encoding 2,000
    # 4K images would take minutes, so a pool of 8 encoded images is shared by the rows.
    source = SyntheticTaskSource(n, seed=0, width=3840, height=2160, background="flat", n_distractors=12)
    pool = [LazyImage(source[i].images[0].to_bytes()) for i in range(8)]

    def tasks():
        for i in range(n):
            task = source[i]
            task.images = (pool[i % len(pool)],)
            yield task

    assert write_deepeyes_parquet(tasks(), path) == n
    loaded = load_deepeyes_parquet(path)
    assert len(loaded) == n
    decoded = checksum = 0
    for i in range(n):  # every row is read; every stride-th one is decoded (4K decodes cost ~80 ms each)
        task = loaded[i]
        if i % stride == 0:
            (image,) = task.load_images()
            assert image.shape == (2160, 3840, 3)
            checksum += int(image[::512, ::512].sum())
            decoded += 1
    # VmHWM of this process alone: getrusage's ru_maxrss would carry over the pytest parent's peak.
    with open("/proc/self/status") as fh:
        peak_mb = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    print(f"rows={n} decoded={decoded} peak_rss_mb={peak_mb:.0f} seconds={time.perf_counter() - start:.1f}")
    """
)


def _run(tmp_path, n: int, stride: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "tasks4k.parquet"), str(n), str(stride)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = out.stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in (field.split("=") for field in line.split())}


@pytest.mark.slow
def test_2000_4k_tasks_stay_under_1_5_gb(tmp_path):
    stats = _run(tmp_path, n=2000, stride=4)
    print(stats)
    assert stats["decoded"] == 500
    assert stats["peak_rss_mb"] < 1536, stats


def test_lazy_4k_reading_smoke(tmp_path):
    stats = _run(tmp_path, n=40, stride=20)
    assert stats["decoded"] == 2 and stats["peak_rss_mb"] < 1024, stats
