"""The tool-use health guards: dynamic sampling, over-turn masking, the tool-call collapse alarm; and the
per-episode metrics they read (``over_turn``, accuracy with and without the tool)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from deepeyes_agent.rollout.metrics import batch_metrics
from deepeyes_agent.training.health import CollapseAlarm, informative_groups, trainable_episodes, without_over_turn


@dataclass
class Episode:
    reward: float
    group_id: int
    metrics: dict = field(default_factory=dict)


def test_groups_without_a_reward_difference_are_dropped():
    episodes = [Episode(1.0, 0), Episode(0.0, 0),  # informative
                Episode(2.0, 1), Episode(2.0, 1),  # all equal: zero advantage
                Episode(0.5, 2),  # alone: no baseline
                Episode(0.0, 3), Episode(0.0, 3), Episode(0.8, 3)]
    kept, dropped = informative_groups(episodes)
    assert [e.group_id for e in kept] == [0, 0, 3, 3, 3] and dropped == 2
    assert informative_groups([]) == ([], 0)


def test_over_turn_episodes_leave_the_batch():
    episodes = [Episode(0.0, 0, {"over_turn": 1.0}), Episode(2.0, 0, {"over_turn": 0.0}), Episode(0.8, 1)]
    kept, masked = without_over_turn(episodes)
    assert kept == episodes[1:] and masked == 1


def test_the_one_filter_masks_over_turn_episodes_before_it_judges_the_groups():
    episodes = [Episode(0.0, 0, {"over_turn": 1.0}), Episode(1.0, 0), Episode(1.0, 0),  # equal once masked
                Episode(0.0, 1), Episode(1.0, 1)]
    kept, counts = trainable_episodes(episodes, mask_over_turn=True, dynamic_sampling=True)
    assert kept == episodes[3:] and counts == {"health/over_turn_masked": 1.0, "health/dropped_groups": 1.0}
    kept, counts = trainable_episodes(episodes, mask_over_turn=False, dynamic_sampling=True)
    assert kept == episodes and counts == {"health/dropped_groups": 0.0}
    assert trainable_episodes(episodes, mask_over_turn=False, dynamic_sampling=False) == (episodes, {})


def test_collapse_alarm_fires_after_patience_low_iterations_and_resets():
    alarm = CollapseAlarm(share=0.5, patience=3)
    assert [alarm.update(r) for r in (0.0, 0.0, 0.0, 0.0)] == [False] * 4  # never called a tool: nothing to lose
    assert [alarm.update(r) for r in (0.6, 0.8, 0.5, 0.3, 0.35, 0.2, 0.1)] == [False, False, False, False, False,
                                                                               True, True]
    assert alarm.best == 0.8 and alarm.low_streak == 4
    assert alarm.update(0.7) is False and alarm.low_streak == 0  # back above half the best
    restored = CollapseAlarm(share=0.5, patience=3)
    restored.set_state(alarm.get_state())
    assert [restored.update(r) for r in (0.1, 0.1, 0.1)] == [False, False, True]
    with pytest.raises(ValueError, match="0 < share < 1"):
        CollapseAlarm(share=1.5, patience=3)


def test_collapse_alarm_record_carries_what_the_warning_quotes():
    alarm = CollapseAlarm(share=0.5, patience=2)
    records = [alarm.record(r) for r in (0.8, 0.3, 0.2)]
    assert [r["health/tool_collapse"] for r in records] == [0.0, 0.0, 1.0]
    assert records[-1]["health/tool_call_rate_best"] == 0.8 and records[-1]["health/tool_call_low_streak"] == 2.0


def test_batch_metrics_split_accuracy_by_tool_use():
    episodes = [{"acc": 1.0, "image_observations": 1.0, "tool_calls": 1.0, "invalid_calls": 0.0, "iou": 0.5},
                {"acc": 1.0, "image_observations": 2.0, "tool_calls": 3.0, "invalid_calls": 1.0, "iou": None},
                {"acc": 0.0, "image_observations": 0.0, "tool_calls": 1.0, "invalid_calls": 1.0, "iou": None},
                {"acc": 1.0, "image_observations": 0.0, "tool_calls": 0.0, "invalid_calls": 0.0, "iou": None}]
    out = batch_metrics(episodes)
    assert out["acc"] == 0.75 and out["acc_with_tool"] == 1.0 and out["acc_without_tool"] == 0.5
    assert out["tool_call_rate"] == 0.75 and out["invalid_call_rate"] == 2 / 5
    assert out["iou"] == 0.5  # episodes without a zoom box are left out of the mean
    assert batch_metrics(episodes[:2])["acc_without_tool"] != batch_metrics(episodes[:2])["acc_without_tool"]  # NaN


def test_batch_metrics_split_zoom_rate_and_accuracy_by_whether_the_task_needs_a_zoom():
    episodes = [{"acc": 1.0, "tool_calls": 1.0, "needs_zoom": 1.0}, {"acc": 0.0, "tool_calls": 0.0, "needs_zoom": 1.0},
                {"acc": 1.0, "tool_calls": 1.0, "needs_zoom": 0.0}, {"acc": 1.0, "tool_calls": 0.0, "needs_zoom": 0.0},
                {"acc": 1.0, "tool_calls": 0.0, "needs_zoom": 0.0}]
    out = batch_metrics(episodes)
    assert (out["tool_call_rate_needed"], out["acc_needed"]) == (0.5, 0.5)
    assert (out["tool_call_rate_needless"], out["acc_needless"]) == (pytest.approx(1 / 3), 1.0)
    assert "acc_needed" not in batch_metrics([{"acc": 1.0, "tool_calls": 0.0, "needs_zoom": None}])
