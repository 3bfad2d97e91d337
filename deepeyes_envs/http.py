"""Calls to OpenAI-compatible servers (the LLM judge, the endpoint player): one retry policy, one event loop.

Both clients send many requests at once to a server that may hiccup, so both work the same way: an
``openai.AsyncOpenAI`` client with its own retries off, every call retried by :class:`RetryPolicy` (tenacity:
exponential backoff with jitter, a 429's Retry-After honoured, only transient failures retried), at most
``concurrency`` calls in flight (an ``asyncio.Semaphore``), all on a private event loop on a daemon thread
(:class:`LoopThread`), so that blocking callers, threads and code inside a running loop (Jupyter) share it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Optional, TypeVar

import tenacity

T = TypeVar("T")


def is_retryable(err: BaseException) -> bool:
    """Connection errors and timeouts (no status), 408, 429 and 5xx are worth another try; other 4xx are not."""
    import openai

    if not isinstance(err, (openai.APIStatusError, openai.APIConnectionError)):
        return False
    status = getattr(err, "status_code", None)
    return status is None or status in (408, 429) or status >= 500


def retry_after_seconds(err: Optional[BaseException]) -> Optional[float]:
    """The Retry-After header of an HTTP error, in seconds (None when absent or not a number)."""
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` extra attempts after a transient failure; attempt k waits between half and all of
    ``min(backoff_max, backoff_base * 2**k)`` seconds, or the server's Retry-After (capped at ``backoff_max``)."""

    max_retries: int = 4
    backoff_base: float = 0.5
    backoff_max: float = 16.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_base < 0 or self.backoff_max < 0:
            raise ValueError(f"retry settings must not be negative: {self}")

    def delay(self, attempt: int, err: Optional[BaseException] = None, rng: Any = random) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based)."""
        cap = min(self.backoff_max, self.backoff_base * 2**attempt)
        delay = cap * (0.5 + 0.5 * rng.random())
        retry_after = retry_after_seconds(err)
        return max(delay, min(retry_after, self.backoff_max)) if retry_after is not None else delay

    async def call(self, fn: Callable[[], Awaitable[T]],
                   on_retry: Optional[Callable[[BaseException], None]] = None) -> T:
        """``await fn()``, retried on transient failures; the last failure is raised as it was."""
        def wait(state: tenacity.RetryCallState) -> float:
            return self.delay(state.attempt_number - 1, state.outcome.exception() if state.outcome else None)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                on_retry(state.outcome.exception())

        async def once() -> T:  # tenacity awaits only coroutine functions; fn may be a lambda returning an awaitable
            return await fn()

        retrying = tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(self.max_retries + 1), wait=wait,
                                          retry=tenacity.retry_if_exception(is_retryable), reraise=True,
                                          before_sleep=before_sleep)
        return await retrying(once)


class LoopThread:
    """An asyncio event loop running on a daemon thread; coroutines are submitted to it from any thread.

    Owners remember :attr:`pid` and make a new one after a fork (the thread does not survive it).
    """

    def __init__(self, name: str) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it (cancelled if the caller is interrupted)."""
        if threading.current_thread() is self.thread:
            raise RuntimeError(f"{self.thread.name}: a blocking call from the loop's own thread would deadlock")
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self, cleanup: Optional[Callable[[], Coroutine[Any, Any, Any]]] = None) -> None:
        """Run ``cleanup()`` on the loop (best effort: the process may be shutting down), then stop it."""
        if not self.loop.is_running():
            return
        if cleanup is not None:
            with contextlib.suppress(Exception):
                self.submit(cleanup()).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def async_openai_client(base_url: str, api_key: str, timeout: float) -> Any:
    """An ``openai.AsyncOpenAI`` client with its own retries off (:class:`RetryPolicy` retries), on aiohttp when
    it is installed (about half the CPU per request of httpx's pool at 64 connections)."""
    import openai

    http_client = None
    try:
        import aiohttp  # noqa: F401

        http_client = openai.DefaultAioHttpClient()
    except (ImportError, RuntimeError):
        pass
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0,
                              http_client=http_client)
