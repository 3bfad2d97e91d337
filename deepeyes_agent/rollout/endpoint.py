"""Play env episodes against any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API).

DeepEyes evaluated its checkpoints through a vLLM server and the OpenAI client; this module does the same
for every env and benchmark here, multi-turn: each turn sends the whole conversation (images as base64
PNG data URLs, so pixels arrive exactly), stops at ``</tool_call>`` and ``<|im_end|>``, steps the env
with the reply and appends the env's observation (crops included) to the conversation.

The OpenAI API drops the stop string from the reply, so a reply that stopped inside an open
``<tool_call>`` gets its ``</tool_call>`` back before the env parses it. Results come back as
:class:`~deepeyes_agent.rollout.trajectory.Trajectory` objects (text turns, no token ids), judged in one batch
at the end, so evaluation code treats local and remote policies alike.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import gymnasium as gym
import numpy as np
from PIL import Image

import deepeyes_envs  # noqa: F401 - registers the envs
from deepeyes_agent.rollout.engine import SamplingParams
from deepeyes_agent.rollout.trajectory import Trajectory, TrajectoryBatch, Turn
from deepeyes_envs.http import LoopThread, RetryPolicy, async_openai_client, is_retryable
from deepeyes_envs.judges import JudgeSpec, make_judge
from deepeyes_envs.messages import IM_END, Message, message_images
from deepeyes_envs.registry import env_id_for
from deepeyes_envs.rewards import EpisodeOutcome, score_episodes
from deepeyes_envs.tasks import Task

END_OF_TURN = IM_END
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
GREEDY = SamplingParams(temperature=0.0)
ENDPOINT_RETRY = RetryPolicy(max_retries=3)


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
    """A chat model behind an OpenAI-compatible API, shared by all episodes of a run.

    Requests go the way the LLM judge's do (``deepeyes_envs.http``): an async client on a private event loop,
    at most ``concurrency`` in flight, transient failures (connection, timeout, 408, 429, 5xx) retried with
    exponential backoff. ``model`` defaults to the first one ``GET /models`` lists (what vLLM serves). A
    request the server rejects (other 4xx) ends only that episode, recorded as ``end_reason ==
    "endpoint_error"``, while a server that stays unreachable raises.
    """

    def __init__(self, base_url: str, model: Optional[str] = None, *, api_key: Optional[str] = None,
                 timeout: float = 300.0, retry: RetryPolicy = ENDPOINT_RETRY, concurrency: int = 8):
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout, self.retry, self.concurrency = api_key or "EMPTY", timeout, retry, concurrency
        self._model = model
        self._loop: Optional[LoopThread] = None
        self._client: Any = None
        self._semaphore: Optional[asyncio.Semaphore] = None
        self.requests = 0

    def run(self, coro: Any) -> Any:
        """Run a coroutine of this policy on its event loop (started at first use, again after a fork)."""
        if self._loop is None or self._loop.pid != os.getpid():
            self._loop, self._client = LoopThread("deepeyes-endpoint-loop"), None
        return self._loop.run(coro)

    def _ready(self) -> None:
        """Create the client and the semaphore on the loop that uses them."""
        if self._client is None:
            self._client = async_openai_client(self.base_url, self.api_key, self.timeout)
            self._semaphore = asyncio.Semaphore(self.concurrency)

    async def model(self) -> str:
        self._ready()
        if self._model is None:
            page = await self.retry.call(lambda: self._client.models.list())
            if not page.data:
                raise RuntimeError(f"{self.base_url}/models lists no model")
            self._model = page.data[0].id
        return self._model

    async def complete(self, messages: Sequence[Message], sampling: SamplingParams,
                       seed: Optional[int] = None) -> tuple[str, str]:
        """One assistant turn for the conversation: (text, finish_reason "stop" | "length")."""
        model = await self.model()
        stop = list(dict.fromkeys([*sampling.stop, END_OF_TURN]))[:4]  # the API accepts at most 4
        kwargs: dict[str, Any] = {"temperature": sampling.temperature, "max_tokens": sampling.max_tokens,
                                  "stop": stop}
        if sampling.top_p < 1:
            kwargs["top_p"] = sampling.top_p
        if seed is not None and sampling.temperature > 0:
            kwargs["seed"] = seed
        body = [to_openai_message(m) for m in messages]
        async with self._semaphore:
            response = await self.retry.call(
                lambda: self._client.chat.completions.create(model=model, messages=body, **kwargs))
        self.requests += 1
        choice = response.choices[0]
        finish = "length" if choice.finish_reason == "length" else "stop"
        return restore_tool_call_close(choice.message.content or "", finish), finish

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", "base_url": self.base_url, "model": self.run(self.model())}

    def close(self) -> None:
        if self._loop is not None and self._loop.pid == os.getpid():
            client, self._client = self._client, None
            self._loop.stop((lambda: client.close()) if client is not None else None)
        self._loop = None


def run_endpoint_episodes(tasks: Sequence[Task], policy: EndpointPolicy, *, n_per_task: int = 1,
                          sampling: SamplingParams = GREEDY,
                          env_id: Optional[str] = None, env_kwargs: Optional[Mapping[str, Any]] = None,
                          judge: JudgeSpec = "rule", seed: int = 0) -> TrajectoryBatch:
    """Play ``n_per_task`` episodes per task through the endpoint, ``policy.concurrency`` requests at a time.

    Same contract as :func:`deepeyes_agent.rollout.loop.run_episodes`: trajectories in task order with the
    group's episodes together, ``group_id`` = the task's index, env reset with ``seed + episode number``,
    all rewards judged in one batch at the end.
    """
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be at least 1, got {n_per_task}")
    kwargs = dict(env_kwargs or {})
    plan = [(task, group, k) for group, task in enumerate(tasks) for k in range(n_per_task)]
    start = time.perf_counter()

    async def play_all() -> list[tuple[Trajectory, Optional[EpisodeOutcome]]]:
        return list(await asyncio.gather(*(
            _play_one(task, group, k, policy, sampling, env_id or env_id_for(task), kwargs, seed + i)
            for i, (task, group, k) in enumerate(plan))))

    played = policy.run(play_all())
    t0 = time.perf_counter()
    pending = [(traj, outcome) for traj, outcome in played if outcome is not None]
    if pending:
        scored = score_episodes([o for _, o in pending], make_judge(judge))
        for (traj, _), parts in zip(pending, scored, strict=True):
            traj.reward, traj.reward_parts = float(parts.score), parts.as_dict()
    timings = {"judge_s": time.perf_counter() - t0, "total_s": time.perf_counter() - start}
    return TrajectoryBatch([traj for traj, _ in played], timings)


async def _play_one(task: Task, group: int, k: int, policy: EndpointPolicy, sampling: SamplingParams, env_id: str,
                    env_kwargs: dict[str, Any], reset_seed: int) -> tuple[Trajectory, Optional[EpisodeOutcome]]:
    from openai import APIStatusError

    env = gym.make(env_id, disable_env_checker=True, **{**env_kwargs, "defer_reward": True})
    try:
        obs, _ = env.reset(seed=reset_seed, options={"task": task})
        prompt = tuple(obs["messages"])
        traj = Trajectory(task_id=task.task_id, group_id=group, env_id=env_id, prompt=prompt, episode_index=k,
                          seed=reset_seed, task=task, task_images=message_images(prompt), env_kwargs=env_kwargs)
        conversation: list[Message] = list(prompt)
        outcome = None
        for turn_index in range(10_000):  # the env's max_turns ends the loop
            t0 = time.perf_counter()
            try:
                text, finish = await policy.complete(conversation, sampling, seed=reset_seed * 1009 + turn_index)
            except APIStatusError as exc:
                if is_retryable(exc):
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
            turn.tool_calls = list(info.get("tool_calls", []))
            traj.zoom_boxes.extend(list(c["bbox_original"]) for c in turn.tool_calls if "bbox_original" in c)
            turn.error = info.get("error")
            turn.observation = tuple(obs["messages"])
            conversation.append({"role": "assistant", "content": ({"type": "text", "text": text},)})
            conversation.extend(obs["messages"])
            if terminated or truncated:
                traj.end_reason, traj.terminated, traj.truncated = info.get("end_reason", ""), terminated, truncated
                traj.info["episode_summary"] = info.get("episode_summary", {})
                outcome = info.get("outcome")
                break
        traj.images = message_images(conversation)
        return traj, outcome
    finally:
        env.close()
