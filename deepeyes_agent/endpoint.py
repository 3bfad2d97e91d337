"""Play env episodes against any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API).

DeepEyes evaluated its checkpoints through a vLLM server and the OpenAI client; this module does the same
for every env and benchmark here, multi-turn: each turn sends the whole conversation (images as base64
PNG data URLs, so pixels arrive exactly), stops at ``</tool_call>`` and ``<|im_end|>``, steps the env
with the reply and appends the env's observation (crops included) to the conversation.

The OpenAI API drops the stop string from the reply, so a reply that stopped inside an open
``<tool_call>`` gets its ``</tool_call>`` back before the env parses it. Results come back as
:class:`~deepeyes_agent.trajectory.Trajectory` objects (text turns, no token ids), judged in one batch
at the end, so evaluation code treats local and remote policies alike.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import gymnasium as gym
import numpy as np
from PIL import Image

import deepeyes_envs  # noqa: F401 - registers the envs
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.trajectory import Trajectory, TrajectoryBatch, Turn
from deepeyes_envs.judges import JudgeSpec, make_judge
from deepeyes_envs.messages import Message, message_images
from deepeyes_envs.registry import env_id_for
from deepeyes_envs.rewards import EpisodeOutcome, score_episodes
from deepeyes_envs.tasks import Task

END_OF_TURN = "<|im_end|>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
GREEDY = SamplingParams(temperature=0.0)


def image_data_url(image: np.ndarray) -> str:
    """A full-resolution, lossless PNG data URL (thumbnails or JPEG would change what the model sees)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_message(msg: Message) -> dict[str, Any]:
    """One env message in the OpenAI chat format: text-only content as a string, else a list of parts."""
    parts = msg["content"]
    if all(p["type"] == "text" for p in parts):
        return {"role": msg["role"], "content": "".join(p["text"] for p in parts)}
    content = []
    for p in parts:
        if p["type"] == "text":
            content.append({"type": "text", "text": p["text"]})
        else:
            content.append({"type": "image_url", "image_url": {"url": image_data_url(p["image"])}})
    return {"role": msg["role"], "content": content}


def restore_tool_call_close(text: str, finish_reason: str) -> str:
    """Put back the ``</tool_call>`` the API stripped when generation stopped on it."""
    if finish_reason == "stop" and text.count(TOOL_CALL_OPEN) > text.count(TOOL_CALL_CLOSE):
        return text + TOOL_CALL_CLOSE
    return text


class EndpointPolicy:
    """A chat model behind an OpenAI-compatible API; thread-safe (one client shared by all episodes).

    ``model`` defaults to the first one ``GET /models`` lists (what vLLM serves). HTTP retries are the
    openai client's (``max_retries``, with backoff); a request the server rejects (4xx) ends only that
    episode, recorded as ``end_reason == "endpoint_error"``, while a server that stays unreachable raises.
    """

    def __init__(self, base_url: str, model: Optional[str] = None, *, api_key: Optional[str] = None,
                 timeout: float = 300.0, max_retries: int = 3, concurrency: int = 8):
        from openai import OpenAI

        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.client = OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY", timeout=timeout,
                             max_retries=max_retries)
        self._model = model
        self._lock = threading.Lock()
        self.concurrency = concurrency
        self.requests = 0

    @property
    def model(self) -> str:
        with self._lock:
            if self._model is None:
                models = self.client.models.list().data
                if not models:
                    raise RuntimeError(f"{self.base_url}/models lists no model")
                self._model = models[0].id
            return self._model

    def complete(self, messages: Sequence[Message], sampling: SamplingParams,
                 seed: Optional[int] = None) -> tuple[str, str]:
        """One assistant turn for the conversation: (text, finish_reason "stop" | "length")."""
        stop = list(dict.fromkeys([*sampling.stop, END_OF_TURN]))[:4]  # the API accepts at most 4
        kwargs: dict[str, Any] = {"temperature": sampling.temperature, "max_tokens": sampling.max_tokens,
                                  "stop": stop}
        if sampling.top_p < 1:
            kwargs["top_p"] = sampling.top_p
        if seed is not None and sampling.temperature > 0:
            kwargs["seed"] = seed
        response = self.client.chat.completions.create(
            model=self.model, messages=[to_openai_message(m) for m in messages], **kwargs)
        with self._lock:
            self.requests += 1
        choice = response.choices[0]
        finish = "length" if choice.finish_reason == "length" else "stop"
        text = restore_tool_call_close(choice.message.content or "", finish)
        return text, finish

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", "base_url": self.base_url, "model": self.model}


def run_endpoint_episodes(tasks: Sequence[Task], policy: EndpointPolicy, *, n_per_task: int = 1,
                          sampling: SamplingParams = GREEDY,
                          env_id: Optional[str] = None, env_kwargs: Optional[Mapping[str, Any]] = None,
                          judge: JudgeSpec = "rule", seed: int = 0) -> TrajectoryBatch:
    """Play ``n_per_task`` episodes per task through the endpoint, ``policy.concurrency`` at a time.

    Same contract as :func:`deepeyes_agent.rollout.loop.run_episodes`: trajectories in task order with the
    group's episodes together, ``group_id`` = the task's index, env reset with ``seed + episode number``,
    all rewards judged in one batch at the end.
    """
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be at least 1, got {n_per_task}")
    kwargs = dict(env_kwargs or {})
    plan = [(task, group, k) for group, task in enumerate(tasks) for k in range(n_per_task)]
    start = time.perf_counter()

    def play(i: int) -> tuple[Trajectory, Optional[EpisodeOutcome]]:
        task, group, k = plan[i]
        return _play_one(task, group, k, policy, sampling, env_id or env_id_for(task), kwargs, seed + i)

    with ThreadPoolExecutor(max_workers=policy.concurrency) as pool:
        played = list(pool.map(play, range(len(plan))))
    t0 = time.perf_counter()
    pending = [(traj, outcome) for traj, outcome in played if outcome is not None]
    if pending:
        scored = score_episodes([o for _, o in pending], make_judge(judge))
        for (traj, _), parts in zip(pending, scored, strict=True):
            traj.reward, traj.reward_parts = float(parts.score), parts.as_dict()
    timings = {"judge_s": time.perf_counter() - t0, "total_s": time.perf_counter() - start}
    return TrajectoryBatch([traj for traj, _ in played], timings)


def _play_one(task: Task, group: int, k: int, policy: EndpointPolicy, sampling: SamplingParams, env_id: str,
              env_kwargs: dict[str, Any], reset_seed: int) -> tuple[Trajectory, Optional[EpisodeOutcome]]:
    from openai import APIStatusError

    env = gym.make(env_id, disable_env_checker=True, **{**env_kwargs, "defer_reward": True})
    try:
        obs, _ = env.reset(seed=reset_seed, options={"task": task})
        raw = env.unwrapped
        prompt = tuple(obs["messages"])
        traj = Trajectory(task_id=task.task_id, group_id=group, env_id=env_id, prompt=prompt, episode_index=k,
                          seed=reset_seed, task=task, task_images=list(raw.images), env_kwargs=env_kwargs)
        conversation: list[Message] = list(prompt)
        outcome = None
        for turn_index in range(10_000):  # the env's max_turns ends the loop
            t0 = time.perf_counter()
            try:
                text, finish = policy.complete(conversation, sampling, seed=reset_seed * 1009 + turn_index)
            except APIStatusError as exc:
                if exc.status_code >= 500 or exc.status_code in (408, 429):
                    raise
                traj.end_reason, traj.truncated = "endpoint_error", True
                traj.info["error"] = f"HTTP {exc.status_code}: {exc.message}"
                traj.reward_parts = {"score": 0.0, "acc": 0.0, "answer": ""}
                break
            turn = Turn(text=text, token_ids=[], logprobs=[], finish_reason=finish,
                        generate_s=time.perf_counter() - t0)
            traj.turns.append(turn)
            t0 = time.perf_counter()
            obs, _, terminated, truncated, info = env.step({"text": text, "finish_reason": finish})
            turn.env_s = time.perf_counter() - t0
            turn.tool_calls = [{k: v for k, v in c.items() if k != "traceback"} for c in info.get("tool_calls", [])]
            turn.error = info.get("error")
            turn.observation = tuple(obs["messages"])
            conversation.append({"role": "assistant", "content": ({"type": "text", "text": text},)})
            conversation.extend(obs["messages"])
            if terminated or truncated:
                traj.end_reason, traj.terminated, traj.truncated = info.get("end_reason", ""), terminated, truncated
                traj.info["episode"] = info.get("episode", {})
                outcome = info.get("outcome")
                break
        traj.images = message_images(conversation)
        traj.zoom_boxes = [list(b) for b in raw.zoom_boxes]
        return traj, outcome
    finally:
        env.close()
