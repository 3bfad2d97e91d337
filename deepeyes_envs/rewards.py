"""The DeepEyes outcome reward (docs/deepeyes.md, "The reward") and grounding IoU.

The reward reads the whole response as the model's context holds it: every assistant turn and every
observation, rendered as Qwen chat text. Judging is separated from scoring so that a trainer can
collect many finished episodes and send them to the judge in one concurrent batch
(:func:`score_episodes`); an env scoring one episode goes through the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Optional

from .data.tasks import Box, Task
from .judges import Judge, JudgeRequest, Verdict
from .judges.math import MathJudge, extract_boxed
from .messages import IMAGE_PAD, VISION_END, VISION_START

MATH_SOURCES = frozenset({"thinklite_eureka"})
MAX_ANSWER_CHARS = 1000
_VISION_OPEN_PAIR = VISION_START + IMAGE_PAD
_VISION_CLOSE_PAIR = IMAGE_PAD + VISION_END


@dataclass(frozen=True)
class EpisodeOutcome:
    """What the reward needs from a finished episode."""

    response_text: str
    task: Task
    n_image_observations: int
    call_cost: Optional[float] = None  # the env's: None is DeepEyes' tool bonus, a number prices a call instead


@dataclass(frozen=True)
class RewardParts:
    score: float
    acc: float
    format_error: bool
    tool: float
    answer: str
    formula: str
    judge_source: str
    judge_raw: Optional[str]
    format_problems: tuple[str, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def extract_answer(response_text: str) -> str:
    """DeepEyes' answer: text between the last ``<answer>`` and the next ``</answer>``, stripped."""
    return response_text.split("<answer>")[-1].split("</answer>")[0].strip()


def visual_format_problems(response_text: str) -> list[str]:
    """Why the response breaks the tag format (empty list: it does not)."""
    problems = []
    if response_text.count("<think>") != response_text.count("</think>"):
        problems.append("unbalanced <think> tags")
    if response_text.count(_VISION_OPEN_PAIR) != response_text.count(_VISION_CLOSE_PAIR):
        problems.append("unbalanced vision tokens")
    tail = response_text.split("</think>")[-1]
    if tail.count("<answer>") != tail.count("</answer>"):
        problems.append("unbalanced <answer> tags after the last </think>")
    if len(extract_answer(response_text)) >= MAX_ANSWER_CHARS:
        problems.append(f"answer of {MAX_ANSWER_CHARS}+ characters")
    return problems


def math_answer(response_text: str) -> tuple[Optional[str], list[str]]:
    """The last ``\\boxed{}`` after the last ``</think>``, and the format problems found."""
    boxed = extract_boxed(response_text)
    if boxed.count == 0:
        return None, ["no \\boxed{} answer"]
    return boxed.answer, (["more than one \\boxed{} answer"] if boxed.count > 1 else [])


def score_episodes(outcomes: Sequence[EpisodeOutcome], judge: Judge) -> list[RewardParts]:
    """Score finished episodes, judging all answers that need a judge in one batch per formula."""
    results: list[Optional[RewardParts]] = [None] * len(outcomes)
    visual, maths = [], []
    for i, outcome in enumerate(outcomes):
        (maths if outcome.task.data_source in MATH_SOURCES else visual).append(i)
    _score_visual([outcomes[i] for i in visual], judge, visual, results)
    _score_math([outcomes[i] for i in maths], judge, maths, results)
    return [r for r in results if r is not None]


def _request(outcome: EpisodeOutcome, answer: str) -> JudgeRequest:
    task = outcome.task
    return JudgeRequest(question=task.question, ground_truth=task.answer, answer=answer,
                        options=task.options, data_source=task.data_source)


def _score_visual(outcomes: list[EpisodeOutcome], judge: Judge, slots: list[int], results: list) -> None:
    answers = [extract_answer(o.response_text) for o in outcomes]
    problems = [visual_format_problems(o.response_text) for o in outcomes]
    to_judge = [k for k, a in enumerate(answers) if len(a) < MAX_ANSWER_CHARS]
    requests = [_request(outcomes[k], answers[k]) for k in to_judge]
    verdicts = dict(zip(to_judge, judge.judge_batch(requests), strict=True))
    for k, outcome in enumerate(outcomes):
        verdict = verdicts.get(k, Verdict(correct=0.0, source="too_long"))
        acc = float(verdict.correct)
        called = outcome.n_image_observations > 0
        tool = 1.0 if called and acc > 0.5 else 0.0
        error = bool(problems[k])
        if outcome.call_cost is None:  # DeepEyes: a bonus for a right answer reached through a tool
            score, formula = 0.8 * acc - 0.2 * error + 1.2 * tool, "visual"
        else:  # no bonus, and a price on every answer given after a call: a needless call now costs
            score, formula = 0.8 * acc - 0.2 * error - outcome.call_cost * called, "visual_priced"
        results[slots[k]] = RewardParts(
            score=score, acc=acc, format_error=error, tool=tool, answer=answers[k], formula=formula,
            judge_source=verdict.source, judge_raw=verdict.raw, format_problems=tuple(problems[k]),
        )


def _score_math(outcomes: list[EpisodeOutcome], judge: Judge, slots: list[int], results: list) -> None:
    extracted = [math_answer(o.response_text) for o in outcomes]
    to_judge = [k for k, (a, _) in enumerate(extracted) if a is not None]
    math_judge = MathJudge(fallback=judge)
    requests = [_request(outcomes[k], extracted[k][0]) for k in to_judge]
    verdicts = dict(zip(to_judge, math_judge.judge_batch(requests), strict=True))
    for k in range(len(outcomes)):
        answer, problems = extracted[k]
        verdict = verdicts.get(k, Verdict(correct=0.0, source="no_answer"))
        acc = float(verdict.correct)
        error = bool(problems)
        results[slots[k]] = RewardParts(
            score=1.2 * acc - 0.4 * error, acc=acc, format_error=error, tool=0.0, answer=answer or "",
            formula="math", judge_source=verdict.source, judge_raw=verdict.raw, format_problems=tuple(problems),
        )


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 when either is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_centre_inside(box: Box, gt_boxes: Sequence[Box]) -> bool:
    """Whether the centre of ``box`` lies inside any of ``gt_boxes`` (a zoom there looks at the target)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return any(x1 <= cx <= x2 and y1 <= cy <= y2 for x1, y1, x2, y2 in gt_boxes)


def grounding_iou(box: Box, gt_boxes: Sequence[Box]) -> Optional[float]:
    """Best IoU of a zoom box against the task's ground-truth boxes; None when the task has none."""
    return max((box_iou(box, gt) for gt in gt_boxes), default=None)
