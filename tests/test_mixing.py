"""Hybrid agentic/plain batches: the mixed source, the trainer's schedule over it (exact per-batch ratios,
reproducible by seed), routing by env_name, construction from files."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import pytest

from deepeyes_agent.training.tasks import MixedSchedule
from deepeyes_envs.data.mixing import MixedTaskSource, agentic_count, route, split_by_env_name
from deepeyes_envs.data.parquet import write_deepeyes_parquet
from deepeyes_envs.data.tasks import ListTaskSource, Task
from deepeyes_envs.synthetic import SyntheticTaskSource


def _tasks(n_agentic: int, n_plain: int) -> tuple[list, list]:
    src = SyntheticTaskSource(n=n_agentic + n_plain, seed=3, kind="toy")
    agentic = [dataclasses.replace(src[i], task_id=f"a{i}") for i in range(n_agentic)]
    plain = [dataclasses.replace(src[n_agentic + i], env_name="", task_id=f"p{i}") for i in range(n_plain)]
    return agentic, plain


def _batches(source: MixedTaskSource, size: int, n: int, seed: int = 0) -> list[list[Task]]:
    """``n`` batches as the trainer draws them: the schedule picks indices, the source reads the rows."""
    schedule = MixedSchedule(len(source.agentic), len(source.plain), source.agentic_fraction, seed)
    return [[source[i] for i in schedule.take(size)] for _ in range(n)]


def test_batches_hold_the_exact_ratio_and_route_each_row_to_its_env():
    agentic, plain = _tasks(12, 18)  # whole epochs of both sides every few batches: no repeats within one
    source = MixedTaskSource(agentic, plain, agentic_fraction=0.25)
    batches = _batches(source, 8, 20)
    for batch in batches:
        kinds = Counter("agentic" if t.env_name else "plain" for t in batch)
        assert kinds == {"agentic": 2, "plain": 6}
        assert len({t.task_id for t in batch}) == 8
        groups = route(batch)
        assert sorted(groups) == ["plain", "visual_toolbox_v2"]
        assert all(not t.env_name for t in groups["plain"]) and len(groups["visual_toolbox_v2"]) == 2
    # the order inside a batch is shuffled: agentic rows are not always first
    assert {bool(batch[0].env_name) for batch in batches} == {True, False}


def test_fractional_counts_round_both_ways_with_the_exact_expectation():
    rng = np.random.default_rng(1)
    counts = [agentic_count(3, 0.5, rng) for _ in range(4000)]
    assert set(counts) == {1, 2}
    assert abs(np.mean(counts) - 1.5) < 0.05
    assert agentic_count(10, 0.3, rng) == 3  # whole numbers are exact


def test_same_seed_same_batches_and_epochs_cover_every_row():
    agentic, plain = _tasks(6, 4)
    source = MixedTaskSource(agentic, plain, agentic_fraction=0.5)
    first, again, other = ([[t.task_id for t in b] for b in _batches(source, 4, 6, seed)] for seed in (7, 7, 8))
    assert first == again and first != other
    seen = [tid for b in first for tid in b]
    # 6 batches x 2 agentic = 12 = two agentic epochs: each agentic row exactly twice
    assert Counter(t for t in seen if t.startswith("a")) == {f"a{i}": 2 for i in range(6)}
    # plain: 12 draws over 4 rows = three full epochs
    assert Counter(t for t in seen if t.startswith("p")) == {f"p{i}": 3 for i in range(4)}


def test_a_row_on_the_wrong_side_is_an_error_not_a_silent_ratio_change():
    agentic, plain = _tasks(3, 3)
    source = MixedTaskSource(agentic, agentic, agentic_fraction=0.5)  # "plain" side holds agentic rows
    with pytest.raises(ValueError, match="plain rows but has env_name"):
        _batches(source, 4, 1)
    with pytest.raises(ValueError, match="no plain rows"):
        MixedTaskSource(agentic, [], agentic_fraction=0.5)
    only_agentic = MixedTaskSource(agentic, [], agentic_fraction=1.0)
    assert all(t.env_name for t in _batches(only_agentic, 5, 1)[0])
    with pytest.raises(ValueError, match="within"):
        MixedTaskSource(agentic, plain, agentic_fraction=1.5)


def test_from_config_splits_one_parquet_file_by_env_name(tmp_path):
    agentic, plain = _tasks(5, 3)
    path = tmp_path / "mix.parquet"
    write_deepeyes_parquet([agentic[0], plain[0], agentic[1], agentic[2], plain[1], agentic[3], plain[2], agentic[4]],
                           path, row_group_size=3)
    source = MixedTaskSource.from_config(data=str(path), agentic_fraction=0.75)
    assert (len(source.agentic), len(source.plain), len(source)) == (5, 3, 8)
    assert [t.task_id for t in source] == ["a0", "a1", "a2", "a3", "a4", "p0", "p1", "p2"]  # file order per side
    (batch,) = _batches(source, 4, 1)
    assert sum(bool(t.env_name) for t in batch) == 3
    a, p = split_by_env_name(ListTaskSource(agentic + plain))
    assert [t.task_id for t in p] == ["p0", "p1", "p2"] and len(a) == 5
