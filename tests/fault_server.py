"""A fault-injection server: a real OpenAI-compatible HTTP server on 127.0.0.1 that misbehaves on demand.

vLLM will not hang, drop connections or answer 429 when a test asks it to; this server does. It serves
``GET /v1/models`` and ``POST /v1/chat/completions``; each chat request takes the next action from
``plan`` (then ``default``):

* ``"1"``, ``"0"`` or any other text: answer with that text as the assistant message
* ``"status:500"`` / ``"status:429"`` / ``"status:<code>"``: an error response with that status
* ``"hang"``: never answer (until the server stops)
* ``"drop"``: close the connection without a response
* a callable ``(prompt: str) -> str``: answer with what it returns

``delay`` seconds pass before every answer. It counts requests and the most requests in flight at once.
In-process use (tests)::

    with FaultServer(default="1") as server:
        LLMJudge(base_url=server.base_url)

As a separate process (the benchmark), it prints ``LISTENING <port>`` when ready::

    python tests/fault_server.py --delay 0.05 --reply 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Optional, Union

from aiohttp import web

Action = Union[str, Callable[[str], str]]


class FaultServer:
    """An aiohttp app on its own thread and event loop; see the module docstring."""

    def __init__(
        self,
        default: Action = "1",
        plan: Optional[list[Action]] = None,
        delay: float = 0.0,
        model: str = "fault-injection-judge",
        port: int = 0,
    ) -> None:
        self.default = default
        self.plan: list[Action] = list(plan or [])
        self.delay = delay
        self.model = model
        self.port = port
        self.chat_requests = 0
        self.model_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompts: list[str] = []
        self.bodies: list[dict] = []
        self.record = True  # keep prompts and bodies for assertions (off in the benchmark)
        self._lock = threading.Lock()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._stopping: Optional[asyncio.Event] = None

    # ----- lifecycle --------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FaultServer:
        self._thread = threading.Thread(target=self._serve_forever, name="fault-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault-injection server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve_forever(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        await self.serve()
        await self._stopping.wait()
        assert self._runner is not None
        await self._runner.cleanup()

    async def serve(self) -> None:
        """Start listening on the current event loop (also used by the standalone process)."""
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()

    # ----- handlers ---------------------------------------------------------------------------------------
    def _next_action(self) -> Action:
        with self._lock:
            self.chat_requests += 1
            return self.plan.pop(0) if self.plan else self.default

    async def _models(self, request: web.Request) -> web.Response:
        self.model_requests += 1
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "t"}]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        action = self._next_action()
        prompt = body["messages"][-1]["content"]
        with self._lock:
            if self.record:
                self.prompts.append(prompt)
                self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self._act(request, action, prompt, body)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _act(self, request: web.Request, action: Action, prompt: str, body: dict) -> web.StreamResponse:
        if callable(action):
            return self._completion(action(prompt), body)
        if action == "hang":
            await asyncio.sleep(3600)
        if action == "drop":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # nothing more to send on a dead connection
        if action.startswith("status:"):
            status = int(action.split(":", 1)[1])
            headers = {"Retry-After": "0"} if status == 429 else None
            error = {"error": {"message": f"injected {status}", "type": "fault_injection", "code": status}}
            return web.json_response(error, status=status, headers=headers)
        return self._completion(action, body)

    def _completion(self, text: str, body: dict) -> web.Response:
        return web.json_response(
            {
                "id": "chatcmpl-fault",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before every answer")
    parser.add_argument("--reply", default="1", help="the action for every chat request")
    args = parser.parse_args()
    server = FaultServer(default=args.reply, delay=args.delay, port=args.port)
    server.record = False

    async def run() -> None:
        await server.serve()
        print(f"LISTENING {server.port}", flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
