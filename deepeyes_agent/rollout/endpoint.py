"""Play env episodes against any OpenAI-compatible chat endpoint (vLLM, SGLang, a hosted API).

DeepEyes evaluated its checkpoints through a vLLM server and the OpenAI client; this module does the same
for every env and benchmark here, multi-turn: each turn sends the whole conversation (images as base64
PNG data URLs, so pixels arrive exactly), stops at ``</tool_call>`` and ``<|im_end|>``, steps the env
with the reply and appends the env's observation (crops included) to the conversation.

The OpenAI API drops the stop string from the reply, so a reply that stopped on ``</tool_call>`` (as vLLM's
``stop_reason`` says, or, from servers that do not say, inside an open ``<tool_call>``) gets it back before the
env parses it. Results come back as
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
from deepeyes_agent.rollout.loop import end_trajectory, judge_trajectories, open_episode, step_turn
from deepeyes_agent.rollout.seeding import derive_seed
from deepeyes_agent.rollout.trajectory import Trajectory, TrajectoryBatch
from deepeyes_envs.data.tasks import Task
from deepeyes_envs.http import LoopThread, RetryPolicy, async_openai_client, is_retryable
from deepeyes_envs.judges import JudgeSpec
from deepeyes_envs.messages import IM_END, Message, message_images
from deepeyes_envs.registry import env_id_for
from deepeyes_envs.rewards import EpisodeOutcome

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


def restore_tool_call_close(text: str, finish_reason: str, stop_reason: Any = None) -> str:
    """Put back the ``</tool_call>`` the API stripped when generation stopped on it.

    vLLM says which stop string ended the reply (``stop_reason``, beside ``finish_reason``): then the
    tag goes back exactly when it was generated, also after a malformed call with no ``<tool_call>`` before it,
    which the env must see as the model wrote it (an unbalanced-tags error, as in the local loop, rather than
    an answer-less reply). Other servers say nothing, and an open ``<tool_call>`` is the best evidence there is.
    """
    if finish_reason != "stop":
        return text
    if isinstance(stop_reason, str):
        return text + TOOL_CALL_CLOSE if stop_reason == TOOL_CALL_CLOSE else text
    if text.count(TOOL_CALL_OPEN) > text.count(TOOL_CALL_CLOSE):
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
        stop_reason = getattr(choice, "stop_reason", None)  # vLLM's extension of the OpenAI schema
        return restore_tool_call_close(choice.message.content or "", finish, stop_reason), finish

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
    all rewards judged in one batch at the end, and a task the env cannot reset on (a bad row) ended at once as
    ``end_reason == "bad_task"`` without stopping the others. Episodes start, step and end through the loop's
    own functions (``open_episode``, ``step_turn``, ``end_trajectory``), so the two players differ only in where
    the text comes from.
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
    judge_trajectories(played, judge)
    timings = {"judge_s": time.perf_counter() - t0, "total_s": time.perf_counter() - start}
    return TrajectoryBatch([traj for traj, _ in played], timings)


async def _play_one(task: Task, group: int, k: int, policy: EndpointPolicy, sampling: SamplingParams, env_id: str,
                    env_kwargs: dict[str, Any], reset_seed: int) -> tuple[Trajectory, Optional[EpisodeOutcome]]:
    from openai import APIStatusError

    env = gym.make(env_id, disable_env_checker=True, **{**env_kwargs, "defer_reward": True})
    try:
        obs, traj = open_episode(env, task, group=group, k=k, name=env_id, reset_seed=reset_seed,
                                 env_kwargs=env_kwargs)
        if obs is None:  # a bad row: no request is sent
            return traj, None
        conversation: list[Message] = list(traj.prompt)
        outcome = None
        for turn_index in range(10_000):  # the env's max_turns ends the loop
            t0 = time.perf_counter()
            try:
                text, finish = await policy.complete(conversation, sampling, seed=derive_seed(reset_seed, turn_index))
            except APIStatusError as exc:
                if is_retryable(exc):
                    raise
                traj.end_reason, traj.truncated = "endpoint_error", True
                traj.info["error"] = f"HTTP {exc.status_code}: {exc.message}"
                traj.reward_parts = {"score": 0.0, "acc": 0.0, "answer": ""}
                break
            step = step_turn(env, traj, text, finish, generate_s=time.perf_counter() - t0)
            said = step.played if step.played is not None else text  # a control's turn is what the model "said"
            conversation.append({"role": "assistant", "content": ({"type": "text", "text": said},)})
            conversation.extend(step.observation)
            if step.terminated or step.truncated:
                outcome = end_trajectory(traj, step.info.get("end_reason", ""), step.terminated, step.truncated,
                                         step.info, step.reward)
                break
        traj.images = message_images(conversation)
        return traj, outcome
    finally:
        env.close()
