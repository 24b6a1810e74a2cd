"""The scraper reads only vLLM's three load gauges out of /metrics: the same values as parsing the
whole text, every label set summed, look-alike names left out, and a non-Prometheus body still a
failure."""

from __future__ import annotations

import time

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from pd_runtime.common.prom import parse_metrics, select_samples
from pd_runtime.scheduling.scraper import GAUGES, KV_USAGE, RUNNING, WAITING

LABELS = ["model_name", "engine"]
SECONDS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5]
SECONDS += [10.0, 20.0, 40.0, 80.0]
TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]


def vllm_metrics_text(waiting: list[float], running: list[float], kv: list[float]) -> str:
    """A /metrics text shaped like vLLM's (one label set per engine; ~450 lines for one engine):
    its gauges, counters and histograms by their vLLM names, and the process collectors."""
    r = CollectorRegistry()
    GCCollector(registry=r)
    PlatformCollector(registry=r)
    ProcessCollector(registry=r)
    gauges = {n: Gauge(n, "g", LABELS, registry=r) for n in [*GAUGES, "vllm:engine_sleep_state"]}
    by_reason = Gauge("vllm:num_requests_waiting_by_reason", "g", [*LABELS, "reason"], registry=r)
    counters = [
        Counter(n, "c", LABELS, registry=r)
        for n in [
            "vllm:num_preemptions",
            "vllm:prompt_tokens",
            "vllm:generation_tokens",
            "vllm:prefix_cache_queries",
            "vllm:prefix_cache_hits",
            "vllm:external_prefix_cache_queries",
            "vllm:external_prefix_cache_hits",
            "vllm:corrupted_requests",
        ]
    ]
    success = Counter("vllm:request_success", "c", [*LABELS, "finished_reason"], registry=r)
    histograms = [
        Histogram(n, "h", LABELS, buckets=SECONDS, registry=r)
        for n in [
            "vllm:time_to_first_token_seconds",
            "vllm:inter_token_latency_seconds",
            "vllm:request_time_per_output_token_seconds",
            "vllm:e2e_request_latency_seconds",
            "vllm:request_queue_time_seconds",
            "vllm:request_inference_time_seconds",
            "vllm:request_prefill_time_seconds",
            "vllm:request_decode_time_seconds",
        ]
    ] + [
        Histogram(n, "h", LABELS, buckets=TOKENS, registry=r)
        for n in [
            "vllm:request_prompt_tokens",
            "vllm:request_generation_tokens",
            "vllm:iteration_tokens_total",
            "vllm:request_params_max_tokens",
        ]
    ]
    for engine, values in enumerate(zip(waiting, running, kv, strict=True)):
        label = ("m", str(engine))
        for name, value in zip(GAUGES, values, strict=True):
            gauges[name].labels(*label).set(value)
        gauges["vllm:engine_sleep_state"].labels(*label).set(0)
        for reason in ("capacity", "deferred"):
            by_reason.labels(*label, reason).set(7)
        for counter in counters:
            counter.labels(*label).inc(11)
        for reason in ("stop", "length", "abort"):
            success.labels(*label, reason).inc(3)
        for histogram in histograms:
            histogram.labels(*label).observe(0.3)
    return generate_latest(r).decode()


@pytest.mark.parametrize(
    ("waiting", "running", "kv"),
    [([3.0], [5.0], [0.25]), ([3.0, 1.0], [5.0, 2.0], [0.25, 0.5]), ([0.0], [0.0], [0.0])],
)
def test_the_gauges_read_from_their_lines_equal_the_whole_parse(
    waiting: list[float], running: list[float], kv: list[float]
) -> None:
    text = vllm_metrics_text(waiting, running, kv)
    assert len(text.splitlines()) > 400 * len(waiting) // 1.5
    whole = parse_metrics(text)
    selected = select_samples(text, GAUGES)
    assert selected is not None
    assert len(selected.splitlines()) == 3 * len(waiting)  # the look-alike by_reason left out
    values = parse_metrics(selected)
    assert values == {name: whole[name] for name in GAUGES}
    assert values == {WAITING: sum(waiting), RUNNING: sum(running), KV_USAGE: sum(kv)}


def test_labels_without_type_lines_a_timestamp_and_the_first_line() -> None:
    text = (
        'vllm:num_requests_waiting{engine="0",model_name="a b}c"} 2\n'
        "vllm:num_requests_running 4 1700000000000\n"
        "vllm:num_requests_waiting_by_reason 9\n"
        "# vllm:kv_cache_usage_perc 1\n"
        'vllm:kv_cache_usage_perc{model_name="m"} 0.5'
    )
    selected = select_samples(text, GAUGES)
    assert selected is not None
    assert parse_metrics(selected) == {WAITING: 2.0, RUNNING: 4.0, KV_USAGE: 0.5}


def test_a_text_without_the_gauges_selects_nothing() -> None:
    assert select_samples("<html><body>not prometheus</body></html>", GAUGES) is None
    assert select_samples("# HELP x y\n# TYPE x gauge\nx 1\n", GAUGES) is None


def test_selecting_is_much_cheaper_than_the_whole_parse() -> None:
    text = vllm_metrics_text([3.0], [5.0], [0.25])

    def best(fn: object, n: int) -> float:
        assert callable(fn)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    whole = best(lambda: parse_metrics(text), 5)
    selected = best(lambda: parse_metrics(select_samples(text, GAUGES) or ""), 20)
    assert selected * 5 < whole, (selected, whole)


def test_decode_workers_nixl_histogram_reaches_the_endpoint_state() -> None:
    import asyncio

    from prometheus_client import Histogram as PromHistogram

    from pd_runtime.config.coordinator import EndpointConfig
    from pd_runtime.scheduling.plugins import EndpointState
    from pd_runtime.scheduling.scraper import MetricsScraper
    from tests.servers import FakeEngine, serve

    r = CollectorRegistry()
    Gauge(WAITING, "g", registry=r).set(1)
    Gauge(RUNNING, "g", registry=r).set(2)
    Gauge(KV_USAGE, "g", registry=r).set(0.5)
    pulls = PromHistogram("vllm:nixl_xfer_time_seconds", "h", registry=r, buckets=SECONDS)
    for seconds in (0.01, 0.03):
        pulls.observe(seconds)
    text = generate_latest(r).decode()
    app = FakeEngine("w").app()

    @app.get("/metrics")
    async def metrics() -> object:
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse(text)

    with serve(app) as url:
        address = url.removeprefix("http://")
        states = [
            EndpointState(EndpointConfig(name=n, role=role, address=address, url=url))  # type: ignore[arg-type]
            for n, role in (("decode-0", "decode"), ("prefill-0", "prefill"))
        ]

        async def once() -> None:
            scraper = MetricsScraper(states)
            await scraper.start()
            try:
                await scraper.scrape_once()
            finally:
                await scraper.stop()

        asyncio.run(once())
    decode, prefill = states
    assert decode.nixl_xfer_count == 2 and decode.nixl_xfer_seconds_sum == pytest.approx(0.04)
    assert (decode.waiting, decode.running, decode.kv_usage) == (1, 2, 0.5)
    assert prefill.nixl_xfer_count is None  # a prefill worker's pulls are not its to learn
