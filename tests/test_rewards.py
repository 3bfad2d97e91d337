"""The DeepEyes outcome reward (docs/deepeyes.md, "The reward") and grounding IoU."""

import gymnasium as gym
import pytest

import deepeyes_envs  # noqa: F401
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.judges import Judge, JudgeRequest, Verdict
from deepeyes_envs.judges.rules import RuleJudge
from deepeyes_envs.rewards import (
    EpisodeOutcome,
    box_iou,
    extract_answer,
    grounding_iou,
    score_episodes,
    visual_format_problems,
)

IMG = "<|vision_start|><|image_pad|><|vision_end|>"


def task(answer="red", source="vstar", question="What colour?"):
    return Task(question=question, answer=answer, data_source=source)


class CountingJudge(Judge):
    """A real judge (exact match) that records how it was called."""

    def __init__(self):
        self.batches = []

    def judge(self, request: JudgeRequest) -> Verdict:
        return Verdict(float(request.answer == request.ground_truth), "counting")

    def judge_batch(self, requests):
        self.batches.append(len(requests))
        return [self.judge(r) for r in requests]


def score(text, n_images=0, t=None, judge=None):
    return score_episodes([EpisodeOutcome(text, t or task(), n_images)], judge or RuleJudge())[0]


def test_correct_answer_with_a_successful_zoom_earns_the_tool_bonus():
    parts = score(f"<think>a</think><tool_call>..</tool_call><|im_end|>\n<|im_start|>user\n{IMG}<|im_end|>\n"
                  "<think>b</think><answer>red</answer><|im_end|>", n_images=1)
    assert (parts.acc, parts.tool, parts.format_error) == (1.0, 1.0, False)
    assert parts.score == pytest.approx(2.0)


def test_no_tool_bonus_without_an_image_observation_or_with_a_wrong_answer():
    assert score("<think>x</think><tool_call>{}</tool_call><answer>red</answer>", n_images=0).tool == 0.0
    wrong = score("<think>x</think><answer>blue</answer>", n_images=2)
    assert (wrong.acc, wrong.tool, wrong.score) == (0.0, 0.0, 0.0)


def test_a_call_cost_replaces_the_tool_bonus_by_a_price_on_calls():
    zoomed = (f"<think>a</think><tool_call>..</tool_call><|im_end|>\n<|im_start|>user\n{IMG}<|im_end|>\n"
              "<think>b</think><answer>red</answer><|im_end|>")
    outcomes = [EpisodeOutcome(zoomed, task(), 1, call_cost=0.3),
                EpisodeOutcome("<think>a</think><answer>red</answer>", task(), 0, call_cost=0.3),
                EpisodeOutcome(zoomed.replace(">red<", ">blue<"), task(), 1, call_cost=0.3)]
    right_zoomed, right_plain, wrong_zoomed = score_episodes(outcomes, RuleJudge())
    assert right_zoomed.score == pytest.approx(0.5) and right_zoomed.formula == "visual_priced"
    assert right_plain.score == pytest.approx(0.8)  # a needless call costs what it would have paid
    assert wrong_zoomed.score == pytest.approx(-0.3)
    assert right_zoomed.tool == 1.0  # the tool metric still says the answer came through a tool
    env = gym.make("visual_toolbox_v2", call_cost=0.3)
    env.reset(seed=0)
    *_, info = env.step("<think>guess</think><answer>A</answer>")
    assert info["reward_parts"]["formula"] == "visual_priced"
    assert gym.make("visual_toolbox_v2").unwrapped.call_cost is None  # DeepEyes' reward by default
    with pytest.raises(ValueError, match="call_cost"):
        gym.make("visual_toolbox_v2", call_cost=2.0)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<think>a<answer>red</answer>", "unbalanced <think>"),
        (f"<think>a</think><|vision_start|><|image_pad|>{IMG}<answer>red</answer>", "unbalanced vision"),
        ("<think>a</think><answer>red", "unbalanced <answer>"),
        ("<think>a</think><answer>" + "r" * 1000 + "</answer>", "1000+ characters"),
    ],
)
def test_format_errors(text, problem):
    problems = visual_format_problems(text)
    assert any(problem in p for p in problems), problems
    parts = score(text)
    assert parts.format_error and parts.score <= 0.8 - 0.2 + 1e-9


def test_too_long_answer_forces_acc_zero_without_asking_the_judge():
    judge = CountingJudge()
    parts = score("<think>a</think><answer>" + "red " * 300 + "</answer>", judge=judge)
    assert parts.acc == 0.0 and parts.judge_source == "too_long" and judge.batches == [0]
    assert parts.score == pytest.approx(-0.2)


def test_missing_answer_is_not_a_format_error_by_itself():
    parts = score("<think>I am not sure</think>")
    assert not parts.format_error and parts.acc == 0.0


def test_answer_extraction_matches_deepeyes():
    assert extract_answer("<answer>a</answer> more <answer> b </answer>") == "b"
    assert extract_answer("no tags at all") == "no tags at all"


def test_math_rows_use_the_last_boxed_answer_and_their_own_formula():
    ok = score("<think>2+2</think>The answer is \\boxed{4}.", t=task("4", "thinklite_eureka"))
    assert (ok.formula, ok.acc, ok.format_error, ok.score) == ("math", 1.0, False, pytest.approx(1.2))
    frac = score("<think>half</think>\\boxed{\\frac{1}{2}}", t=task("0.5", "thinklite_eureka"))
    assert frac.acc == 1.0
    twice = score("<think>x</think>\\boxed{3} or \\boxed{4}", t=task("4", "thinklite_eureka"))
    assert twice.format_error and twice.acc == 1.0 and twice.score == pytest.approx(1.2 - 0.4)
    none = score("<think>x</think>4", t=task("4", "thinklite_eureka"))
    assert none.format_error and none.acc == 0.0 and none.score == pytest.approx(-0.4)
    inside_think = score("<think>\\boxed{4}</think>no box here", t=task("4", "thinklite_eureka"))
    assert inside_think.acc == 0.0


def test_many_episodes_are_judged_in_one_batch():
    judge = CountingJudge()
    outcomes = [EpisodeOutcome(f"<answer>{a}</answer>", task(), 1) for a in ("red", "blue", "red")]
    parts = score_episodes(outcomes, judge)
    assert judge.batches == [3]
    assert [p.acc for p in parts] == [1.0, 0.0, 1.0]


def test_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert grounding_iou((0, 0, 10, 10), []) is None
    assert grounding_iou((0, 0, 10, 10), [(20, 20, 30, 30), (0, 0, 10, 20)]) == pytest.approx(0.5)


def test_env_reports_iou_of_each_zoom_against_ground_truth():
    import numpy as np

    env = gym.make("visual_toolbox_v2")
    env.reset(options={"image": np.zeros((400, 400, 3), np.uint8), "question": "q", "answer": "a",
                       "gt_boxes": [(100, 100, 200, 200)]})
    _, _, _, _, info = env.step('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [100, 100, 200, 200]}}</tool_call>')
    assert info["tool_calls"][0]["iou"] == pytest.approx(1.0)
    _, _, _, _, info = env.step('<tool_call>{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [150, 100, 250, 200]}}</tool_call>')
    assert info["tool_calls"][0]["iou"] == pytest.approx(1 / 3)
    _, _, _, _, info = env.step("<answer>a</answer>")
    assert info["episode_summary"]["mean_iou"] == pytest.approx((1 + 1 / 3) / 2)


def test_deferred_reward_is_scored_later_in_a_batch():
    import numpy as np

    env = gym.make("visual_toolbox_v2", defer_reward=True)
    env.reset(options={"image": np.zeros((64, 64, 3), np.uint8), "question": "q", "answer": "a"})
    _, reward, terminated, _, info = env.step("<think>x</think><answer>a</answer>")
    assert terminated and reward == 0.0 and "reward_parts" not in info
    (parts,) = score_episodes([info["outcome"]], RuleJudge())
    assert parts.acc == 1.0 and parts.score == pytest.approx(0.8)
