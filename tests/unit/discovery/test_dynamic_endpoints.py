"""Endpoints that join and leave while serving: the coordinator fed by Kubernetes discovery (a
stand-in API server; recording fake sidecars), and the KV-aware scheduler's add/remove of
subscribers, scraper targets and index entries (a fake ZMQ publisher bound by the "worker")."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from pd_runtime.config import CoordinatorConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.coordinator.app import create_app
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import KVAwareScheduler
from pd_runtime.scheduling.round_robin import RoundRobinScheduler
from tests.fake_kube_api import FakeKubeAPI, make_pod
from tests.servers import FakeEngine, serve, wait_for
from tests.unit.kv_events.publisher import FakePublisher
from tests.unit.kv_events.test_index import PROMPT, keys, stored

from .test_kubernetes import api_server, port_in_range

BODY = {"model": "tiny", "prompt": "hi", "max_tokens": 2}


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def served_by(url: str, n: int = 1) -> list[str]:
    """Send ``n`` completions; return which fake answered each (or the error status)."""
    out = []
    for _ in range(n):
        response = httpx.post(f"{url}/v1/completions", json=BODY, timeout=10)
        out.append(
            response.json()["served_by"]
            if response.status_code == 200
            else str(response.status_code)
        )
    return out


@pytest.mark.parametrize("policy", ["round-robin", "kv-aware"])
def test_the_coordinator_routes_to_pods_as_they_join_turn_unready_and_leave(policy: str) -> None:
    fake = FakeKubeAPI()
    sidecar_a, sidecar_b, prefill = FakeEngine("a"), FakeEngine("b"), FakeEngine("prefill")
    with (
        serve(sidecar_a.app(), port_in_range()) as url_a,
        serve(sidecar_b.app(), port_in_range()) as url_b,
        serve(prefill.app(), port_in_range()) as url_p,
        api_server(fake) as api,
    ):
        fake.put_pod(make_pod("decode-a", "decode", port=port_of(url_a)))
        fake.put_pod(make_pod("prefill-0", "prefill", port=port_of(url_p)))
        # The fakes have no /metrics: scrape rarely, so health is only discovery's to change.
        params: dict[str, Any] = (
            {"pd_threshold_tokens": 0, "scrape_interval_s": 3600, "unhealthy_after_failures": 100}
            if policy == "kv-aware"
            else {}
        )
        config = CoordinatorConfig.model_validate(
            {
                "models": ["tiny"],
                "endpoints": [],
                "scheduler": {"policy": policy, "params": params},
                "discovery": {
                    "type": "kubernetes",
                    "namespace": "pd",
                    "api_server": api,
                    "backoff_initial_s": 0.05,
                },
            }
        )
        with serve(create_app(config), port_in_range()) as url:
            # The first list is in before the coordinator serves.
            assert served_by(url, 2) == ["a", "a"]
            # Disaggregated to the discovered prefill pod, named by its pod IP:port.
            assert sidecar_a.headers[-1]["x-prefiller-host-port"] == f"127.0.0.1:{port_of(url_p)}"

            fake.put_pod(make_pod("decode-b", "decode", port=port_of(url_b)))
            wait_for(lambda: "b" in served_by(url, 2), what="decode-b to be routed to")

            fake.set_ready("decode-a", False)
            wait_for(lambda: served_by(url, 2) == ["b", "b"], what="decode-a to leave")
            before = len(sidecar_a.requests)
            assert served_by(url, 4) == ["b"] * 4 and len(sidecar_a.requests) == before

            fake.delete_pod("prefill-0")

            def direct() -> bool:
                served_by(url)  # decode-b is the only decode pod left
                return "x-prefiller-host-port" not in sidecar_b.headers[-1]

            wait_for(
                direct,
                what="prefill to leave (requests no longer disaggregated)",
            )

            fake.delete_pod("decode-b")
            wait_for(lambda: served_by(url) == ["503"], what="no decode endpoint left")
            debug = httpx.get(f"{url}/debug/scheduler").json()
            assert debug["endpoints"] == []


async def test_kv_aware_subscribes_to_a_joining_worker_and_forgets_a_leaving_one() -> None:
    pub = FakePublisher(topic="kv@10.0.0.7:8000@tiny")  # the worker binds; we connect
    decode = EndpointConfig(
        name="decode-7",
        role="decode",
        address="10.0.0.7:8000",
        url="http://10.0.0.7:8000",
        kv_events=pub.address,
        kv_events_bind=False,
    )
    static = EndpointConfig(
        name="decode-0", role="decode", address="127.0.0.1:1", url="http://127.0.0.1:1"
    )
    scheduler = KVAwareScheduler([static], block_size=4, scrape_interval_s=60)
    await scheduler.start()
    try:
        await scheduler.set_endpoints([static, decode])
        assert {s.address for s in scheduler.decode_states} == {"127.0.0.1:1", "10.0.0.7:8000"}
        assert {s.address for s in scheduler.scraper.endpoints} == {"127.0.0.1:1", "10.0.0.7:8000"}
        sub = scheduler.events.subscribers["10.0.0.7:8000"]
        assert sub.address == pub.address
        # Events published by the joined worker reach the index (SUB may miss the first sends).
        for _ in range(200):
            await pub.send([stored(1, PROMPT, 0, 3)])
            await asyncio.sleep(0.01)
            if scheduler.index.match(keys()):
                break
        assert scheduler.index.match(keys()) == {"10.0.0.7:8000": 3}

        # A request routed there, then the worker leaves before the request ends.
        request = SchedulingRequest("r1", "tiny", "/v1/completions", BODY, block_keys=keys())
        result = scheduler.schedule(request)
        assert result.decode.address == "10.0.0.7:8000"  # it holds the prefix
        await scheduler.set_endpoints([static])
        scheduler.release(request, result)  # must not fail for an endpoint that is gone
        assert "10.0.0.7:8000" not in scheduler.events.subscribers
        assert scheduler.index.match(keys()) == {} and len(scheduler.pending) == 0
        assert [s.address for s in scheduler.decode_states] == ["127.0.0.1:1"]
        scheduler.index.check_integrity()
        assert scheduler.schedule(request).decode.address == "127.0.0.1:1"
    finally:
        await scheduler.stop()
        await pub.close()


async def test_round_robin_adopts_a_new_set_and_skips_removed_endpoints() -> None:
    def ep(name: str, role: str, port: int) -> EndpointConfig:
        return EndpointConfig(name=name, role=role, address=f"h:{port}", url=f"http://h:{port}")

    scheduler = RoundRobinScheduler([ep("d0", "decode", 1)])
    request = SchedulingRequest("r", "tiny", "/v1/completions", BODY)
    assert scheduler.schedule(request).prefill is None
    await scheduler.set_endpoints(
        [ep("d1", "decode", 2), ep("d2", "decode", 3), ep("p", "prefill", 4)]
    )
    picked = {scheduler.schedule(request).decode.name for _ in range(4)}
    assert picked == {"d1", "d2"} and scheduler.schedule(request).prefill is not None


def test_the_sidecar_trusts_discovered_prefill_pods_only_while_they_are_ready() -> None:
    from pd_runtime.config.discovery import DiscoveryConfig
    from pd_runtime.sidecar.app import SidecarSettings
    from pd_runtime.sidecar.app import create_app as create_sidecar

    fake = FakeKubeAPI()
    prefill, decode = FakeEngine("prefill"), FakeEngine("decode")
    with (
        serve(prefill.app(), port_in_range()) as url_p,
        serve(decode.app(), port_in_range()) as url_d,
        api_server(fake) as api,
    ):
        prefiller = url_p.removeprefix("http://")
        settings = SidecarSettings(
            decode_url=url_d,
            allowed_prefillers=frozenset(),
            prefiller_discovery=DiscoveryConfig(
                type="kubernetes", namespace="pd", api_server=api, backoff_initial_s=0.05
            ),
        )
        with serve(create_sidecar(settings), port_in_range()) as sidecar:

            def status() -> int:
                headers = {"x-prefiller-host-port": prefiller}
                return httpx.post(
                    f"{sidecar}/v1/completions", json=BODY, headers=headers, timeout=10
                ).status_code

            assert status() == 403 and prefill.requests == []  # nothing discovered yet
            # A decode pod at that address is not a prefiller: still refused.
            fake.put_pod(make_pod("decode-x", "decode", port=port_of(url_p)))
            wait_for(lambda: fake.count("watch") >= 1, what="the watch")
            assert status() == 403
            fake.put_pod(make_pod("prefill-0", "prefill", port=port_of(url_p)))
            wait_for(lambda: status() == 200, what="the prefill pod to be trusted")
            assert prefill.requests and prefill.requests[-1]["max_tokens"] == 1  # the prefill hop
            fake.set_ready("prefill-0", False)
            wait_for(lambda: status() == 403, what="the unready prefill pod to be distrusted")
