"""MetricsScraper against stand-in /metrics and sidecar /health servers on loopback: values into
EndpointState, health flips (a decode endpoint's sidecar and worker both count)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.scheduling.plugins import EndpointState
from pd_runtime.scheduling.scraper import FILTERED_QUERY, MetricsScraper, sidecar_health_url
from tests.servers import free_port, serve


@dataclass
class Metrics:
    """What the stand-in server exposes; tests change it between scrapes."""

    waiting: list[float] = field(default_factory=lambda: [1.0, 2.0])  # one value per engine
    running: float = 5.0
    kv_usage: float | None = 0.25
    status: int = 200
    body: str | None = None  # served as is when set

    def text(self) -> str:
        if self.body is not None:
            return self.body
        lines = [
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            *(
                f'vllm:num_requests_waiting{{engine="{i}",model_name="m"}} {v}'
                for i, v in enumerate(self.waiting)
            ),
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{engine="0",model_name="m"}} {self.running}',
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            'vllm:prompt_tokens_total{engine="0",model_name="m"} 1234.0',
        ]
        if self.kv_usage is not None:
            lines += [
                "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
                "# TYPE vllm:kv_cache_usage_perc gauge",
                f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {self.kv_usage}',
            ]
        return "\n".join(lines) + "\n"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/metrics")
        async def metrics() -> Response:
            return PlainTextResponse(self.text(), status_code=self.status)

        return app


def endpoint_state(address: str) -> EndpointState:
    return EndpointState(
        EndpointConfig(name="decode-0", role="decode", address=address, url=f"http://{address}")
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def live(metrics: Metrics) -> Iterator[str]:
    """The stand-in server's address (HOST:PORT)."""
    with serve(metrics.app()) as url:
        yield url.removeprefix("http://")


async def started(states: list[EndpointState], **kw: float) -> MetricsScraper:
    """A started scraper whose background loop has done its first round and now sleeps for an
    hour, so that the test drives every further round with ``scrape_once``."""
    scraper = MetricsScraper(states, interval_s=3600, **kw)  # type: ignore[arg-type]
    await scraper.start()
    for _ in range(500):
        if scraper.rounds:
            return scraper
        await asyncio.sleep(0.01)
    raise AssertionError("the first scrape round never finished")


async def two_rounds(app: FastAPI) -> EndpointState:
    """``app`` served as one worker, scraped twice (the start's round and one more)."""
    with serve(app) as url:
        state = endpoint_state(url.removeprefix("http://"))
        scraper = await started([state])
        try:
            await scraper.scrape_once()
        finally:
            await scraper.stop()
    return state


async def test_scrape_fills_the_endpoint_state(live: str, metrics: Metrics) -> None:
    state = endpoint_state(live)
    assert (state.waiting, state.running, state.kv_usage, state.scraped_at) == (None,) * 4
    scraper = await started([state])
    try:
        assert state.waiting == 3.0  # summed over the engines' label sets
        assert state.running == 5.0
        assert state.kv_usage == 0.25
        assert state.scraped_at is not None
        assert state.healthy and state.scrape_failures == 0

        metrics.waiting, metrics.running, metrics.kv_usage = [0.0], 1.0, 0.75
        before = state.scraped_at
        await scraper.scrape_once()
        assert (state.waiting, state.running, state.kv_usage) == (0.0, 1.0, 0.75)
        assert state.scraped_at >= before
        assert scraper.rounds == 2

        metrics.kv_usage = None  # a metric that disappears is unknown again, not stale
        await scraper.scrape_once()
        assert state.kv_usage is None
    finally:
        await scraper.stop()


async def test_dead_endpoint_turns_unhealthy_then_healthy_when_it_answers(
    metrics: Metrics,
) -> None:
    port = free_port()
    state = endpoint_state(f"127.0.0.1:{port}")
    scraper = await started([state], unhealthy_after=3)
    try:
        assert (state.scrape_failures, state.healthy) == (1, True)
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (2, True)
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (3, False)
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (4, False)
        assert state.waiting is None

        with serve(metrics.app(), port=port):
            await scraper.scrape_once()
            assert (state.scrape_failures, state.healthy) == (0, True)
            assert (state.waiting, state.kv_usage) == (3.0, 0.25)
    finally:
        await scraper.stop()


async def test_one_success_resets_the_failure_count(live: str, metrics: Metrics) -> None:
    state = endpoint_state(live)
    metrics.status = 503
    scraper = await started([state], unhealthy_after=2)
    try:
        assert (state.scrape_failures, state.healthy) == (1, True)
        metrics.status = 200
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (0, True)
        metrics.status = 503
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (1, True)  # not two in a row
    finally:
        await scraper.stop()


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, None), (404, None), (200, "<html><body>not prometheus</body></html>")],
)
async def test_error_status_or_unparsable_body_counts_as_a_failure(
    live: str, metrics: Metrics, status: int, body: str | None
) -> None:
    state = endpoint_state(live)
    state.waiting = 9.0  # from an earlier good scrape: kept, not overwritten with garbage
    metrics.status, metrics.body = status, body
    scraper = await started([state], unhealthy_after=1)
    try:
        assert state.scrape_failures == 1
        assert state.healthy is False
        assert state.waiting == 9.0
    finally:
        await scraper.stop()


async def test_endpoints_are_scraped_independently(live: str) -> None:
    good, dead = endpoint_state(live), endpoint_state(f"127.0.0.1:{free_port()}")
    scraper = await started([good, dead], unhealthy_after=1)
    try:
        assert good.healthy and good.waiting == 3.0
        assert not dead.healthy and dead.waiting is None
    finally:
        await scraper.stop()


async def test_background_loop_scrapes_every_interval_and_stops(live: str) -> None:
    state = endpoint_state(live)
    scraper = MetricsScraper([state], interval_s=0.02)
    await scraper.start()
    try:
        for _ in range(200):
            if scraper.rounds >= 3:
                break
            await asyncio.sleep(0.01)
        assert scraper.rounds >= 3
    finally:
        await scraper.stop()
    assert scraper._task is None and scraper._client is None
    rounds = scraper.rounds
    await asyncio.sleep(0.1)
    assert scraper.rounds == rounds  # stopped means stopped
    await scraper.stop()  # idempotent


async def test_an_unexpected_error_fails_the_scrape_and_never_stops_the_loop(
    live: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Seen on real workers (with httpx, the scraper's client then): while a killed worker's port
    # came back, httpcore/anyio raised an AttributeError ("'NoneType' object has no attribute
    # 'getpeername'") out of the client's get; it ended the scraper's task, and the endpoint was
    # never taken back into rotation. Any client may raise what no except clause names.
    state = endpoint_state(live)
    scraper = MetricsScraper([state], interval_s=0.02, unhealthy_after=2)
    await scraper.start()
    assert scraper._client is not None
    real_fetch = scraper._client.fetch
    broken = {"on": True}

    async def flaky_fetch(method: str, url: str, **kw: object) -> object:
        if broken["on"]:
            raise AttributeError("'NoneType' object has no attribute 'getpeername'")
        return await real_fetch(method, url, **kw)  # type: ignore[arg-type]

    scraper._client.fetch = flaky_fetch  # type: ignore[method-assign]
    real_scrape = scraper._scrape
    calls = {"n": 0}

    async def scrape_raising_once(e: EndpointState) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a round that raises")
        await real_scrape(e)

    scraper._scrape = scrape_raising_once  # type: ignore[method-assign]
    try:
        for _ in range(300):
            if not state.healthy and scraper.round_errors:
                break
            await asyncio.sleep(0.01)
        assert not state.healthy and scraper.round_errors == 1
        assert "a round that raises" in caplog.text
        broken["on"] = False
        for _ in range(300):
            if state.healthy:
                break
            await asyncio.sleep(0.01)
        assert state.healthy and state.scrape_failures == 0 and state.waiting == 3.0
        assert scraper._task is not None and not scraper._task.done()
    finally:
        await scraper.stop()


# ---- decode endpoints behind a sidecar: the sidecar's /health is part of every round ----------


@dataclass
class Sidecar:
    """Stand-in for a decode sidecar's ``/health``; answers like the real one (200 ok, or 503 with
    ``draining`` / ``decode worker unreachable``). Tests change it between rounds."""

    status: int = 200
    state: str = "ok"
    hits: int = 0

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            self.hits += 1
            return JSONResponse({"status": self.state}, status_code=self.status)

        return app


def decode_behind(address: str, sidecar_url: str) -> EndpointState:
    return EndpointState(
        EndpointConfig(name="decode-0", role="decode", address=address, url=sidecar_url)
    )


@pytest.fixture
def sidecar() -> Sidecar:
    return Sidecar()


@pytest.fixture
def sidecar_url(sidecar: Sidecar) -> Iterator[str]:
    with serve(sidecar.app()) as url:
        yield url


@pytest.mark.parametrize(
    ("role", "address", "url", "expected"),
    [
        ("decode", "10.0.0.1:8200", "http://10.0.0.1:8300", "http://10.0.0.1:8300/health"),
        (
            "decode",
            "10.0.0.1:8200",
            "http://sidecar.local:8200",
            "http://sidecar.local:8200/health",
        ),
        ("decode", "[fd00::1]:8200", "http://[fd00::1]:8300", "http://[fd00::1]:8300/health"),
        ("decode", "10.0.0.1:8200", "http://10.0.0.1:8200", None),  # the worker itself
        ("decode", "10.0.0.1:8200", "https://10.0.0.1:8200/", None),
        ("decode", "[fd00::1]:8200", "http://[fd00::1]:8200", None),
        ("prefill", "10.0.0.1:8100", "http://10.0.0.1:8100", None),
        ("prefill", "10.0.0.1:8100", "http://10.0.0.1:9999", None),  # prefill: never a sidecar
    ],
)
def test_which_endpoints_have_a_sidecar_to_check(
    role: str, address: str, url: str, expected: str | None
) -> None:
    config = EndpointConfig(name="e", role=role, address=address, url=url)  # type: ignore[arg-type]
    assert sidecar_health_url(config) == expected


async def test_dead_sidecar_keeps_the_endpoint_unhealthy_while_its_worker_answers(
    live: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The old bug: the worker's /metrics alone brought it back at every scrape."""
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    state = decode_behind(live, dead_url)
    caplog.set_level(logging.INFO, logger="pd_runtime.scheduling.scraper")
    scraper = await started([state], unhealthy_after=2)
    try:
        assert (state.scrape_failures, state.healthy) == (1, True)
        assert state.waiting == 3.0  # the worker's numbers still come in
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (2, False)
        for expected_failures in (3, 4, 5):
            await scraper.scrape_once()
            assert (state.scrape_failures, state.healthy) == (expected_failures, False)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once per outage, not per round
        assert "sidecar failed" in warnings[0] and "worker failed" not in warnings[0]
        # which URL failed, and how (the connection was refused)
        assert f"{dead_url}/health: ClientConnectorError" in warnings[0]
    finally:
        await scraper.stop()


async def test_endpoint_marked_unhealthy_by_a_failed_forward_stays_out_while_its_sidecar_is_dead(
    live: str,
) -> None:
    """What ``KVAwareScheduler.report_failure`` does after a forward to a dead sidecar: the next
    round must not undo it just because the worker's /metrics answers."""
    state = decode_behind(live, f"http://127.0.0.1:{free_port()}")
    scraper = await started([state], unhealthy_after=3)
    try:
        state.healthy = False  # report_failure: unhealthy at once, failure count untouched
        for _ in range(4):
            await scraper.scrape_once()
            assert state.healthy is False
    finally:
        await scraper.stop()


async def test_sidecar_comes_back_and_the_endpoint_is_healthy_after_one_good_round(
    live: str, sidecar: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    state = decode_behind(live, f"http://127.0.0.1:{port}")
    caplog.set_level(logging.INFO, logger="pd_runtime.scheduling.scraper")
    scraper = await started([state], unhealthy_after=1)
    try:
        assert (state.scrape_failures, state.healthy) == (1, False)
        with serve(sidecar.app(), port=port):
            await scraper.scrape_once()
            assert (state.scrape_failures, state.healthy) == (0, True)
            assert sidecar.hits == 1
        assert any("healthy again" in r.getMessage() for r in caplog.records)
    finally:
        await scraper.stop()


async def test_draining_sidecar_turns_the_endpoint_unhealthy_until_both_answer(
    live: str, sidecar: Sidecar, sidecar_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = decode_behind(live, sidecar_url)
    scraper = await started([state], unhealthy_after=2)
    try:
        assert (state.scrape_failures, state.healthy, sidecar.hits) == (0, True, 1)
        sidecar.status, sidecar.state = 503, "draining"
        caplog.set_level(logging.INFO, logger="pd_runtime.scheduling.scraper")
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (1, True)
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (2, False)
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (3, False)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "sidecar failed" in warning and "answered 503 (draining)" in warning
        assert "worker failed" not in warning

        sidecar.status, sidecar.state = 200, "ok"
        await scraper.scrape_once()
        assert (state.scrape_failures, state.healthy) == (0, True)
        assert sidecar.hits == 5  # one check per round
    finally:
        await scraper.stop()


async def test_dead_worker_behind_a_live_sidecar_is_unhealthy_and_blamed_on_the_worker(
    sidecar: Sidecar, sidecar_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    state = decode_behind(f"127.0.0.1:{free_port()}", sidecar_url)
    caplog.set_level(logging.INFO, logger="pd_runtime.scheduling.scraper")
    scraper = await started([state], unhealthy_after=1)
    try:
        assert (state.scrape_failures, state.healthy) == (1, False)
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "worker failed" in warning and "sidecar failed" not in warning
        assert "/metrics" in warning
    finally:
        await scraper.stop()


async def test_both_down_names_both(caplog: pytest.LogCaptureFixture) -> None:
    state = decode_behind(f"127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}")
    caplog.set_level(logging.INFO, logger="pd_runtime.scheduling.scraper")
    scraper = await started([state], unhealthy_after=1)
    try:
        assert state.healthy is False
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "sidecar failed" in warning and "worker failed" in warning
    finally:
        await scraper.stop()


async def test_endpoints_without_a_sidecar_are_healthy_on_their_metrics_alone(
    live: str, sidecar: Sidecar, sidecar_url: str
) -> None:
    """Prefill endpoints (no sidecar) and decode endpoints served by the worker directly: no
    /health request (the metrics stand-in has no /health route: a 404 would fail them), and a
    dead sidecar elsewhere changes nothing for them."""
    prefill = EndpointState(
        EndpointConfig(name="prefill-0", role="prefill", address=live, url=f"http://{live}")
    )
    direct = endpoint_state(live)  # decode, url == http://address
    behind_dead = decode_behind(live, f"http://127.0.0.1:{free_port()}")
    scraper = await started([prefill, direct, behind_dead], unhealthy_after=1)
    try:
        for _ in range(3):
            assert (prefill.scrape_failures, prefill.healthy) == (0, True)
            assert (direct.scrape_failures, direct.healthy) == (0, True)
            assert prefill.waiting == direct.waiting == 3.0
            assert behind_dead.healthy is False
            await scraper.scrape_once()
        assert sidecar.hits == 0
    finally:
        await scraper.stop()


async def test_sidecar_health_and_metrics_are_fetched_concurrently() -> None:
    """Each stand-in answers only once the other one has been asked: a scraper that asked them one
    after the other would see the first time out (503) and fail the round."""
    asked_metrics, asked_sidecar = threading.Event(), threading.Event()

    worker = FastAPI()

    @worker.get("/metrics")
    async def metrics() -> Response:
        asked_metrics.set()
        if not await asyncio.to_thread(asked_sidecar.wait, 1.5):
            return PlainTextResponse("", status_code=503)
        return PlainTextResponse(Metrics().text())

    side = FastAPI()

    @side.get("/health")
    async def health() -> Response:
        asked_sidecar.set()
        if not await asyncio.to_thread(asked_metrics.wait, 1.5):
            return JSONResponse({"status": "decode unhealthy"}, status_code=503)
        return JSONResponse({"status": "ok"})

    with serve(worker) as worker_url, serve(side) as side_url:
        state = decode_behind(worker_url.removeprefix("http://"), side_url)
        scraper = await started([state], unhealthy_after=1)
        try:
            assert (state.scrape_failures, state.healthy, state.waiting) == (0, True, 3.0)
        finally:
            await scraper.stop()


def vllm_like_app(hits: list[str]) -> FastAPI:
    """vLLM's two /metrics: its own route renders every metric, and prometheus_client's ASGI app
    mounted for /metrics/... (as vLLM mounts it) answers ``name[]=`` with only those."""
    import re
    from urllib.parse import unquote

    from prometheus_client import (
        CollectorRegistry,
        Gauge,
        Histogram,
        generate_latest,
        make_asgi_app,
    )
    from starlette.routing import Mount

    registry = CollectorRegistry()
    labels = ["engine", "model_name"]
    Gauge("vllm:num_requests_waiting", "w", labels, registry=registry).labels("0", "m").set(2)
    Gauge("vllm:num_requests_running", "r", labels, registry=registry).labels("0", "m").set(7)
    Gauge("vllm:kv_cache_usage_perc", "k", labels, registry=registry).labels("0", "m").set(0.5)
    xfer = Histogram("vllm:nixl_xfer_time_seconds", "x", labels, registry=registry)
    xfer.labels("0", "m").observe(0.25)
    xfer.labels("0", "m").observe(0.75)
    for i in range(200):  # the bulk the filter leaves out
        Gauge(f"vllm:other_{i}", "o", labels, registry=registry).labels("0", "m").set(i)
    app = FastAPI()

    @app.middleware("http")
    async def count(request, call_next):  # type: ignore[no-untyped-def]
        query = unquote(request.url.query)
        hits.append(request.url.path + ("?" + query if query else ""))
        return await call_next(request)

    @app.get("/metrics")
    async def whole() -> Response:
        return PlainTextResponse(generate_latest(registry).decode())

    mount = Mount("/metrics", make_asgi_app(registry=registry))
    mount.path_regex = re.compile("^/metrics(?P<path>.*)$")
    app.routes.append(mount)
    return app


async def test_a_vllm_worker_is_scraped_through_its_filtered_metrics() -> None:
    hits: list[str] = []
    state = await two_rounds(vllm_like_app(hits))
    assert (state.waiting, state.running, state.kv_usage) == (2.0, 7.0, 0.5)
    assert (state.nixl_xfer_seconds_sum, state.nixl_xfer_count) == (1.0, 2.0)
    assert hits and all(h.startswith("/metrics/?name[]=") for h in hits), hits  # never whole
    assert len(hits) == 2  # one request per round


async def test_a_worker_without_the_filter_is_scraped_whole_from_then_on(
    live: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The stand-in serves /metrics only: /metrics/ answers a redirect, which is not followed.
    caplog.set_level(logging.INFO, logger="pd_runtime.scheduling.scraper")
    state = endpoint_state(live)
    scraper = await started([state])
    try:
        assert (state.waiting, state.running) == (3.0, 5.0)  # the first round fell back at once
        assert scraper._whole == {live}
        fetched: list[str] = []
        assert scraper._client is not None
        real_fetch = scraper._client.fetch

        async def recording(method: str, url: str, **kw: object) -> object:
            fetched.append(url)
            return await real_fetch(method, url, **kw)  # type: ignore[arg-type]

        scraper._client.fetch = recording  # type: ignore[method-assign]
        await scraper.scrape_once()
        assert fetched == [f"http://{live}/metrics"]
        assert state.healthy and state.scrape_failures == 0
        scraper.set_endpoints([state])  # still there: still read whole
        assert scraper._whole == {live}
        scraper.set_endpoints([])  # gone (discovery), then back, maybe another server now
        scraper.set_endpoints([state])
        fetched.clear()
        await scraper.scrape_once()
        assert fetched == [
            f"http://{live}/metrics/?" + FILTERED_QUERY[2:],
            f"http://{live}/metrics",
        ]
    finally:
        await scraper.stop()
    said = [r.getMessage() for r in caplog.records if "scraping it whole" in r.getMessage()]
    assert len(said) == 2 and all(live in line for line in said)  # once per time it is flagged


async def test_a_failing_filtered_scrape_is_a_failed_round_not_a_fallback() -> None:
    """A 5xx there says the worker is failing, not that it cannot filter: the round fails (as a
    failing whole /metrics did) and the filtered path is asked again next round."""
    status = {"code": 503}
    app = FastAPI()

    @app.get("/metrics/")
    async def filtered() -> Response:
        return PlainTextResponse(
            'vllm:num_requests_waiting{engine="0"} 4.0\n', status_code=status["code"]
        )

    with serve(app) as url:
        address = url.removeprefix("http://")
        state = endpoint_state(address)
        scraper = await started([state], unhealthy_after=5)
        try:
            assert state.scrape_failures == 1 and state.waiting is None
            assert scraper._whole == set()
            status["code"] = 200
            await scraper.scrape_once()
            assert (state.scrape_failures, state.waiting) == (0, 4.0)
        finally:
            await scraper.stop()


async def test_a_200_without_the_gauges_on_the_filtered_path_falls_back_to_the_whole_text() -> None:
    """A server that answers /metrics/ with something else (a page, another engine's metrics
    without ours) is read whole: its real gauges come from /metrics."""
    hits: list[str] = []
    app = FastAPI()

    @app.get("/metrics/")
    async def other() -> Response:
        hits.append("/metrics/")
        return PlainTextResponse('other_engine_requests{engine="0"} 9.0\n')

    @app.get("/metrics")
    async def whole() -> Response:
        hits.append("/metrics")
        return PlainTextResponse(Metrics().text())

    state = await two_rounds(app)
    assert (state.waiting, state.running, state.kv_usage) == (3.0, 5.0, 0.25)
    assert hits == ["/metrics/", "/metrics", "/metrics"]  # asked once, then whole
