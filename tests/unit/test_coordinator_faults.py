"""Fault handling in the coordinator: decode failover, timeouts, client disconnects and graceful
shutdown, against recording fake sidecars (fakes: they refuse, hang, fail and break on demand)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from pd_runtime.common.header_deadline import header_deadline_protocol
from pd_runtime.common.server import DrainingServer
from pd_runtime.config import CoordinatorConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.coordinator.app import create_app
from pd_runtime.errors import NoEndpointError
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import KVAwareScheduler
from pd_runtime.scheduling.round_robin import RoundRobinScheduler
from tests.servers import FakeEngine, free_port, serve, wait_for

BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
STREAM = {**BODY, "stream": True}


def make_config(urls: list[str], **extra: Any) -> CoordinatorConfig:
    endpoints = [
        {"name": f"decode-{i}", "role": "decode", "address": f"127.0.0.1:{9200 + i}", "url": url}
        for i, url in enumerate(urls)
    ]
    return CoordinatorConfig.model_validate({"models": ["tiny"], "endpoints": endpoints, **extra})


class RecordingRoundRobin(RoundRobinScheduler):
    """Round-robin that records what the coordinator reports and releases."""

    def __init__(self, endpoints: list[EndpointConfig]) -> None:
        super().__init__(endpoints)
        self.failures: list[tuple[str, str]] = []
        self.released = 0
        self.excluded: list[frozenset[str]] = []

    def schedule(self, request: SchedulingRequest):  # type: ignore[no-untyped-def]
        self.excluded.append(request.exclude)
        return super().schedule(request)

    def report_failure(self, endpoint: EndpointConfig, error: str) -> None:
        self.failures.append((endpoint.address, error))

    def release(self, request, result) -> None:  # type: ignore[no-untyped-def]
        self.released += 1


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def pod_scores(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    lines = [r.getMessage() for r in caplog.records if "Got pod scores" in r.getMessage()]
    return [json.loads(line.split("Got pod scores ", 1)[1]) for line in lines]


# ---- failover ----------------------------------------------------------------------------------


def test_connect_error_fails_over_to_the_next_endpoint(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    good = FakeEngine("good")
    with serve(good.app()) as good_url:
        config = make_config([dead_url(), good_url])
        scheduler = RecordingRoundRobin(config.endpoints)
        with serve(create_app(config, scheduler=scheduler)) as url:
            response = httpx.post(
                f"{url}/v1/completions", json=BODY, headers={"x-request-id": "r-1"}
            )
            metrics = httpx.get(f"{url}/metrics").text
    assert response.status_code == 200 and response.json()["served_by"] == "good"
    assert [a for a, _ in scheduler.failures] == ["127.0.0.1:9200"]
    assert "connect_error" in scheduler.failures[0][1]
    assert scheduler.excluded == [frozenset(), frozenset({"127.0.0.1:9200"})]
    assert scheduler.released == 2  # the failed attempt and the served one
    # One `Got pod scores` line per attempt, with the same request id.
    assert [(r["x-request-id"], r["target"]) for r in pod_scores(caplog)] == [
        ("r-1", "127.0.0.1:9200"),
        ("r-1", "127.0.0.1:9201"),
    ]
    assert 'pd_coordinator_retries_total{reason="connect_error"} 1.0' in metrics
    assert 'pd_coordinator_in_flight{decode="decode-0"} 0.0' in metrics
    assert (
        'pd_coordinator_requests_total{mode="direct",route="/v1/completions",status="200"} 1.0'
        in metrics
    )


@pytest.mark.parametrize("status", [502, 503, 504])
def test_an_upstream_5xx_before_streaming_fails_over(status: int) -> None:
    bad, good = FakeEngine("bad", fail_with=status), FakeEngine("good")
    with (
        serve(bad.app()) as bad_url,
        serve(good.app()) as good_url,
        serve(create_app(make_config([bad_url, good_url]))) as url,
    ):
        response = httpx.post(f"{url}/v1/completions", json=STREAM)
        assert response.status_code == 200
        assert response.text.endswith("data: [DONE]\n\n")
        metrics = httpx.get(f"{url}/metrics").text
    assert len(bad.requests) == 1 and len(good.requests) == 1
    assert f'pd_coordinator_retries_total{{reason="status_{status}"}} 1.0' in metrics


def test_other_upstream_errors_are_passed_through_not_retried() -> None:
    bad, good = FakeEngine("bad", fail_with=500), FakeEngine("good")
    with (
        serve(bad.app()) as bad_url,
        serve(good.app()) as good_url,
        serve(create_app(make_config([bad_url, good_url]))) as url,
    ):
        response = httpx.post(f"{url}/v1/completions", json=BODY)
    assert response.status_code == 500
    assert good.requests == []


def test_when_every_attempt_fails_the_client_gets_an_openai_502(caplog) -> None:
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    config = make_config([dead_url(), dead_url(), dead_url(), dead_url()], max_attempts=3)
    with serve(create_app(config)) as url:
        response = httpx.post(f"{url}/v1/completions", json=BODY, headers={"x-request-id": "r"})
        metrics = httpx.get(f"{url}/metrics").text
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "BadGatewayError" and "3 tried" in error["message"]
    assert len(pod_scores(caplog)) == 3  # max_attempts, not every endpoint
    assert 'pd_coordinator_retries_total{reason="connect_error"} 2.0' in metrics


def test_max_attempts_one_means_no_failover() -> None:
    good = FakeEngine("good")
    with (
        serve(good.app()) as good_url,
        serve(create_app(make_config([dead_url(), good_url], max_attempts=1))) as url,
    ):
        assert httpx.post(f"{url}/v1/completions", json=BODY).status_code == 502
    assert good.requests == []


def test_a_hung_sidecar_is_failed_over_after_the_first_byte_timeout() -> None:
    hung, good = FakeEngine("hung", hang_s=30), FakeEngine("good")
    with serve(hung.app()) as hung_url, serve(good.app()) as good_url:
        config = make_config([hung_url, good_url], first_byte_timeout_s=0.5)
        with serve(create_app(config)) as url:
            started = time.monotonic()
            response = httpx.post(f"{url}/v1/completions", json=STREAM, timeout=10)
            elapsed = time.monotonic() - started
            metrics = httpx.get(f"{url}/metrics").text
            # The abandoned attempt's connection was closed: the hung engine saw the client go.
            wait_for(lambda: hung.aborted == ["hang"])
    assert response.status_code == 200 and '"served_by": "good"' in response.text
    assert elapsed < 5
    assert 'pd_coordinator_retries_total{reason="timeout"} 1.0' in metrics


def test_a_stream_that_breaks_midway_is_not_retried_and_ends_with_an_error_event() -> None:
    broken, good = FakeEngine("broken", break_stream_after=1), FakeEngine("good")
    with (
        serve(broken.app()) as broken_url,
        serve(good.app()) as good_url,
        serve(create_app(make_config([broken_url, good_url]))) as url,
    ):
        with httpx.stream("POST", f"{url}/v1/completions", json=STREAM, timeout=10) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        metrics = httpx.get(f"{url}/metrics").text
    assert json.loads(events[0][6:])["served_by"] == "broken"
    assert "error" in json.loads(events[-1][6:])
    assert good.requests == []
    assert "pd_coordinator_retries_total{" not in metrics


# ---- the schedulers honour exclude and report_failure ------------------------------------------


def endpoints(n: int) -> list[EndpointConfig]:
    return make_config([f"http://127.0.0.1:{9300 + i}" for i in range(n)]).endpoints


def test_round_robin_skips_excluded_endpoints() -> None:
    scheduler = RoundRobinScheduler(endpoints(3))
    request = SchedulingRequest("r", "tiny", "/v1/completions", BODY)
    first = scheduler.schedule(request).decode.address
    tried = frozenset({first})
    again = scheduler.schedule(
        SchedulingRequest("r", "tiny", "/v1/completions", BODY, exclude=tried)
    )
    assert again.decode.address not in tried
    everything = frozenset(e.address for e in scheduler.decode)
    with pytest.raises(NoEndpointError):
        scheduler.schedule(
            SchedulingRequest("r", "tiny", "/v1/completions", BODY, exclude=everything)
        )


def test_kv_aware_marks_a_failed_endpoint_unhealthy_and_honours_exclude() -> None:
    eps = endpoints(2)
    scheduler = KVAwareScheduler(eps, seed=0)
    request = SchedulingRequest("r", "tiny", "/v1/completions", BODY)
    result = scheduler.schedule(request)
    failed = result.decode
    scheduler.release(request, result)
    scheduler.report_failure(failed, "connect_error: refused")
    assert scheduler.states[failed.address].healthy is False
    # The healthy filter skips it from now on (until a good scrape), excluded or not.
    for _ in range(5):
        r = SchedulingRequest("r", "tiny", "/v1/completions", BODY)
        res = scheduler.schedule(r)
        assert res.decode.address != failed.address
        scheduler.release(r, res)
    other = next(e for e in eps if e.address != failed.address)
    scheduler.states[failed.address].healthy = True
    excluded = SchedulingRequest(
        "r", "tiny", "/v1/completions", BODY, exclude=frozenset({other.address})
    )
    res = scheduler.schedule(excluded)
    assert res.decode.address == failed.address
    scheduler.release(excluded, res)
    assert all(s.in_flight_requests == 0 for s in scheduler.states.values())
    with pytest.raises(NoEndpointError):
        scheduler.schedule(
            SchedulingRequest(
                "r", "tiny", "/v1/completions", BODY, exclude=frozenset(e.address for e in eps)
            )
        )


# ---- client disconnects ------------------------------------------------------------------------


# Served as our processes serve (the connection calls the request back when it is lost) and by
# plain uvicorn (a watcher task per request notices it).
PROTOCOLS = pytest.mark.parametrize(
    "http", [header_deadline_protocol(10.0), "auto"], ids=["our-protocol", "uvicorn"]
)


@PROTOCOLS
def test_client_leaving_mid_stream_closes_the_sidecar_stream_promptly(http: Any) -> None:
    sidecar = FakeEngine("sidecar", chunks=1000, chunk_delay_s=0.05)
    with (
        serve(sidecar.app()) as sidecar_url,
        serve(create_app(make_config([sidecar_url])), http=http) as url,
    ):
        with httpx.stream("POST", f"{url}/v1/completions", json=STREAM, timeout=10) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        # The client is gone after one chunk of a 50 s stream: the sidecar's stream ends now.
        assert wait_for(lambda: sidecar.aborted == ["stream"]) < 3
        in_flight = 'pd_coordinator_in_flight{decode="decode-0"} 0.0'
        wait_for(lambda: in_flight in httpx.get(f"{url}/metrics").text)


@PROTOCOLS
def test_client_leaving_before_the_response_starts_closes_the_sidecar_request(http: Any) -> None:
    sidecar = FakeEngine("sidecar", hang_s=30)
    with (
        serve(sidecar.app()) as sidecar_url,
        serve(create_app(make_config([sidecar_url])), http=http) as url,
    ):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=BODY, timeout=0.5)
        assert wait_for(lambda: sidecar.aborted == ["hang"]) < 3
        metrics = httpx.get(f"{url}/metrics").text
    assert len(sidecar.requests) == 1  # not retried elsewhere: the client is gone
    assert "pd_coordinator_retries_total{" not in metrics
    assert 'pd_coordinator_in_flight{decode="decode-0"} 0.0' in metrics
    assert 'status="499"' in metrics


# ---- graceful shutdown -------------------------------------------------------------------------


@pytest.fixture(params=[0.0], ids=["no-delay"])
def draining_server(request) -> Iterator[tuple[DrainingServer, Any, str, FakeEngine]]:
    sidecar = FakeEngine("sidecar", chunks=10, chunk_delay_s=0.1)  # a 1 s stream
    with serve(sidecar.app()) as sidecar_url:
        app = create_app(make_config([sidecar_url], drain_timeout_s=10))
        port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=10
        )
        server = DrainingServer(config, app.state.lifecycle, drain_delay_s=request.param)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started)
        try:
            yield server, app, f"http://127.0.0.1:{port}", sidecar
        finally:
            server.should_exit = True
            thread.join(timeout=15)
            assert not thread.is_alive()


async def asgi_get(app: Any, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        return await c.get(path)


def test_sigterm_drains_health_then_in_flight_streams_finish(draining_server) -> None:
    server, app, url, _ = draining_server
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    events: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=STREAM, timeout=10) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data: "))

    client = threading.Thread(target=stream)
    client.start()
    time.sleep(0.3)  # the stream is under way
    server.handle_exit(signal.SIGTERM, None)
    assert app.state.lifecycle.draining is True
    health = asyncio.run(asgi_get(app, "/health"))
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    client.join(timeout=10)
    assert len(events) == 11 and events[-1] == "data: [DONE]"  # finished, not cut
    # Stopped listening: new connections are refused.
    wait_for(lambda: _refused(url))


@pytest.mark.parametrize("draining_server", [1.5], ids=["delay-1.5s"], indirect=True)
def test_drain_delay_keeps_answering_503_over_the_network_before_the_port_closes(
    draining_server,
) -> None:
    server, _, url, _ = draining_server
    server.handle_exit(signal.SIGTERM, None)
    signalled = time.monotonic()
    # Probes from outside see the server leave (503 draining), not a refused connection.
    health = httpx.get(f"{url}/health", timeout=2)
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    refused = httpx.post(f"{url}/v1/completions", json=BODY, timeout=2)
    assert refused.status_code == 503
    assert not server.should_exit
    wait_for(lambda: _refused(url), timeout_s=10)
    assert time.monotonic() - signalled >= 1.4  # the port stayed open for the delay


def test_a_second_signal_skips_the_rest_of_the_drain_delay() -> None:
    app = create_app(make_config(["http://127.0.0.1:1"]))
    server = DrainingServer(uvicorn.Config(app), app.state.lifecycle, drain_delay_s=60)
    server.handle_exit(signal.SIGTERM, None)
    assert app.state.lifecycle.draining and not server.should_exit
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=0.5)
    except httpx.TransportError:
        return True
    return False


def test_draining_refuses_new_generation_requests_with_503() -> None:
    app = create_app(make_config(["http://127.0.0.1:1"]))
    app.state.lifecycle.draining = True

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/v1/completions", json=BODY)

    response = asyncio.run(post())
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "ServiceUnavailableError"
