"""Scrape every endpoint's vLLM ``/metrics`` on a short interval into its EndpointState.

Read: ``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``
(0..1). An endpoint that fails ``unhealthy_after`` scrapes in a row is marked unhealthy (the
``healthy`` filter then skips it) and healthy again on its next good scrape. Parsing the text
format costs milliseconds per endpoint, so it runs in a worker thread, not on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import httpx

from pd_runtime.common.prom import parse_metrics
from pd_runtime.scheduling.plugins import EndpointState

__all__ = ["MetricsScraper"]

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"


class MetricsScraper:
    def __init__(
        self,
        endpoints: Sequence[EndpointState],
        *,
        interval_s: float = 0.5,
        timeout_s: float = 2.0,
        unhealthy_after: int = 3,
    ) -> None:
        self.endpoints = list(endpoints)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.unhealthy_after = unhealthy_after
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    def set_endpoints(self, endpoints: Sequence[EndpointState]) -> None:
        """Scrape these from the next round on (a round already running finishes as it was)."""
        self.endpoints = list(endpoints)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout_s)
        self._task = asyncio.create_task(self._run(), name="metrics-scraper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def scrape_once(self) -> None:
        await asyncio.gather(*(self._scrape(e) for e in self.endpoints))
        self.rounds += 1

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.scrape_once()
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def _scrape(self, state: EndpointState) -> None:
        assert self._client is not None
        try:
            response = await self._client.get(state.config.metrics_url)
            response.raise_for_status()
            values = await asyncio.to_thread(parse_metrics, response.text)
        except (httpx.HTTPError, ValueError) as exc:
            state.scrape_failures += 1
            if state.healthy and state.scrape_failures >= self.unhealthy_after:
                state.healthy = False
                log.warning("%s marked unhealthy: %s", state.address, exc or type(exc).__name__)
            return
        state.waiting = values.get(WAITING)
        state.running = values.get(RUNNING)
        state.kv_usage = values.get(KV_USAGE)
        state.scraped_at = time.time()
        state.scrape_failures = 0
        if not state.healthy:
            state.healthy = True
            log.info("%s healthy again", state.address)
