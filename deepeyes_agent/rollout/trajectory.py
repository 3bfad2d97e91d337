"""Trajectories: what one played episode leaves behind, for training, debugging, saving and replay.

A :class:`Trajectory` is the record the rollout loop (``deepeyes_agent.rollout.loop``) returns for each
episode. It holds the training view (token ids, sampling logprobs, loss mask, image grids, the live
:class:`~deepeyes_agent.policy.chat.EpisodeContext`) and the human view (each turn's generated text and the env's
observation, tool calls, zoom boxes, reward parts, timings) side by side, so the same object feeds the
learner and shows up in a notebook.

Saving (:func:`save_trajectories`) writes a directory::

    trajectories.jsonl     one JSON object per trajectory (format version in "format")
    images/<sha1>.png      every distinct image once, referenced from the JSON by its hash

A GRPO group shares its task image, so it is stored once however many rollouts were played; PNG keeps
uint8 pixels exact, so a loaded trajectory replays to the same observations. The live context is not
saved; :meth:`Trajectory.rebuild_context` reconstructs it from the saved turns (same token ids) when a
processor is at hand.

Replay (:func:`replay`) re-runs the env on the recorded actions and returns its observations: equal to
the recorded ones when the env, the task and the tools behave deterministically, which is what makes a
saved rollout a reproducible bug report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from deepeyes_agent.rollout.metrics import batch_metrics, episode_metrics
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.messages import Message, message

if TYPE_CHECKING:
    from deepeyes_agent.policy.chat import EpisodeContext
    from deepeyes_agent.policy.loading import QwenVLImageProcessor

FORMAT_VERSION = 1
JSONL_NAME = "trajectories.jsonl"
IMAGES_DIR = "images"


# ---------------------------------------------------------------------------------------------- records
@dataclass
class Turn:
    """One generated assistant turn and the env's answer to it.

    ``observation`` is what the env returned (empty when the turn ended the episode). When it did not fit
    the token budget it is still recorded, with ``observation_dropped`` set, so replay can compare it.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    token_texts: list[str] = field(default_factory=list)
    observation: tuple[Message, ...] = ()
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    observation_dropped: bool = False
    generate_s: float = 0.0
    env_s: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    scripted_action: str | None = None

    @property
    def action(self) -> dict[str, Any]:
        """The action the agent took (a ``ScriptedActions`` wrapper may have played ``scripted_action``)."""
        return {"text": self.text, "finish_reason": self.finish_reason}


@dataclass
class Trajectory:
    """One played episode. Lists are aligned with the context: ``token_ids[i]``, ``loss_mask[i]``,
    ``logprobs[i]`` (0 where the mask is 0). ``images`` are all images of the context in order (prompt
    images first, then the crops), ``task_images`` the task's own images (what replay needs).

    ``reward`` is the outcome score (docs/deepeyes.md, "The reward"), ``reward_parts`` its pieces (acc, format
    error, tool bonus, answer, judge). ``group_id`` is shared by the ``n`` rollouts of one task (GRPO).
    ``context`` is the live token context for training; it is never saved (see ``rebuild_context``).
    """

    task_id: str
    group_id: int
    env_id: str
    prompt: tuple[Message, ...] = ()
    turns: list[Turn] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    image_grid_thw: list[tuple[int, int, int]] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    task_images: list[np.ndarray] = field(default_factory=list)
    reward: float = 0.0
    reward_parts: dict[str, Any] = field(default_factory=dict)
    end_reason: str = ""
    terminated: bool = False
    truncated: bool = False
    zoom_boxes: list[list[float]] = field(default_factory=list)
    episode_index: int = 0
    seed: int | None = None
    max_total_tokens: int = 0
    task: Task | None = None
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    context: EpisodeContext | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ summaries
    @property
    def uid(self) -> str:
        """``task_id/group/episode``: unique within one rollout call."""
        return f"{self.task_id}/{self.group_id}/{self.episode_index}"

    @property
    def acc(self) -> float:
        return float(self.reward_parts.get("acc", 0.0))

    @property
    def n_turns(self) -> int:
        return len(self.turns)

    @property
    def n_tool_calls(self) -> int:
        """Tool calls the env parsed and ran (successful or not)."""
        return sum(len(t.tool_calls) for t in self.turns)

    @property
    def n_image_observations(self) -> int:
        """Images the tools returned that made it into the context."""
        return max(0, len(self.images) - self.n_prompt_images)

    @property
    def n_prompt_images(self) -> int:
        return sum(1 for m in self.prompt for p in m["content"] if p["type"] == "image")

    @property
    def n_generated_tokens(self) -> int:
        return int(sum(self.loss_mask))

    @property
    def skipped(self) -> bool:
        """True when the episode never started (its prompt alone exceeded the budget)."""
        return self.end_reason == "prompt_too_long"

    @property
    def answer(self) -> str:
        return str(self.reward_parts.get("answer", ""))

    @property
    def ground_truth(self) -> str:
        return self.task.answer if self.task is not None else ""

    @property
    def question(self) -> str:
        return self.task.question if self.task is not None else ""

    @property
    def gt_boxes(self) -> list[list[float]]:
        return [list(b) for b in self.task.gt_boxes] if self.task is not None else []

    def summary(self) -> dict[str, Any]:
        """One row of numbers for tables and logs."""
        return {"uid": self.uid, "task_id": self.task_id, "group_id": self.group_id, "reward": self.reward,
                "acc": self.acc, "tool_calls": self.n_tool_calls, "image_observations": self.n_image_observations,
                "turns": self.n_turns, "generated_tokens": self.n_generated_tokens, "tokens": len(self.token_ids),
                "end_reason": self.end_reason, "truncated": self.truncated}

    # ------------------------------------------------------------------ training view
    def rebuild_context(self, processor: QwenVLImageProcessor, max_total_tokens: int | None = None) -> EpisodeContext:
        """Rebuild the token context from the saved prompt and turns (e.g. after :func:`load_trajectories`).

        Goes through the same ``EpisodeContext`` rules as the rollout, then checks that the token ids come
        out identical to the recorded ones, so a loaded trajectory trains exactly like a fresh one.
        """
        from deepeyes_agent.policy.chat import EpisodeContext

        budget = max_total_tokens or self.max_total_tokens or len(self.token_ids)
        ctx = EpisodeContext(processor, self.prompt, max_total_tokens=budget, max_prompt_tokens=None)
        for turn in self.turns:
            ctx.append_generated(turn.token_ids, turn.logprobs)
            if turn.observation and not turn.observation_dropped:
                ctx.append_observation(turn.observation)
        if ctx.token_ids != self.token_ids:
            raise ValueError(f"trajectory {self.uid}: rebuilt tokens differ from the recorded ones "
                             "(a different processor or tokenizer?)")
        return ctx

    def rebuild_task(self) -> Task:
        """The task as the env saw it (images decoded), for replay; the original object when held."""
        if self.task is not None and not self.task_images:
            return self.task
        base = self.task or Task(question="", answer="", task_id=self.task_id)
        return Task(question=base.question, answer=base.answer, images=tuple(self.task_images),
                    data_source=base.data_source, env_name=base.env_name, task_id=base.task_id,
                    options=base.options, gt_boxes=base.gt_boxes, prompt=base.prompt, tools=base.tools,
                    extra=dict(base.extra))

    # ------------------------------------------------------------------ display
    def _repr_html_(self) -> str:
        from deepeyes_agent.rollout.trajectory_html import trajectory_html

        return trajectory_html(self)


class TrajectoryBatch(list):
    """A list of trajectories with run-level timings, a summary and a notebook display."""

    def __init__(self, trajectories: Iterable[Trajectory] = (), timings: dict[str, float] | None = None) -> None:
        super().__init__(trajectories)
        self.timings: dict[str, float] = dict(timings or {})

    def summary(self) -> dict[str, float]:
        """The batch's numbers as training logs them (``rollout.metrics``), over the episodes played, so a batch
        debugged in a notebook reads like a line of the run log."""
        played = [t for t in self if not t.skipped]
        return {"episodes": float(len(played)), **batch_metrics([episode_metrics(t) for t in played])}

    def groups(self) -> dict[int, list[Trajectory]]:
        """Trajectories by ``group_id`` (the rollouts of one task)."""
        out: dict[int, list[Trajectory]] = {}
        for traj in self:
            out.setdefault(traj.group_id, []).append(traj)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return save_trajectories(self, path)

    def _repr_html_(self) -> str:
        from deepeyes_agent.rollout.trajectory_html import batch_html

        return batch_html(self, self.summary())


# ---------------------------------------------------------------------------------------------- save / load
def _image_key(image: np.ndarray) -> str:
    """Content hash of an image (shape and pixels), its file name in ``images/``."""
    arr = np.ascontiguousarray(image)
    digest = hashlib.sha1(f"{arr.shape}|{arr.dtype}".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()


class _ImageStore:
    """Writes each distinct image once as PNG and hands out its key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._seen: dict[int, str] = {}

    def put(self, image: np.ndarray) -> str:
        cached = self._seen.get(id(image))
        if cached is not None:
            return cached
        key = _image_key(image)
        path = self.folder / f"{key}.png"
        if not path.exists():
            Image.fromarray(np.ascontiguousarray(image)).save(path, format="PNG")
        self._seen[id(image)] = key
        return key


class _ImageLoader:
    """Reads images by key, each file once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[str, np.ndarray] = {}

    def get(self, key: str) -> np.ndarray:
        if key not in self._cache:
            with Image.open(self.folder / f"{key}.png") as img:
                array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
            array.flags.writeable = False
            self._cache[key] = array
        return self._cache[key]


def _jsonable(value: Any) -> Any:
    """JSON-safe copy of tool-call records and infos (numpy scalars, tuples, odd objects as strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _messages_to_json(messages: Sequence[Message], store: _ImageStore) -> list[dict[str, Any]]:
    out = []
    for msg in messages:
        parts = [{"type": "text", "text": p["text"]} if p["type"] == "text"
                 else {"type": "image", "ref": store.put(p["image"])} for p in msg["content"]]
        out.append({"role": msg["role"], "content": parts})
    return out


def _messages_from_json(data: Sequence[dict[str, Any]], images: _ImageLoader) -> tuple[Message, ...]:
    return tuple(message(m["role"], *({"type": "image", "image": images.get(p["ref"])} if p["type"] == "image"
                                      else {"type": "text", "text": p["text"]} for p in m["content"]))
                 for m in data)


def _task_to_json(task: Task | None) -> dict[str, Any] | None:
    if task is None:
        return None
    return {"question": task.question, "answer": task.answer, "data_source": task.data_source,
            "env_name": task.env_name, "task_id": task.task_id,
            "options": list(task.options) if task.options is not None else None,
            "gt_boxes": [list(b) for b in task.gt_boxes],
            "prompt": [dict(p) for p in task.prompt] if task.prompt is not None else None,
            "tools": list(task.tools) if task.tools is not None else None, "extra": _jsonable(task.extra)}


def _task_from_json(data: dict[str, Any] | None) -> Task | None:
    if data is None:
        return None
    return Task(question=data["question"], answer=data["answer"], data_source=data["data_source"],
                env_name=data["env_name"], task_id=data["task_id"],
                options=tuple(data["options"]) if data["options"] is not None else None,
                gt_boxes=tuple(tuple(float(v) for v in b) for b in data["gt_boxes"]),
                prompt=tuple(data["prompt"]) if data["prompt"] is not None else None,
                tools=tuple(data["tools"]) if data["tools"] is not None else None, extra=dict(data["extra"]))


def _turn_to_json(turn: Turn, store: _ImageStore) -> dict[str, Any]:
    return {"text": turn.text, "token_ids": turn.token_ids, "logprobs": turn.logprobs,
            "finish_reason": turn.finish_reason, "token_texts": turn.token_texts,
            "observation": _messages_to_json(turn.observation, store), "tool_calls": _jsonable(turn.tool_calls),
            "error": turn.error, "observation_dropped": turn.observation_dropped,
            "generate_s": turn.generate_s, "env_s": turn.env_s, "metrics": _jsonable(turn.metrics),
            "scripted_action": turn.scripted_action}


def _turn_from_json(data: dict[str, Any], images: _ImageLoader) -> Turn:
    fields = dict(data)
    fields["observation"] = _messages_from_json(data["observation"], images)
    return Turn(**fields)


def trajectory_to_json(traj: Trajectory, store: _ImageStore) -> dict[str, Any]:
    """The JSON object of one trajectory; images go to ``store`` and are referenced by key."""
    return {
        "format": FORMAT_VERSION, "task_id": traj.task_id, "group_id": traj.group_id, "env_id": traj.env_id,
        "episode_index": traj.episode_index, "seed": traj.seed, "max_total_tokens": traj.max_total_tokens,
        "prompt": _messages_to_json(traj.prompt, store), "turns": [_turn_to_json(t, store) for t in traj.turns],
        "token_ids": traj.token_ids, "loss_mask": traj.loss_mask, "logprobs": traj.logprobs,
        "image_grid_thw": [list(g) for g in traj.image_grid_thw], "images": [store.put(im) for im in traj.images],
        "task_images": [store.put(im) for im in traj.task_images], "reward": traj.reward,
        "reward_parts": _jsonable(traj.reward_parts), "end_reason": traj.end_reason,
        "terminated": traj.terminated, "truncated": traj.truncated, "zoom_boxes": _jsonable(traj.zoom_boxes),
        "task": _task_to_json(traj.task), "env_kwargs": _jsonable(traj.env_kwargs), "timings": traj.timings,
        "info": _jsonable(traj.info),
    }


def trajectory_from_json(data: dict[str, Any], images: _ImageLoader) -> Trajectory:
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported trajectory format {data.get('format')!r} (expected {FORMAT_VERSION})")
    return Trajectory(
        task_id=data["task_id"], group_id=data["group_id"], env_id=data["env_id"],
        episode_index=data["episode_index"], seed=data["seed"], max_total_tokens=data["max_total_tokens"],
        prompt=_messages_from_json(data["prompt"], images),
        turns=[_turn_from_json(t, images) for t in data["turns"]], token_ids=data["token_ids"],
        loss_mask=data["loss_mask"], logprobs=data["logprobs"],
        image_grid_thw=[tuple(g) for g in data["image_grid_thw"]], images=[images.get(k) for k in data["images"]],
        task_images=[images.get(k) for k in data["task_images"]], reward=data["reward"],
        reward_parts=data["reward_parts"], end_reason=data["end_reason"], terminated=data["terminated"],
        truncated=data["truncated"], zoom_boxes=data["zoom_boxes"], task=_task_from_json(data["task"]),
        env_kwargs=data["env_kwargs"], timings=data["timings"], info=data["info"],
    )


def save_trajectories(trajectories: Iterable[Trajectory], path: str | os.PathLike) -> Path:
    """Write trajectories to the directory ``path`` (JSONL + deduplicated PNG images); returns it.

    An existing ``trajectories.jsonl`` there is replaced; image files are shared and only added.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    store = _ImageStore(out / IMAGES_DIR)
    tmp = out / (JSONL_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for traj in trajectories:
            fh.write(json.dumps(trajectory_to_json(traj, store), ensure_ascii=False) + "\n")
    tmp.replace(out / JSONL_NAME)
    return out


def load_trajectories(path: str | os.PathLike) -> TrajectoryBatch:
    """Read what :func:`save_trajectories` wrote (without live contexts; see ``rebuild_context``)."""
    folder = Path(path)
    images = _ImageLoader(folder / IMAGES_DIR)
    with open(folder / JSONL_NAME, encoding="utf-8") as fh:
        return TrajectoryBatch(trajectory_from_json(json.loads(line), images) for line in fh if line.strip())


# ---------------------------------------------------------------------------------------------- replay
def messages_equal(a: Sequence[Message], b: Sequence[Message]) -> bool:
    """Equality of two message sequences: roles, texts and image pixels."""
    if len(a) != len(b):
        return False
    for ma, mb in zip(a, b, strict=True):
        if ma["role"] != mb["role"] or len(ma["content"]) != len(mb["content"]):
            return False
        for pa, pb in zip(ma["content"], mb["content"], strict=True):
            if pa["type"] != pb["type"]:
                return False
            if pa["type"] == "text" and pa["text"] != pb["text"]:
                return False
            if pa["type"] == "image" and not np.array_equal(pa["image"], pb["image"]):
                return False
    return True


@dataclass
class ReplayResult:
    """What the env answered when replayed: the first observation, one observation per recorded turn,
    how the episode ended, and the turns whose observation differs from the recording."""

    prompt: tuple[Message, ...]
    observations: list[tuple[Message, ...]]
    end_reason: str | None
    mismatches: list[str]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def replay(trajectory: Trajectory, env: Any = None) -> ReplayResult:
    """Re-run the env on the trajectory's recorded actions and compare what it answers.

    ``env`` defaults to a fresh ``gym.make(trajectory.env_id, **trajectory.env_kwargs)``; it is reset with
    the recorded seed and task. Rewards are deferred (no judge call). An episode truncated on the token
    budget replays up to its last recorded turn, whose dropped observation is compared too.
    """
    import gymnasium as gym

    own = env is None
    if own:
        kwargs = {**trajectory.env_kwargs, "defer_reward": True}
        env = gym.make(trajectory.env_id, disable_env_checker=True, **kwargs)
    try:
        obs, _ = env.reset(seed=trajectory.seed, options={"task": trajectory.rebuild_task()})
        prompt = tuple(obs["messages"])
        mismatches = [] if messages_equal(prompt, trajectory.prompt) else ["prompt"]
        observations, end_reason = [], None
        for i, turn in enumerate(trajectory.turns):
            obs, _, terminated, truncated, info = env.step(turn.action)
            observations.append(tuple(obs["messages"]))
            if not messages_equal(observations[-1], turn.observation):
                mismatches.append(f"turn {i}: observation differs")
            if terminated or truncated:
                end_reason = info.get("end_reason")
                if i != len(trajectory.turns) - 1:
                    mismatches.append(f"turn {i}: episode ended ({end_reason}) before the recording did")
                break
        if end_reason is not None and trajectory.end_reason not in ("token_budget", end_reason):
            mismatches.append(f"end reason {end_reason!r} != recorded {trajectory.end_reason!r}")
        return ReplayResult(prompt, observations, end_reason, mismatches)
    finally:
        if own:
            env.close()
