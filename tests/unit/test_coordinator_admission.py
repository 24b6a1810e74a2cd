"""Admission control: the controller on its own (asyncio), then the coordinator shedding load in
front of a slow fake sidecar (a fake: it hangs on purpose so that requests pile up)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from pd_runtime.coordinator.admission import AdmissionController
from pd_runtime.coordinator.app import create_app
from pd_runtime.errors import RateLimitError
from tests.servers import FakeEngine, serve, until
from tests.unit.test_coordinator_edge import config_for


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_slots_are_taken_then_queued_requests_get_them_by_priority() -> None:
    admission = AdmissionController(max_in_flight=1, max_queued=3, queue_timeout_s=5)
    await admission.acquire()
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await admission.acquire(priority)
        order.append(name)

    tasks = [asyncio.create_task(wait(n, p)) for n, p in (("low", 0), ("high", 9), ("mid", 5))]
    await settle()
    assert (admission.in_flight, admission.queued) == (1, 3)
    for _ in range(3):
        admission.release()
        await settle()
    assert order == ["high", "mid", "low"]
    await asyncio.gather(*tasks)
    admission.release()
    assert (admission.in_flight, admission.queued) == (0, 0)


async def test_equal_priorities_are_served_first_come_first_served() -> None:
    admission = AdmissionController(max_in_flight=1, max_queued=3, queue_timeout_s=5)
    await admission.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        await admission.acquire()
        order.append(i)
        admission.release()

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await settle()
    admission.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2] and admission.in_flight == 0


async def test_a_full_queue_rejects_at_once_unless_a_lower_priority_request_can_be_displaced() -> (
    None
):
    admission = AdmissionController(max_in_flight=1, max_queued=2, queue_timeout_s=5)
    await admission.acquire()
    low_old = asyncio.create_task(admission.acquire(1))
    low_new = asyncio.create_task(admission.acquire(1))
    await settle()
    started = time.monotonic()
    with pytest.raises(RateLimitError) as full:
        await admission.acquire(1)  # same priority: nobody to displace
    assert full.value.reason == "queue_full" and time.monotonic() - started < 0.1
    assert full.value.headers == {"Retry-After": "5"}

    high = asyncio.create_task(admission.acquire(2))
    await settle()
    with pytest.raises(RateLimitError) as displaced:
        await low_new  # the newest of the lowest priority goes first
    assert displaced.value.reason == "displaced"
    assert not low_old.done() and admission.queued == 2

    admission.release()
    await high
    assert not low_old.done()
    admission.release()
    await low_old
    admission.release()
    assert admission.in_flight == 0


async def test_a_queued_request_times_out_with_a_429() -> None:
    admission = AdmissionController(max_in_flight=1, max_queued=1, queue_timeout_s=0.05)
    await admission.acquire()
    with pytest.raises(RateLimitError) as timed_out:
        await admission.acquire()
    assert timed_out.value.reason == "queue_timeout"
    assert timed_out.value.headers == {"Retry-After": "1"}
    assert (admission.in_flight, admission.queued) == (1, 0)


async def test_no_queue_means_reject_at_once() -> None:
    admission = AdmissionController(max_in_flight=1, max_queued=0, queue_timeout_s=1)
    await admission.acquire()
    with pytest.raises(RateLimitError):
        await admission.acquire(100)


async def test_a_cancelled_waiter_leaks_no_slot() -> None:
    admission = AdmissionController(max_in_flight=1, max_queued=2, queue_timeout_s=5)
    await admission.acquire()
    queued = asyncio.create_task(admission.acquire())
    await settle()
    queued.cancel()
    await settle()
    assert admission.queued == 0
    admission.release()
    assert admission.in_flight == 0

    # Cancelled after the slot was handed over but before it ran: the slot is passed on.
    await admission.acquire()
    granted = asyncio.create_task(admission.acquire())
    await settle()
    admission.release()  # hands the slot to `granted`
    granted.cancel()
    await asyncio.gather(granted, return_exceptions=True)
    assert (admission.in_flight, admission.queued) == (0, 0)


# --- through the coordinator ------------------------------------------------------------------


@pytest.fixture
def slow_gateway() -> Iterator[Callable[..., tuple[str, Any]]]:
    """A factory: (url, app) of a coordinator with the given admission settings in front of a
    fake sidecar that takes 0.5 s per request."""
    fake = FakeEngine("sidecar-0", hang_s=0.5)
    stack: list[Any] = []
    with serve(fake.app()) as sidecar_url:

        def start(**overrides: Any) -> tuple[str, Any]:
            app = create_app(config_for(sidecar_url, **overrides))
            server = serve(app)
            stack.append(server)
            return server.__enter__(), app

        try:
            yield start
        finally:
            for server in stack:
                server.__exit__(None, None, None)


async def test_the_coordinator_sheds_load_by_priority_with_429_and_retry_after(
    slow_gateway,
) -> None:
    url, app = slow_gateway(max_in_flight=1, max_queued=1, queue_timeout_s=5)
    admission = app.state.admission
    body = {"model": "tiny", "prompt": "x"}

    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        def post(priority: int) -> asyncio.Task[httpx.Response]:
            headers = {"x-request-priority": str(priority)}
            return asyncio.create_task(client.post("/v1/completions", json=body, headers=headers))

        first = post(0)
        await until(lambda: admission.in_flight == 1)
        queued_low = post(0)
        await until(lambda: admission.queued == 1)

        started = time.monotonic()
        full = await post(0)
        assert full.status_code == 429 and time.monotonic() - started < 0.4
        assert full.headers["retry-after"] == "5"
        assert full.json()["error"]["type"] == "RateLimitError"

        queued_high = post(3)
        displaced = await queued_low
        assert displaced.status_code == 429 and "higher-priority" in displaced.text
        assert (await first).status_code == 200
        assert (await queued_high).status_code == 200

        metrics = (await client.get("/metrics")).text
    assert 'pd_coordinator_rejected_total{reason="queue_full"} 1.0' in metrics
    assert 'pd_coordinator_rejected_total{reason="displaced"} 1.0' in metrics
    assert 'pd_coordinator_errors_total{type="RateLimitError"} 2.0' in metrics
    await until(lambda: admission.in_flight == 0)


async def test_a_request_queued_too_long_gets_a_429(slow_gateway) -> None:
    url, app = slow_gateway(max_in_flight=1, max_queued=4, queue_timeout_s=0.1)
    body = {"model": "tiny", "prompt": "x"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        first = asyncio.create_task(client.post("/v1/completions", json=body))
        await until(lambda: app.state.admission.in_flight == 1)
        late = await client.post("/v1/completions", json=body)
        assert late.status_code == 429 and late.headers["retry-after"] == "1"
        assert (await first).status_code == 200
        # Other paths are not admission-controlled.
        assert (await client.get("/v1/models")).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'pd_coordinator_rejected_total{reason="queue_timeout"} 1.0' in metrics
    await until(lambda: app.state.admission.in_flight == 0)


async def test_a_streamed_answer_holds_its_slot_until_its_last_byte(slow_gateway) -> None:
    url, app = slow_gateway(max_in_flight=2)
    body = {"model": "tiny", "prompt": "x", "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert app.state.admission.in_flight == 1
            chunks = [chunk async for chunk in response.aiter_bytes()]
        assert b"[DONE]" in b"".join(chunks)
        metrics = (await client.get("/metrics")).text
    assert "pd_coordinator_admitted " in metrics
    await until(lambda: app.state.admission.in_flight == 0)


async def test_a_client_that_leaves_the_queue_gives_its_place_up_at_once(slow_gateway) -> None:
    url, app = slow_gateway(max_in_flight=1, max_queued=4, queue_timeout_s=30)
    admission = app.state.admission
    body = {"model": "tiny", "prompt": "x"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        first = asyncio.create_task(client.post("/v1/completions", json=body))
        await until(lambda: admission.in_flight == 1)
        leaver = asyncio.create_task(client.post("/v1/completions", json=body))
        await until(lambda: admission.queued == 1)
        leaver.cancel()  # closes its connection while queued
        await asyncio.gather(leaver, return_exceptions=True)
        # Seen at once, not after the 30 s queue timeout.
        await until(lambda: admission.queued == 0, timeout_s=2)
        # The next queued request is served with its body intact (replayed from the buffer).
        stayer = asyncio.create_task(
            client.post("/v1/completions", json={**body, "prompt": "stays"})
        )
        assert (await first).status_code == 200
        answer = await stayer
        assert answer.status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 'pd_coordinator_rejected_total{reason="client_gone"} 1.0' in metrics
    await until(lambda: admission.in_flight == 0)


async def test_a_queued_oversized_body_still_gets_its_413(slow_gateway) -> None:
    url, app = slow_gateway(max_in_flight=1, max_queued=4, queue_timeout_s=30, max_body_bytes=2000)
    body = {"model": "tiny", "prompt": "x"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        first = asyncio.create_task(client.post("/v1/completions", json=body))
        await until(lambda: app.state.admission.in_flight == 1)

        async def chunks():  # streamed in (no Content-Length), 3 x 1 kB
            for _ in range(3):
                yield b" " * 1000

        big = await client.post(
            "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert big.status_code == 413
        assert (await first).status_code == 200
    await until(lambda: app.state.admission.in_flight == 0)
