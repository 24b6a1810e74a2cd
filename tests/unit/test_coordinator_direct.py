"""``direct_to_worker``: requests served without prefill go from the coordinator straight to the
decode worker (the endpoint's address), skipping the sidecar; disaggregated ones still go through
the sidecar; a client's ``kv_transfer_params`` never reaches the worker either way. Fakes stand in
for the sidecar and the worker (only where the coordinator sends each request is under test)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from pd_runtime.config import CoordinatorConfig
from pd_runtime.coordinator.app import create_app
from pd_runtime.launcher.topology import plan_deployment
from pd_runtime.platform import Platform
from tests.servers import FakeEngine, serve
from tests.unit.test_topology import config as deployment

BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


def config(worker: str, sidecar: str, *, prefill: bool, direct: bool) -> CoordinatorConfig:
    endpoints: list[dict[str, Any]] = [
        {
            "name": "decode-0",
            "role": "decode",
            "address": worker.removeprefix("http://"),
            "url": sidecar,
        }
    ]
    if prefill:
        endpoints.append(
            {
                "name": "prefill-0",
                "role": "prefill",
                "address": "127.0.0.1:9100",
                "url": "http://127.0.0.1:9100",
            }
        )
    return CoordinatorConfig.model_validate(
        {"models": ["tiny"], "endpoints": endpoints, "direct_to_worker": direct}
    )


def test_direct_requests_skip_the_sidecar_and_client_transfer_params_are_dropped() -> None:
    worker, sidecar = FakeEngine("worker"), FakeEngine("sidecar")
    with serve(worker.app()) as worker_url, serve(sidecar.app()) as sidecar_url:
        cfg = config(worker_url, sidecar_url, prefill=False, direct=True)
        with serve(create_app(cfg)) as url:
            ok = httpx.post(f"{url}/v1/completions", json=BODY)
            assert ok.status_code == 200 and ok.json()["served_by"] == "worker"
            hostile = {**BODY, "kv_transfer_params": {"remote_host": "10.0.0.66"}}
            assert httpx.post(f"{url}/v1/completions", json=hostile).status_code == 200
    assert worker.requests == [BODY, BODY]
    assert sidecar.requests == []
    assert all("x-prefiller-host-port" not in h for h in worker.headers)


def test_disaggregated_requests_still_go_through_the_sidecar() -> None:
    worker, sidecar = FakeEngine("worker"), FakeEngine("sidecar")
    with serve(worker.app()) as worker_url, serve(sidecar.app()) as sidecar_url:
        cfg = config(worker_url, sidecar_url, prefill=True, direct=True)
        with serve(create_app(cfg)) as url:
            assert httpx.post(f"{url}/v1/completions", json=BODY).json()["served_by"] == "sidecar"
    assert worker.requests == []
    assert sidecar.headers[0]["x-prefiller-host-port"] == "127.0.0.1:9100"


def test_off_by_default_every_request_goes_to_the_sidecar() -> None:
    worker, sidecar = FakeEngine("worker"), FakeEngine("sidecar")
    with serve(worker.app()) as worker_url, serve(sidecar.app()) as sidecar_url:
        cfg = config(worker_url, sidecar_url, prefill=False, direct=False)
        assert CoordinatorConfig.model_fields["direct_to_worker"].default is False
        with serve(create_app(cfg)) as url:
            assert httpx.post(f"{url}/v1/completions", json=BODY).json()["served_by"] == "sidecar"
    assert worker.requests == []


def test_the_deployment_setting_reaches_the_coordinator(tmp_path: Path) -> None:
    platform = Platform("cpu", 0, (0, 1))
    on = plan_deployment(deployment(coordinator__direct_to_worker=True), tmp_path, platform)
    assert on.coordinator.direct_to_worker is True
    assert plan_deployment(deployment(), tmp_path, platform).coordinator.direct_to_worker is False
