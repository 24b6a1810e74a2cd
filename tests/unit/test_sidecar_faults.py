"""Fault handling in the sidecar: a client that leaves closes both worker hops (so vLLM aborts),
timeouts on the decode hop, and draining, against recording fake engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from pd_runtime.common.header_deadline import header_deadline_protocol
from pd_runtime.sidecar.app import SidecarSettings, create_app
from tests.servers import FakeEngine, sidecar_chain, wait_for

BODY = {"model": "m", "prompt": "hello", "max_tokens": 7}


@pytest.fixture(params=["our-protocol", "uvicorn"])
def chain(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeEngine, FakeEngine, str]]:
    """Served as our processes serve (the connection calls a request back when it is lost) and
    by plain uvicorn (a watcher task per request notices it)."""
    http = header_deadline_protocol(10.0) if request.param == "our-protocol" else "auto"
    with sidecar_chain(http, prefill_timeout_s=30.0, decode_timeout_s=1.0) as parts:
        yield parts


def test_client_leaving_during_prefill_closes_the_prefill_request(chain) -> None:
    sidecar, prefill, decode, prefiller = chain
    prefill.hang_s = 30
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{sidecar}/v1/completions",
            json=BODY,
            headers={"x-prefiller-host-port": prefiller},
            timeout=0.5,
        )
    assert wait_for(lambda: prefill.aborted == ["hang"]) < 3
    time.sleep(0.2)
    assert decode.requests == []  # no local-decode fallback for a client that is gone


def test_client_leaving_mid_stream_closes_the_decode_stream(chain) -> None:
    sidecar, prefill, decode, prefiller = chain
    decode.chunks, decode.chunk_delay_s = 1000, 0.05
    with httpx.stream(
        "POST",
        f"{sidecar}/v1/completions",
        json={**BODY, "stream": True},
        headers={"x-prefiller-host-port": prefiller},
        timeout=10,
    ) as response:
        assert next(response.iter_lines()).startswith("data: ")
    assert wait_for(lambda: decode.aborted == ["stream"]) < 3
    assert len(prefill.requests) == 1


def test_client_leaving_before_the_decode_answer_closes_the_decode_request(chain) -> None:
    sidecar, _, decode, _ = chain
    decode.hang_s = 0.9  # under the 1 s decode timeout: only the client leaving ends it early
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{sidecar}/v1/completions", json=BODY, timeout=0.3)
    assert wait_for(lambda: decode.aborted == ["hang"]) < 0.9


def test_a_hung_decode_worker_is_a_504_after_the_decode_timeout(chain) -> None:
    sidecar, _, decode, _ = chain
    decode.hang_s = 30
    started = time.monotonic()
    response = httpx.post(f"{sidecar}/v1/completions", json=BODY, timeout=10)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == 504
    assert time.monotonic() - started < 5
    wait_for(lambda: decode.aborted == ["hang"])


def test_draining_sidecar_reports_503_and_refuses_new_work() -> None:
    app = create_app(
        SidecarSettings(decode_url="http://127.0.0.1:1", allowed_prefillers=frozenset())
    )
    app.state.lifecycle.draining = True

    async def calls() -> tuple[httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.get("/health"), await c.post("/v1/completions", json=BODY)

    health, generate = asyncio.run(calls())
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    assert generate.status_code == 503
