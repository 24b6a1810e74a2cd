"""The upstream hop (``pd_runtime.common.upstream`` and ``.streaming``, aiohttp underneath) keeps the proxy semantics the
coordinator and sidecar rely on: headers pass as the client sent them (nothing made up), redirects
are passed back rather than followed, duplicate response headers are merged, a finished stream
gives its connection back for reuse, and failures map to the kinds failover keys on. Upstreams
here are small recording fakes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from pd_runtime.common.streaming import open_upstream
from pd_runtime.common.upstream import failure_kind, make_client, upstream_timeout
from pd_runtime.errors import UpstreamError
from pd_runtime.sidecar.app import SidecarSettings, create_app
from tests.servers import free_port, serve, until


class Recorder:
    """A fake worker that records each request's headers, body and client port."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.left = 0  # /hang requests whose client went away

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.body()
            assert request.client is not None
            self.seen.append(
                {"headers": dict(request.headers), "body": body, "port": request.client.port}
            )

            async def sse() -> Any:
                for i in range(3):
                    yield f"data: {json.dumps({'i': i})}\n\n".encode()
                yield b"data: [DONE]\n\n"

            response = StreamingResponse(sse(), media_type="text/event-stream")
            response.headers.append("x-multi", "a")
            response.headers.append("x-multi", "b")
            return response

        @app.get("/moved")
        async def moved() -> Response:
            return Response(status_code=307, headers={"location": "/v1/models"})

        @app.get("/v1/models")
        async def models() -> Response:
            return Response(b'{"data": []}', media_type="application/json")

        @app.post("/hang")
        async def hang(request: Request) -> Response:
            for _ in range(3000):  # answers nothing until its client goes (30 s at most)
                if await request.is_disconnected():
                    self.left += 1
                    break
                await asyncio.sleep(0.01)
            return Response()

        return app


@pytest.fixture
def proxied() -> Iterator[tuple[str, Recorder]]:
    """A real sidecar (no prefillers: a plain proxy) in front of a :class:`Recorder`."""
    recorder = Recorder()
    with serve(recorder.app()) as worker_url:
        settings = SidecarSettings(decode_url=worker_url, allowed_prefillers=frozenset())
        with serve(create_app(settings)) as sidecar_url:
            yield sidecar_url, recorder


def test_request_headers_and_body_pass_unchanged_and_nothing_is_made_up(proxied) -> None:
    sidecar, recorder = proxied
    raw = b'{"model": "m", "prompt": "hi", "stream": true}'
    # No Content-Type from the client: none must reach the worker (aiohttp would add
    # application/octet-stream by default, which FastAPI servers refuse to parse as JSON).
    response = httpx.post(
        f"{sidecar}/v1/completions",
        content=raw,
        headers={"x-request-id": "r-7", "accept-encoding": "br", "cookie": "session=1"},
    )
    assert response.status_code == 200
    seen = recorder.seen[-1]
    assert seen["body"] == raw
    assert "content-type" not in seen["headers"]
    assert seen["headers"]["x-request-id"] == "r-7"
    assert seen["headers"]["content-length"] == str(len(raw))
    assert seen["headers"]["cookie"] == "session=1"  # the client's own, passed on
    assert "br" not in seen["headers"].get("accept-encoding", "")  # the client's is not passed on


def test_stream_is_passed_byte_for_byte_with_merged_duplicate_headers(proxied) -> None:
    sidecar, _ = proxied
    with httpx.stream(
        "POST", f"{sidecar}/v1/completions", json={"model": "m", "prompt": "hi"}
    ) as response:
        body = b"".join(response.iter_raw())
    assert body == b'data: {"i": 0}\n\ndata: {"i": 1}\n\ndata: {"i": 2}\n\ndata: [DONE]\n\n'
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers.get_list("x-multi") == ["a, b"]


def test_a_finished_stream_gives_its_connection_back_for_reuse(proxied) -> None:
    sidecar, recorder = proxied
    for _ in range(3):
        response = httpx.post(f"{sidecar}/v1/completions", json={"model": "m", "prompt": "x"})
        assert response.text.endswith("data: [DONE]\n\n")
    assert len({seen["port"] for seen in recorder.seen}) == 1


def test_redirects_are_passed_back_not_followed(proxied) -> None:
    sidecar, _ = proxied
    response = httpx.get(f"{sidecar}/moved")
    assert response.status_code == 307
    assert response.headers["location"] == "/v1/models"


async def test_failures_map_to_the_kinds_failover_keys_on() -> None:
    client = make_client(connect_timeout_s=2.0, read_timeout_s=0.3)
    try:
        dead = f"http://127.0.0.1:{free_port()}/v1/completions"
        with pytest.raises(UpstreamError) as refused:
            await open_upstream(client, dead, headers={}, content=b"{}")
        assert refused.value.status_code == 502
        assert failure_kind(refused.value.__cause__) == "connect_error"

        recorder = Recorder()
        with serve(recorder.app()) as url:
            with pytest.raises(UpstreamError) as read_timeout:
                await open_upstream(client, f"{url}/hang", headers={}, content=b"{}")
            assert read_timeout.value.status_code == 504
            assert failure_kind(read_timeout.value.__cause__) == "timeout"
            await until(lambda: recorder.left == 1)  # the timed-out request was closed

            with pytest.raises(UpstreamError) as first_byte:
                await open_upstream(
                    client,
                    f"{url}/hang",
                    headers={},
                    content=b"{}",
                    timeout=upstream_timeout(30.0, 2.0),
                    first_byte_timeout_s=0.2,
                )
            assert first_byte.value.status_code == 504
            assert failure_kind(first_byte.value.__cause__) == "timeout"
            await until(lambda: recorder.left == 2)
    finally:
        await client.aclose()
    assert failure_kind(ValueError("not a transport error")) is None
