"""The iteration's record (deepeyes_agent.training.iteration_metrics): per-token means from the learners' sums,
what was played against what was learned from, judge counters summed over the runners, the critic's numbers only
for PPO."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from deepeyes_agent.training.iteration_metrics import iteration_metrics
from deepeyes_agent.training.rllib.env_runner import RunnerBatch


@dataclass
class Episode:
    """The two things the record reads of an episode: its metrics and its length."""

    metrics: dict = field(default_factory=dict)
    tokens: int = 10

    def __len__(self) -> int:
        return self.tokens


def runner(episodes: list[Episode], judge: dict, pid: int) -> RunnerBatch:
    return RunnerBatch(episodes=episodes, samples=[], timings={"judge_s": 0.5 * pid, "generate_s": 1.0,
                                                               "generated_tokens": 40.0},
                       judge_stats=judge, bad_rows=[], node_id="n1", pid=pid, worker_index=pid, policy_version=0)


def record(critic: bool, learned: bool) -> dict:
    right, wrong = Episode({"acc": 1.0, "tool_calls": 1.0}), Episode({"acc": 0.0, "tool_calls": 0.0})
    results = [runner([right, wrong], {"requests": 2, "note": "x"}, 1), runner([right], {"requests": 1}, 2)]
    stats = {"tokens": 20.0, "pg_loss": 4.0, "entropy_sum": 10.0, "kl_sum": 2.0, "grad_norm": 0.7,
             "value_loss": 6.0, "value_sum": 8.0, "stale_tokens": 5.0, "is_weight_sum": 4.0}
    return iteration_metrics(played=[e for r in results for e in r.episodes], learned=[right, right] if learned else [],
                             results=results, batch_stats={"health/dropped_groups": 1.0},
                             update_stats=stats if learned else {}, timings={"rollout_s": 2.0, "update_s": 0.5},
                             staleness=[0, 1] if learned else [], lr=1e-3, epochs=2, env_runner_restarts=0,
                             critic=critic)


def test_learner_sums_become_per_token_means_and_the_played_batch_is_what_is_described():
    m = record(critic=False, learned=True)
    assert m["acc"] == pytest.approx(2 / 3) and m["episodes"] == 2.0  # 3 played, 2 learned from
    assert (m["pg_loss"], m["entropy"], m["kl"], m["grad_norm"]) == (0.2, 0.5, 0.1, 0.7)
    assert m["learner_tokens_per_s"] == 20 * 2 / 0.5 and m["rollout_tokens_per_s"] == 80 / 2.0
    assert m["async/staleness_max"] == 1.0 and m["async/is_weight_mean"] == pytest.approx(0.8)
    assert m["time/judge_s"] == 1.0 and m["time/generate_s"] == 1.0 and m["time/update_s"] == 0.5
    assert m["judge/requests"] == 3.0 and "judge/note" not in m  # counters summed, text left out
    assert m["env_runner_pids"] == (1, 2) and m["health/dropped_groups"] == 1.0
    assert "value_loss" not in m  # no critic


def test_no_critic_numbers_when_nothing_was_learned():
    """(PPO's figures on real episodes: tests/test_rllib_trainer.py.)"""
    nothing = record(critic=True, learned=False)  # every group dropped: nothing learned, nothing of the critic
    assert "value_loss" not in nothing and nothing["episodes"] == 0.0 and nothing["pg_loss"] == 0.0
