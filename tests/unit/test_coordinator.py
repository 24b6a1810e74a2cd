"""The coordinator's HTTP edge against recording fake sidecars (fakes: only routing is under test)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from pd_runtime.config import CoordinatorConfig
from pd_runtime.coordinator.app import create_app
from tests.servers import FakeEngine, serve


@pytest.fixture
def gateway() -> Iterator[tuple[str, list[FakeEngine]]]:
    fakes = [FakeEngine("sidecar-0"), FakeEngine("sidecar-1")]
    with serve(fakes[0].app()) as url0, serve(fakes[1].app()) as url1:
        config = CoordinatorConfig.model_validate(
            {
                "models": ["tiny"],
                "endpoints": [
                    {
                        "name": "prefill-0",
                        "role": "prefill",
                        "address": "127.0.0.1:9100",
                        "url": "http://127.0.0.1:9100",
                    },
                    {
                        "name": "decode-0",
                        "role": "decode",
                        "address": "127.0.0.1:9200",
                        "url": url0,
                    },
                    {
                        "name": "decode-1",
                        "role": "decode",
                        "address": "127.0.0.1:9201",
                        "url": url1,
                    },
                ],
            }
        )
        with serve(create_app(config)) as url:
            yield url, fakes


def test_routes_round_robin_with_the_prefill_header_and_logs_pod_scores(gateway, caplog) -> None:
    url, fakes = gateway
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    served = []
    for i in range(4):
        response = httpx.post(
            f"{url}/v1/completions",
            json=body,
            headers={"x-request-id": f"req-{i}", "x-prefiller-host-port": "evil:1"},
        )
        assert response.status_code == 200
        served.append(response.json()["served_by"])
    assert served == ["sidecar-0", "sidecar-1", "sidecar-0", "sidecar-1"]
    for fake in fakes:
        # The client's routing header was replaced by the coordinator's own choice.
        assert all(h["x-prefiller-host-port"] == "127.0.0.1:9100" for h in fake.headers)
        assert fake.requests == [body, body]
    lines = [r.getMessage() for r in caplog.records if "Got pod scores" in r.getMessage()]
    records = [json.loads(line.split("Got pod scores ", 1)[1]) for line in lines]
    assert [r["x-request-id"] for r in records] == [f"req-{i}" for i in range(4)]
    assert records[0] == {
        "x-request-id": "req-0",
        "model": "tiny",
        "scores": None,
        "target": "127.0.0.1:9200",
        "prefill": "127.0.0.1:9100",
    }
    metrics = httpx.get(f"{url}/metrics").text
    assert (
        'pd_coordinator_decisions_total{decode="decode-1",mode="disaggregated",reason="policy"} 2.0'
        in metrics
    )
    assert 'pd_coordinator_in_flight{decode="decode-0"} 0.0' in metrics


def test_generates_a_request_id_when_the_client_sends_none(gateway) -> None:
    url, fakes = gateway
    httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
    )
    assert len(fakes[0].headers[0]["x-request-id"]) == 32


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"prompt": "x"}', 400, "'model' is required"),
        (b'{"model": "gpt-7", "prompt": "x"}', 404, "gpt-7"),
        (b"\xff\xfe", 400, "not valid JSON"),
    ],
)
def test_bad_requests_get_openai_errors_and_reach_no_worker(
    gateway, content, status, needle
) -> None:
    url, fakes = gateway
    response = httpx.post(
        f"{url}/v1/completions", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and error["code"] == status
    assert all(not fake.requests for fake in fakes)


def test_models_health_and_unknown_paths(gateway) -> None:
    url, _ = gateway
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["tiny"]
    assert httpx.get(f"{url}/health").status_code == 200
    missing = httpx.get(f"{url}/v2/whatever")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"


def test_unreachable_decode_endpoint_is_a_502_not_a_hang() -> None:
    config = CoordinatorConfig.model_validate(
        {
            "models": ["tiny"],
            "endpoints": [
                {
                    "name": "decode-0",
                    "role": "decode",
                    "address": "127.0.0.1:1",
                    "url": "http://127.0.0.1:1",
                }
            ],
        }
    )
    with serve(create_app(config)) as url:
        response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert response.status_code == 502
    assert response.json()["error"]["type"] == "BadGatewayError"


def test_a_scheduler_bug_is_a_500_in_openai_format_not_a_crash() -> None:
    from pd_runtime.scheduling.base import Scheduler

    class Broken(Scheduler):
        def schedule(self, request):  # type: ignore[no-untyped-def]
            raise ZeroDivisionError("oops")

    config = CoordinatorConfig.model_validate(
        {
            "models": ["tiny"],
            "endpoints": [
                {
                    "name": "d",
                    "role": "decode",
                    "address": "127.0.0.1:1",
                    "url": "http://127.0.0.1:1",
                }
            ],
        }
    )
    with serve(create_app(config, scheduler=Broken(config.endpoints))) as url:
        response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert response.status_code == 500
        assert "ZeroDivisionError" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200
