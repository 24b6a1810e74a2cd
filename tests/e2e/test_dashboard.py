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
from tests.browser import chromium, console_errors
from tests.dashboard_page import latency_count, open_live, read_page, wait_matching
from tests.e2e.conftest import Deployment

N = 6

pytestmark = pytest.mark.browser


def test_dashboard_shows_the_gateways_metrics_after_real_requests(
    deployment: Deployment, tmp_path: Path
) -> None:
    deployment.wait_all_healthy()  # an earlier test may have restarted a worker
    with chromium() as browser:
        open_live(browser, deployment.gateway, 30)
        before = read_page(browser)
        ttft_before = deployment.gateway_metric("pd_coordinator_ttft_seconds_count")
        for i in range(N):
            prompt = f"dashboard {uuid.uuid4().hex if i % 2 == 0 else ''} {DEMO_PROMPT}"
            request_id = f"dashboard-{i}-{uuid.uuid4().hex[:8]}"
            streamed = i >= N // 2  # the last half as SSE streams: they have a TTFT
            response = deployment.post_completion(prompt, request_id, stream=streamed)
            assert response.status_code == 200, response.text
        wait_matching(browser, lambda: httpx.get(f"{deployment.gateway}/metrics").text, 15)
        page = read_page(browser)
        # Every stream's TTFT reached the gateway's histogram and the page's last minute.
        ttft = deployment.gateway_metric("pd_coordinator_ttft_seconds_count") - ttft_before
        assert ttft == N - N // 2
        assert latency_count(browser, "TTFT (streams)") >= ttft
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
