"""One seeding rule (deepeyes_agent.rollout.seeding): seeds follow from their coordinates and nothing else."""

from __future__ import annotations

import pytest

from deepeyes_agent.rollout.seeding import derive_seed


def test_seeds_are_reproducible_and_distinct_across_coordinates():
    assert derive_seed(0, 3, 1) == derive_seed(0, 3, 1)
    seeds = {derive_seed(run, iteration, k) for run in range(3) for iteration in range(50) for k in range(4)}
    assert len(seeds) == 3 * 50 * 4  # no two streams collide, where s * 1009 + t did once t reached 1009
    assert derive_seed(1, 0) != derive_seed(0, 1009) and derive_seed(0, 1) != derive_seed(1)
    assert all(0 <= s < 2**32 for s in seeds)


def test_a_negative_coordinate_is_refused():
    with pytest.raises(ValueError):
        derive_seed(0, -1)
