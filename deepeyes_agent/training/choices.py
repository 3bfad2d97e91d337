"""The names a config may choose among for the trainer's estimators, torch-free.

They live apart from the code that implements them (``advantages.py``, ``losses.py``, which need torch) so that
reading or describing a config (``train.py --describe``) does not load torch.
"""

from __future__ import annotations

from typing import Literal, get_args

Advantage = Literal["grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "gae"]
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
KLEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(Advantage)
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAgg)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
