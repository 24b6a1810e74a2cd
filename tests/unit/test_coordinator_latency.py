"""The coordinator feeds the scheduler's latency model from the streams it forwards: two
stand-in decode sidecars of known timing (fakes: only the coordinator's timing is under test),
one slow to the first token and between tokens; once learned, the predicted-latency scorer sends
the load to the fast one, and an unmeetable SLO is marked in the decision line and the metrics."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from pd_runtime.config import CoordinatorConfig
from pd_runtime.coordinator.app import create_app
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import KVAwareScheduler
from tests.servers import FakeEngine, serve

FAST, SLOW = "127.0.0.1:9200", "127.0.0.1:9201"


class WordTokenized(KVAwareScheduler):
    """Tokenizes a prompt as one token per word (no tokenizer needed for the test)."""

    async def prepare(self, request: SchedulingRequest) -> SchedulingRequest:
        words = str(request.body.get("prompt", "")).split()
        tokens = [hash(w) % 50_000 for w in words]
        return replace(request, token_ids=tokens, block_keys=PrefixIndex.block_keys(tokens, 4))


@pytest.fixture
def gateway() -> Iterator[tuple[str, KVAwareScheduler, dict[str, FakeEngine]]]:
    fast = FakeEngine("fast", chunks=4, chunk_delay_s=0.002)
    slow = FakeEngine("slow", chunks=4, chunk_delay_s=0.03, hang_s=0.15)
    with serve(fast.app()) as fast_url, serve(slow.app()) as slow_url:
        endpoints = [
            {"name": "decode-fast", "role": "decode", "address": FAST, "url": fast_url},
            {"name": "decode-slow", "role": "decode", "address": SLOW, "url": slow_url},
        ]
        config = CoordinatorConfig.model_validate({"models": ["tiny"], "endpoints": endpoints})
        params: dict[str, Any] = {
            "block_size": 4,
            "latency_min_samples": 3,
            "scrape_interval_s": 3600,  # no workers behind these addresses: one failed round
            "unhealthy_after_failures": 100,
            "profiles": {
                "decode": {
                    "filters": [{"type": "slo"}],
                    "scorers": [
                        {"type": "predicted-latency", "weight": 3},
                        {"type": "cold-spreader", "weight": 1},
                    ],
                }
            },
        }
        scheduler = WordTokenized(config.endpoints, **params)
        with serve(create_app(config, scheduler)) as url:
            yield url, scheduler, {FAST: fast, SLOW: slow}


def stream(url: str, i: int, headers: dict[str, str] | None = None) -> str:
    body = {"model": "tiny", "prompt": f"prompt number {i} " + "word " * 40, "stream": True}
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers=headers or {}, timeout=10
    ) as response:
        assert response.status_code == 200
        text = "".join(response.iter_text())
    served = {json.loads(line[6:])["served_by"] for line in text.split("\n\n") if "t0" in line}
    assert len(served) == 1
    return served.pop()


def test_learns_each_endpoints_latency_from_its_streams_and_moves_load_to_the_fast_one(
    gateway, caplog
) -> None:
    url, scheduler, _ = gateway
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    served = [stream(url, i) for i in range(16)]
    model = scheduler.latency
    # Cold, the spreader alternates; both endpoints get their samples.
    assert model.warm(FAST) and model.warm(SLOW)
    assert model.warm_tpot(FAST) and model.warm_tpot(SLOW)
    ttft_fast, ttft_slow = model.ttft(FAST, 45), model.ttft(SLOW, 45)
    assert ttft_slow >= 0.15 and ttft_slow - ttft_fast > 0.1, (ttft_fast, ttft_slow)
    tpot_fast, tpot_slow = model.tpot(FAST, 1), model.tpot(SLOW, 1)
    assert tpot_slow >= 0.02 and tpot_slow - tpot_fast > 0.01, (tpot_fast, tpot_slow)
    # Warm, the predicted-latency scorer (weight 3) outweighs the spreader.
    assert served[-6:] == ["fast"] * 6, served
    assert all(s.pending_prefill_tokens == 0 for s in scheduler.states.values())

    # A TTFT target nobody can meet: served anyway, by the most headroom, and marked.
    assert stream(url, 100, {"x-slo-ttft-ms": "1"}) == "fast"
    assert stream(url, 101, {"x-slo-ttft-ms": "5000"}) == "fast"
    lines = [r.getMessage() for r in caplog.records if "Got pod scores" in r.getMessage()]
    records = [json.loads(line.split("Got pod scores ", 1)[1]) for line in lines]
    assert [r.get("slo") for r in records[-2:]] == ["unmet", "met"]
    assert "slo" not in records[0]
    metrics = httpx.get(f"{url}/metrics").text
    assert "pd_coordinator_slo_unmet_total 1.0" in metrics
    state = httpx.get(f"{url}/debug/scheduler").json()
    assert state["latency"][SLOW]["ttft"]["n"] >= 3


def test_non_streamed_answers_teach_nothing(gateway) -> None:
    url, scheduler, _ = gateway
    for i in range(4):
        body = {"model": "tiny", "prompt": f"plain {i} words here", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=10).status_code == 200
    assert scheduler.latency.describe() == {}
    assert all(s.pending_prefill_tokens == 0 for s in scheduler.states.values())
