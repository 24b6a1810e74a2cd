"""Scrape every endpoint's vLLM ``/metrics`` on a short interval into its EndpointState, and check
the health of the decode endpoints' sidecars in the same round.

Read: ``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``
(0..1), and on decode workers ``vllm:nixl_xfer_time_seconds`` ``_sum``/``_count`` (the KV pulls'
time, from which the latency model learns the transfer cost per token). They are asked for by
name (:data:`FILTERED_QUERY`), so vLLM renders only them; a worker that does not answer them
there is scraped whole from then on. Only their lines are parsed, on the event loop: picked out
of the text by one regex scan (~50 us for vLLM's ~450 lines) and parsed in ~0.1-0.2 ms, where
parsing the whole text took ~7 ms (in a worker thread, which still holds the GIL). A text without any of them (not Prometheus, or
not vLLM) is parsed whole in a worker thread, as before, so a broken answer still fails the round.

Health. Requests to a decode endpoint go through its sidecar (``EndpointConfig.url``), so a dead
or draining sidecar must keep the endpoint out of rotation even while its worker still answers
``/metrics``. For a decode endpoint whose ``url`` is not the worker itself (``url`` names another
HOST:PORT than ``address``) each round therefore also GETs the sidecar's ``{url}/health``,
concurrently with the metrics scrape and on the same client; the sidecar answers 503 there when
it drains or cannot reach its decode worker. A round succeeds only when both answer (prefill
endpoints, and endpoints served by the worker directly, need the metrics scrape alone). An
endpoint whose rounds fail ``unhealthy_after`` times in a row is marked unhealthy (the
``healthy`` filter then skips it), logged with what failed (sidecar, worker, or both); it is
healthy again after its next successful round. That also undoes an unhealthy mark the scheduler
set after a failed forward (``report_failure``), which is why the sidecar must be part of the
round: with the metrics alone, an endpoint with a dead sidecar would come back at every scrape
and cost a client request a failed attempt each time. Metric values are taken from every good
metrics scrape, whatever the sidecar answered: they describe the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from urllib.parse import urlsplit

import aiohttp

from pd_runtime.common.prom import parse_metrics, select_samples
from pd_runtime.common.upstream import TRANSPORT_ERRORS, Fetched, UpstreamClient
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.scheduling.plugins import EndpointState

__all__ = ["MetricsScraper", "sidecar_health_url"]

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
GAUGES = (WAITING, RUNNING, KV_USAGE)
#: The decode worker's KV pulls (cumulative): the latency model's transfer time per token.
NIXL_SECONDS_SUM = "vllm:nixl_xfer_time_seconds_sum"
NIXL_COUNT = "vllm:nixl_xfer_time_seconds_count"
READ = (*GAUGES, NIXL_SECONDS_SUM, NIXL_COUNT)
#: vLLM serves ``/metrics`` twice: its own route renders every metric (~70 kB; ~8 ms of the API
#: server's CPU, on its event loop, per scrape on our 2-core VM), and prometheus_client's ASGI
#: app, mounted for ``/metrics/...``, honours ``name[]=`` and renders only those (~0.7 ms).
FILTERED_QUERY = "/?" + "&".join(f"name[]={name}" for name in READ)


def sidecar_health_url(config: EndpointConfig) -> str | None:
    """``{url}/health`` of the sidecar in front of a decode endpoint's worker; None when the
    endpoint has no sidecar (a prefill endpoint, or ``url`` is the worker's own HOST:PORT)."""
    if config.role != "decode" or urlsplit(config.url).netloc == config.address:
        return None
    return f"{config.url}/health"


class _Answered(Exception):
    """A scrape or health check that got an answer other than 200."""

    def __init__(self, url: str, answer: Fetched) -> None:
        status = None
        with contextlib.suppress(ValueError, LookupError, TypeError):
            status = answer.json()["status"]  # the sidecar's: "draining", "decode unhealthy", ...
        detail = f" ({status})" if isinstance(status, str) else ""
        super().__init__(f"{url} answered {answer.status_code}{detail}")


def _describe(url: str, exc: Exception) -> str:
    """One line for the log: the status and the answer's ``status`` field, or the error."""
    if isinstance(exc, _Answered):
        return str(exc)
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return f"{url}: {message}" if isinstance(exc, TRANSPORT_ERRORS) else message


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
        self.round_errors = 0  # rounds that raised (logged; the loop goes on)
        self._task: asyncio.Task[None] | None = None
        self._client: UpstreamClient | None = None
        # Workers whose filtered /metrics/ did not answer the gauges (not vLLM, an older one):
        # scraped whole from then on.
        self._whole: set[str] = set()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def set_endpoints(self, endpoints: Sequence[EndpointState]) -> None:
        """Scrape these from the next round on (a round already running finishes as it was). An
        address that left is forgotten: if it comes back it is asked the filtered path again."""
        self.endpoints = list(endpoints)
        self._whole &= {e.address for e in self.endpoints}

    async def start(self) -> None:
        # aiohttp, as on the request path (its HTTP parser is in C): with httpx a round of one
        # prefill and two decode endpoints with sidecars (5 GETs, vLLM's ~70 kB /metrics) cost
        # ~6.9 ms of CPU, ~14 ms a second at the default interval, idle or not; now ~1.5 ms
        # (benchmarks/results/2026-12-07-scraper). Connections stay alive between rounds.
        self._client = UpstreamClient(
            connect_timeout_s=self.timeout_s, read_timeout_s=self.timeout_s
        )
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
        # The loop must outlive anything a round raises: if it died, no endpoint marked
        # unhealthy would ever be taken back (seen: an AttributeError from inside httpcore/anyio
        # while a killed worker's port came back, which no except clause named).
        while True:
            started = time.monotonic()
            try:
                await self.scrape_once()
            except Exception:
                self.round_errors += 1
                log.exception("metrics scrape round failed; the next round runs as usual")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def _scrape(self, state: EndpointState) -> None:
        health_url = sidecar_health_url(state.config)
        if health_url is None:
            worker_error, sidecar_error = await self._scrape_metrics(state), None
        else:
            worker_error, sidecar_error = await asyncio.gather(
                self._scrape_metrics(state), self._check_sidecar(health_url)
            )
        if worker_error is None and sidecar_error is None:
            state.scrape_failures = 0
            if not state.healthy:
                state.healthy = True
                log.info("%s healthy again", state.address)
            return
        state.scrape_failures += 1
        # Log once per outage: when the endpoint turns unhealthy here, or when it reaches the
        # threshold already unhealthy (marked by the scheduler after a failed forward).
        if state.scrape_failures >= self.unhealthy_after and (
            state.healthy or state.scrape_failures == self.unhealthy_after
        ):
            state.healthy = False
            failed = [
                f"{what} failed: {error}"
                for what, error in (("sidecar", sidecar_error), ("worker", worker_error))
                if error is not None
            ]
            log.warning(
                "%s (%s) marked unhealthy after %d failed rounds: %s",
                state.address,
                state.config.name,
                state.scrape_failures,
                "; ".join(failed),
            )

    async def _get(self, url: str) -> Fetched:
        """GET ``url``: the answer when it is a 200, else :class:`_Answered` or what the
        transport raised."""
        assert self._client is not None
        answer = await self._client.fetch("GET", url, timeout=self._timeout)
        if answer.status_code != 200:
            raise _Answered(url, answer)
        return answer

    async def _values(self, state: EndpointState) -> dict[str, float]:
        """The worker's samples of :data:`READ`: from its filtered ``/metrics/``, or from the
        whole ``/metrics`` for a worker that does not answer the gauges there (remembered: this
        round and later ones). A transport failure or a 5xx raises: the worker is down or
        failing, not unable to filter."""
        url = state.config.metrics_url
        if state.address not in self._whole:
            assert self._client is not None
            filtered = url + FILTERED_QUERY
            answer = await self._client.fetch("GET", filtered, timeout=self._timeout)
            if answer.status_code >= 500:
                raise _Answered(filtered, answer)
            lines = select_samples(answer.text, READ) if answer.status_code == 200 else None
            values = parse_metrics(lines) if lines is not None else {}
            if any(gauge in values for gauge in GAUGES):
                return values
            self._whole.add(state.address)
            log.info(
                "%s: no filtered /metrics/ (HTTP %s), scraping it whole",
                state.address,
                answer.status_code,
            )
        text = (await self._get(url)).text
        lines = select_samples(text, READ)
        if lines is not None:
            return parse_metrics(lines)
        return await asyncio.to_thread(parse_metrics, text)

    async def _scrape_metrics(self, state: EndpointState) -> str | None:
        """Fill ``state`` from the worker's metrics; None, or what went wrong."""
        try:
            values = await self._values(state)
        except Exception as exc:
            return _describe(state.config.metrics_url, exc)
        state.waiting = values.get(WAITING)
        state.running = values.get(RUNNING)
        state.kv_usage = values.get(KV_USAGE)
        if state.role == "decode":
            state.nixl_xfer_seconds_sum = values.get(NIXL_SECONDS_SUM)
            state.nixl_xfer_count = values.get(NIXL_COUNT)
        state.scraped_at = time.time()
        return None

    async def _check_sidecar(self, url: str) -> str | None:
        """None when the sidecar's ``/health`` answers 200, else what went wrong."""
        try:
            await self._get(url)
        except Exception as exc:
            return _describe(url, exc)
        return None
