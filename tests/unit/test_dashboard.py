"""The coordinator's dashboard (``GET /dashboard``, ``GET /dashboard/state``) against a real
coordinator in front of recording fake engines (fakes: they also answer ``/metrics`` with vLLM's
load gauges, so the kv-aware scraper tracks them, and can be stopped on demand).

The JSON state is checked against ``/metrics``; the page itself in a headless Chromium (marked
``browser``): it loads without console errors, its numbers match ``/metrics`` after N requests,
and a stopped engine shows as down within seconds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from pd_runtime.config import CoordinatorConfig
from pd_runtime.coordinator.app import create_app
from pd_runtime.coordinator.metrics_window import MetricsWindow, histogram_quantile
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import KVAwareScheduler
from tests.browser import chromium, console_errors, wait_until
from tests.dashboard_page import (
    from_metrics,
    latency_count,
    open_live,
    read_page,
    wait_matching,
)
from tests.servers import FakeEngine, serve, wait_for

N = 12  # requests per test
SHARED = "the same long system prompt every request starts with " * 2


@dataclass
class ScrapedEngine(FakeEngine):
    """A FakeEngine that also answers ``/metrics`` with vLLM's load gauges."""

    waiting: int = 1
    running: int = 2
    kv_usage: float = 0.25

    def app(self) -> FastAPI:
        app = super().app()

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(
                f"vllm:num_requests_waiting {self.waiting}\n"
                f"vllm:num_requests_running {self.running}\n"
                f"vllm:kv_cache_usage_perc {self.kv_usage}\n"
            )

        return app


class WordTokenized(KVAwareScheduler):
    """Tokenizes a prompt as one token per word (no tokenizer needed for the test)."""

    async def prepare(self, request: SchedulingRequest) -> SchedulingRequest:
        tokens = [hash(w) % 50_000 for w in str(request.body.get("prompt", "")).split()]
        return replace(request, token_ids=tokens, block_keys=PrefixIndex.block_keys(tokens, 4))


@dataclass
class Gateway:
    url: str
    app: FastAPI
    engines: dict[str, ScrapedEngine]
    stops: dict[str, ExitStack]

    def send(self, n: int = N, *, headers: dict[str, str] | None = None) -> None:
        for i in range(n):
            # Half the prompts repeat: the pending overlay gives the prefix hit ratio something.
            body = {"model": "tiny", "prompt": f"{SHARED} question {i % (n // 2 or 1)}"}
            body["stream"] = i % 3 == 0
            response = httpx.post(
                f"{self.url}/v1/completions", json=body, headers=headers, timeout=10
            )
            assert response.status_code == 200, response.text

    def stop(self, name: str) -> None:
        self.stops[name].close()

    def state(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/dashboard/state", headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def metrics(self) -> dict[str, Any]:
        return from_metrics(self.metrics_text())


@contextmanager
def gateway(
    policy: str = "kv-aware", params: dict[str, Any] | None = None, **config: Any
) -> Iterator[Gateway]:
    """A coordinator in front of two scraped fake decode engines and one prefill engine."""
    engines = {name: ScrapedEngine(name) for name in ("decode-a", "decode-b", "prefill-a")}
    with ExitStack() as outer:
        stops, endpoints = {}, []
        for name, engine in engines.items():
            stops[name] = stack = outer.enter_context(ExitStack())
            url = stack.enter_context(serve(engine.app()))
            role = name.split("-")[0]
            address = url.removeprefix("http://")
            endpoints.append({"name": name, "role": role, "address": address, "url": url})
        settings = {"models": ["tiny"], "endpoints": endpoints, **config}
        settings["scheduler"] = {"policy": policy}
        coordinator = CoordinatorConfig.model_validate(settings)
        scheduler = None
        if policy == "kv-aware":
            scheduler = WordTokenized(
                coordinator.endpoints,
                block_size=4,
                pd_threshold_tokens=16,
                scrape_interval_s=0.1,
                unhealthy_after_failures=2,
                **(params or {}),
            )
        app = create_app(coordinator, scheduler)
        url = outer.enter_context(serve(app))
        yield Gateway(url, app, engines, stops)


@pytest.fixture
def kv_gateway() -> Iterator[Gateway]:
    with gateway() as g:
        wait_for(lambda: g.state()["endpoints"][0]["waiting"] is not None, what="first scrape")
        yield g


# ---- the JSON state ------------------------------------------------------------------------


def test_state_matches_metrics_and_the_scheduler_after_n_requests(kv_gateway: Gateway) -> None:
    kv_gateway.send()
    state, metrics = kv_gateway.state(), kv_gateway.metrics()

    assert state["policy"] == "kv-aware"
    assert state["requests"]["total"] == metrics["requests"] == N
    assert state["decisions"]["total"] == metrics["decisions"] == N
    modes = {f"{d['mode']}/{d['reason']}": d["total"] for d in state["decisions"]["by_mode_reason"]}
    assert modes == metrics["modes"]
    assert {"direct", "disaggregated"} <= {key.split("/")[0] for key in modes}
    prefix = state["prefix"]
    assert (prefix["prompt_tokens"], prefix["cached_tokens"]) == (
        metrics["prompt_tokens"],
        metrics["cached_tokens"],
    )
    assert 0 < prefix["cached_tokens"] < prefix["prompt_tokens"]
    assert prefix["hit_ratio"] == pytest.approx(prefix["cached_tokens"] / prefix["prompt_tokens"])

    endpoints = {e["name"]: e for e in state["endpoints"]}
    assert set(endpoints) == {"decode-a", "decode-b", "prefill-a"}
    for e in endpoints.values():
        assert (e["healthy"], e["waiting"], e["running"], e["kv_usage"]) == (True, 1, 2, 0.25)
    decode = {n: e for n, e in endpoints.items() if e["role"] == "decode"}
    assert {n: e["decisions"] for n, e in decode.items() if e["decisions"]} == metrics["endpoints"]
    assert sum(e["share"] for e in decode.values()) == pytest.approx(1.0)
    assert endpoints["prefill-a"]["decisions"] is None  # not a label of the decision counter
    assert all(e["in_flight"] == 0 for e in decode.values())

    # The coordinator is younger than a minute: the window reaches back to its start.
    latency = state["latency"]
    assert latency["request_seconds"]["count"] == N
    assert 0 < latency["request_seconds"]["p50"] <= latency["request_seconds"]["p99"]
    assert latency["decision_seconds"]["count"] == N
    # Every streamed answer (a third of them) gave a TTFT and, after its 3 chunks 10 ms apart,
    # a time per event; the non-streamed ones neither.
    streamed = sum(1 for i in range(N) if i % 3 == 0)
    assert latency["ttft_seconds"]["count"] == latency["tpot_seconds"]["count"] == streamed
    assert 0.005 <= latency["tpot_seconds"]["p50"] <= 0.1
    assert latency["learned"] is None  # the default profiles do not time answers


def test_latest_decisions_add_up_and_rates_come_from_polls(kv_gateway: Gateway) -> None:
    window: MetricsWindow = kv_gateway.app.state.dashboard.window
    kv_gateway.state()
    kept = len(window.kept)
    kv_gateway.send()
    assert len(window.kept) == kept  # requests read nothing: readings are taken per poll
    wait_for(lambda: kv_gateway.state() and len(window.kept) > kept, 3, "a second reading")
    state = kv_gateway.state()
    assert sum(r["count"] for r in state["recent"]) == N
    assert {r["decode"] for r in state["recent"]} <= {"decode-a", "decode-b"}
    assert state["window"]["rate_s"] > 0
    assert state["decisions"]["per_s"] == pytest.approx(N / state["window"]["rate_s"])


def test_a_stopped_engine_turns_unhealthy_in_the_state(kv_gateway: Gateway) -> None:
    kv_gateway.stop("decode-b")

    def healthy() -> dict[str, bool | None]:
        return {e["name"]: e["healthy"] for e in kv_gateway.state()["endpoints"]}

    assert wait_for(lambda: healthy()["decode-b"] is False, 5, "decode-b down") < 5
    assert healthy() == {"decode-a": True, "decode-b": False, "prefill-a": True}


def test_a_latency_learning_policy_shows_its_learned_model() -> None:
    with gateway(params={"pd_decider": "predicted"}) as g:
        g.send()
        state = g.state()
    learned = state["latency"]["learned"]
    assert learned is not None  # pd_decider: predicted times the answers
    # Each streamed answer's TTFT taught one line: the decode endpoint's, or the prefill
    # endpoint's when it was disaggregated.
    assert sum(m["ttft"]["n"] for m in learned.values()) == N // 3


def test_round_robin_tracks_no_health_or_load() -> None:
    with gateway("round-robin") as g:
        g.send(4)
        state = g.state()
    assert state["policy"] == "RoundRobinScheduler"
    for e in state["endpoints"]:
        assert (e["healthy"], e["waiting"], e["kv_usage"]) == (None, None, None)
    decode = [e for e in state["endpoints"] if e["role"] == "decode"]
    assert [e["decisions"] for e in decode] == [2, 2]
    assert [d["mode"] for d in state["decisions"]["by_mode_reason"]] == ["disaggregated"]


def test_with_api_keys_the_page_is_open_and_its_data_needs_a_key() -> None:
    with gateway("round-robin", api_keys=["sesame"]) as g:
        for path in ("/dashboard", "/dashboard/dashboard.js", "/dashboard/dashboard.css"):
            assert httpx.get(f"{g.url}{path}").status_code == 200, path
        assert httpx.get(f"{g.url}/dashboard/state").status_code == 401
        assert g.state({"authorization": "Bearer sesame"})["requests"]["total"] == 0


def test_the_page_ships_every_asset_it_uses() -> None:
    with gateway("round-robin") as g:
        page = httpx.get(f"{g.url}/dashboard")
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert "http://" not in page.text and "https://" not in page.text
        for asset in ("/dashboard/dashboard.js", "/dashboard/dashboard.css"):
            assert asset in page.text
            text = httpx.get(f"{g.url}{asset}").text
            assert "http://" not in text and "https://" not in text


# ---- the window's arithmetic ---------------------------------------------------------------


def test_histogram_quantile_interpolates_like_promql() -> None:
    buckets = [(0.1, 0.0), (0.5, 10.0), (1.0, 20.0), (float("inf"), 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.75)
    assert histogram_quantile(0.99, [(1.0, 1.0), (float("inf"), 10.0)]) == 1.0  # in +Inf
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_window_keeps_one_reading_per_gap_for_the_span() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    counter = Counter("c", "a counter", registry=registry)
    clock = [0.0]
    window = MetricsWindow(registry, span_s=60, min_gap_s=1, clock=lambda: clock[0])
    for _ in range(200):  # a poll every 0.5 s for 100 s, one increment each
        counter.inc()
        now = window.poll()
        clock[0] += 0.5
    assert len(window.kept) == 61  # one a second for 60 s, and the one just before
    base = window.since(now, 60)
    assert now.at - base.at <= 60
    assert now.total("c_total") - base.total("c_total") == pytest.approx(2 * (now.at - base.at))
    assert now.at - 10 <= window.since(now, 10).at <= now.at - 9  # kept readings are 1 s apart


# ---- the page, in a headless Chromium ------------------------------------------------------


@pytest.mark.browser
def test_page_in_a_browser_matches_metrics_and_shows_a_stopped_engine_down(
    kv_gateway: Gateway, tmp_path: Path
) -> None:
    with chromium() as browser:
        open_live(browser, kv_gateway.url)
        kv_gateway.send()
        wait_matching(browser, kv_gateway.metrics_text, 10)
        page = read_page(browser)
        assert page["decisions"] == page["requests"] == N
        assert {e["health"] for e in page["endpoints"].values()} == {"up"}
        streamed = sum(1 for i in range(N) if i % 3 == 0)  # Gateway.send streams every third
        wait_until(lambda: latency_count(browser, "TTFT (streams)") == streamed, 5, "the TTFT row")
        assert latency_count(browser, "TPOT (streams)") == streamed
        browser.save_screenshot(str(tmp_path / "dashboard.png"))

        kv_gateway.stop("decode-b")
        took = wait_until(
            lambda: read_page(browser)["endpoints"]["decode-b"]["health"] == "down",
            6,
            "decode-b shown down",
        )
        assert read_page(browser)["endpoints"]["decode-a"]["health"] == "up"
        browser.save_screenshot(str(tmp_path / "dashboard-down.png"))
        assert console_errors(browser) == []
    assert took < 6
    print(f"screenshots in {tmp_path}; decode-b shown down {took:.1f}s after it stopped")


@pytest.mark.browser
def test_page_in_a_browser_asks_for_the_api_key() -> None:
    with gateway("round-robin", api_keys=["sesame"]) as g, chromium() as browser:
        browser.get(f"{g.url}/dashboard")
        key_form = browser.find_element("id", "key-form")
        wait_until(key_form.is_displayed, 10, "the key form")
        browser.find_element("id", "key").send_keys("sesame\n")
        wait_until(lambda: read_page(browser)["status"] == "live", 10, "the page with the key")
        assert not key_form.is_displayed()
        # The 401 before the key is the only console error (the browser logs failed fetches).
        errors = console_errors(browser)
        assert all("401" in e["message"] for e in errors), errors


@pytest.mark.browser
def test_page_in_a_browser_shows_a_learned_latency_model() -> None:
    with gateway(params={"pd_decider": "predicted"}) as g, chromium() as browser:
        g.send()
        open_live(browser, g.url)
        learned = browser.find_element("id", "learned")
        assert learned.is_displayed()
        rows = learned.find_elements("css selector", "tbody tr")
        assert len(rows) == len(g.state()["latency"]["learned"]) > 0  # endpoints with samples
        assert not browser.find_element("id", "learned-off").is_displayed()
        assert console_errors(browser) == []
