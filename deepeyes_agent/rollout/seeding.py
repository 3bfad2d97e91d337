"""One rule for every seed derived from a run's: numpy's ``SeedSequence`` over the coordinates of the stream.

Sampling, env resets and data selection each need many seeds (per iteration, sampling round, runner share, turn,
chunk); all of them come from :func:`derive_seed`, so two streams share a seed only if their coordinates are equal,
which sums of primes (``s * 1009 + t``) promise only as long as ``t`` stays small.
"""

from __future__ import annotations

import numpy as np


def derive_seed(*keys: int) -> int:
    """The seed of the stream named by ``keys`` (non-negative whole numbers, the run's seed first), in [0, 2**32)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])
