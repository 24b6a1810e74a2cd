"""MetricsScraper against a stand-in /metrics server: values into EndpointState, health flips."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from pd_runtime.config.coordinator import EndpointConfig
from pd_runtime.scheduling.plugins import EndpointState
from pd_runtime.scheduling.scraper import MetricsScraper
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
