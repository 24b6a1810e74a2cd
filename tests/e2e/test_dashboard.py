"""The coordinator's dashboard on the shared real deployment, in a headless Chromium: after real
requests through the gateway (a new prompt, then the same prompt again: one disaggregated, one
served where its blocks already are), the page shows what the gateway's ``/metrics`` says, every
worker up with the KV usage its scrape found, and no console error. Nothing here stops a worker
(other tests share the deployment); the page's "down" is checked in the unit-level browser test.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from pd_runtime.demo import DEMO_PROMPT
from tests.browser import chromium, console_errors, wait_until
from tests.dashboard_page import comparable, from_metrics, read_page
from tests.e2e.conftest import Deployment

N = 6

pytestmark = pytest.mark.browser


def test_dashboard_shows_the_gateways_metrics_after_real_requests(
    deployment: Deployment, tmp_path: Path
) -> None:
    with chromium() as browser:
        browser.get(f"{deployment.gateway}/dashboard")
        wait_until(lambda: read_page(browser)["status"] == "live", 30, "the first render")
        before = read_page(browser)
        for i in range(N):
            prompt = f"dashboard {uuid.uuid4().hex if i % 2 == 0 else ''} {DEMO_PROMPT}"
            deployment.complete(prompt, f"dashboard-{i}-{uuid.uuid4().hex[:8]}")

        def metrics() -> dict[str, object]:
            return from_metrics(httpx.get(f"{deployment.gateway}/metrics", timeout=10).text)

        wait_until(
            lambda: comparable(read_page(browser)) == metrics(), 15, "the page to match /metrics"
        )
        page = read_page(browser)
        assert page["requests"] == before["requests"] + N
        assert page["decisions"] >= before["decisions"] + N
        assert page["prompt_tokens"] > before["prompt_tokens"]
        names = {e.name for e in (*deployment.prefill, *deployment.decode)}
        assert set(page["endpoints"]) == names
        assert {e["health"] for e in page["endpoints"].values()} == {"up"}
        state = httpx.get(f"{deployment.gateway}/dashboard/state", timeout=10).json()
        assert all(e["kv_usage"] is not None for e in state["endpoints"])
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        assert console_errors(browser) == []
    print(f"screenshot: {tmp_path / 'dashboard.png'}")
