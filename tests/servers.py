"""Test helpers: run an ASGI app on a real loopback port in a background thread, and a *recording
fake* vLLM server (named as a fake: it stands in where a real engine cannot show the behaviour,
such as a prefill that fails on purpose or a stream that breaks)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse


def wait_for(
    condition: Callable[[], object],
    timeout_s: float = 5.0,
    what: str = "condition",
    poll_s: float = 0.01,
) -> float:
    """Poll until ``condition()`` is truthy; return the seconds it took, fail after ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(poll_s)
    return time.monotonic() - started


async def until(condition: Callable[[], object], timeout_s: float = 10.0) -> None:
    """``wait_for`` for async tests: polls without blocking the event loop."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def answers_health(url: str, timeout_s: float = 2.0) -> bool:
    """Whether ``url``/health answers 200 now (a refused or timed-out connection is a no)."""
    try:
        return httpx.get(f"{url}/health", timeout=timeout_s, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: FastAPI, port: int | None = None, http: Any = "auto") -> Iterator[str]:
    """``app`` on a uvicorn thread; ``http``: uvicorn's protocol (our servers run
    ``common.header_deadline``'s, which also gives requests their disconnect hook)."""
    port = port or free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", http=http
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class FakeEngine:
    """Records every request; answers like vLLM's OpenAI server (non-streaming and SSE)."""

    name: str
    fail_with: int | None = None  # answer every generation request with this status
    hang_s: float = 0.0
    break_stream_after: int | None = None  # raise after N SSE chunks
    chunks: int = 3  # SSE chunks per streamed answer
    chunk_delay_s: float = 0.01  # pause after each SSE chunk
    #: Like vLLM with stream_options.include_usage: a last chunk with usage (prompt tokens =
    #: whitespace words of the prompt or messages, completion tokens = chunks sent).
    stream_usage: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: What the client cut short, like vLLM aborting on a disconnect: "hang" (it left while the
    #: engine was still working on the answer, before any header) or "stream" (it left mid-SSE).
    aborted: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        async def generate(request: Request) -> Response:
            body = json.loads(await request.body())
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            if self.hang_s and await self._client_left(request, self.hang_s):
                self.aborted.append("hang")
                return Response(status_code=499)
            if self.fail_with:
                return JSONResponse({"error": {"message": "boom"}}, status_code=self.fail_with)
            params = {
                "remote_engine_id": f"{self.name}-engine",
                "remote_block_ids": [1, 2],
                "remote_host": "127.0.0.1",
                "remote_port": 5600,
            }
            if body.get("stream"):
                return StreamingResponse(self._sse(body), media_type="text/event-stream")
            return JSONResponse(
                {
                    "id": "x",
                    "object": "text_completion",
                    "served_by": self.name,
                    "choices": [{"index": 0, "text": f"{self.name}!"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                    "kv_transfer_params": params,
                }
            )

        for path in ("/v1/completions", "/v1/chat/completions"):
            app.add_api_route(path, generate, methods=["POST"])

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            return JSONResponse({"object": "list", "data": [{"id": "m", "served_by": self.name}]})

        return app

    @staticmethod
    async def _client_left(request: Request, wait_s: float) -> bool:
        """Wait ``wait_s``, watching for a disconnect as vLLM's ``with_cancellation`` does."""

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        try:
            await asyncio.wait_for(disconnected(), wait_s)
        except TimeoutError:
            return False
        return True

    async def _sse(self, body: dict[str, Any]):  # type: ignore[no-untyped-def]
        done = False
        try:
            for i in range(self.chunks):
                if self.break_stream_after is not None and i >= self.break_stream_after:
                    done = True
                    raise RuntimeError("fake engine breaks the stream on purpose")
                chunk = {"choices": [{"index": 0, "text": f"t{i}"}], "served_by": self.name}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(self.chunk_delay_s)
            if self.stream_usage and (body.get("stream_options") or {}).get("include_usage"):
                text = body.get("prompt") or " ".join(
                    m["content"] for m in body.get("messages") or []
                )
                usage = {"prompt_tokens": len(str(text).split()), "completion_tokens": self.chunks}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                self.aborted.append("stream")


@contextmanager
def sidecar_chain(
    http: Any = "auto", **settings: Any
) -> Iterator[tuple[str, FakeEngine, FakeEngine, str]]:
    """A real sidecar in front of a fake decode engine, trusting one fake prefill engine, served
    with uvicorn protocol ``http``. Yields ``(sidecar_url, prefill, decode, prefiller HOST:PORT)``."""
    from pd_runtime.sidecar.app import SidecarSettings, create_app

    prefill, decode = FakeEngine("prefill"), FakeEngine("decode")
    with serve(prefill.app()) as prefill_url, serve(decode.app()) as decode_url:
        prefiller = prefill_url.removeprefix("http://")
        config = SidecarSettings(
            decode_url=decode_url, allowed_prefillers=frozenset({prefiller}), **settings
        )
        with serve(create_app(config), http=http) as sidecar_url:
            yield sidecar_url, prefill, decode, prefiller
