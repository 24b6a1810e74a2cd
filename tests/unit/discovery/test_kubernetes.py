"""Pod discovery through the real ``kubernetes`` client against a stand-in API server (no
cluster here: ``tests/fake_kube_api.py`` answers list and watch as the API server does)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kubernetes.client import ApiClient

from pd_runtime.config.coordinator import CoordinatorConfig
from pd_runtime.config.discovery import DiscoveryConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.discovery import create_discovery
from pd_runtime.discovery.kubernetes import KubernetesDiscovery, endpoint_from_pod
from pd_runtime.errors import ConfigError
from pd_runtime.registries import check_names
from tests.fake_kube_api import FakeKubeAPI, make_pod
from tests.servers import serve, until

_next_port = iter(range(16100, 16999))


def port_in_range() -> int:
    """A free port from this suite's range (16000-16999)."""
    for port in _next_port:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 16100-16999")


def as_v1pod(pod: dict[str, Any]) -> Any:
    """The typed V1Pod the client makes of the API server's JSON."""
    return ApiClient().deserialize(json.dumps(pod), "V1Pod", "application/json")


def config(url: str, **overrides: Any) -> DiscoveryConfig:
    values: dict[str, Any] = {
        "type": "kubernetes",
        "namespace": "pd",
        "api_server": url,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "initial_sync_timeout_s": 5,
    }
    return DiscoveryConfig(**(values | overrides))


class Recorder:
    """The ``on_change`` callback: every endpoint set delivered, in order."""

    def __init__(self) -> None:
        self.sets: list[list[EndpointConfig]] = []

    async def __call__(self, endpoints: list[EndpointConfig]) -> None:
        self.sets.append(endpoints)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.sets[-1]] if self.sets else []


@contextmanager
def api_server(fake: FakeKubeAPI, port: int | None = None) -> Iterator[str]:
    fake.closing = False
    with serve(fake.app(), port=port or port_in_range()) as url:
        try:
            yield url
        finally:
            fake.closing = True  # open watch streams end, so the server can stop


# ---- pod -> endpoint -------------------------------------------------------------------------


def test_a_ready_pod_maps_to_an_endpoint_reached_by_pod_ip() -> None:
    cfg = DiscoveryConfig(type="kubernetes")
    pod = make_pod(
        "decode-7f9", "decode", ip="10.1.2.3", port=8000, vllm_port=8200, kv_events_port=5557
    )
    endpoint = endpoint_from_pod(as_v1pod(pod), cfg)
    assert endpoint == EndpointConfig(
        name="decode-7f9",
        role="decode",
        address="10.1.2.3:8200",  # vLLM: scores, KV-event topic, /metrics
        url="http://10.1.2.3:8000",  # the sidecar: where requests go
        kv_events="tcp://10.1.2.3:5557",
        kv_events_bind=False,  # the worker binds; the coordinator connects to the pod
    )


def test_pods_that_cannot_serve_map_to_nothing() -> None:
    cfg = DiscoveryConfig(type="kubernetes")
    unready = make_pod("p", "prefill", ready=False)
    terminating = make_pod("p", "prefill")
    terminating["metadata"]["deletionTimestamp"] = "2026-11-24T22:00:00Z"
    pending = make_pod("p", "prefill")
    pending["status"] = {"phase": "Pending"}
    no_role = make_pod("p", "router")
    no_port = make_pod("p", "prefill")
    no_port["spec"]["containers"][0]["ports"] = []
    for pod in (unready, terminating, pending, no_role, no_port):
        assert endpoint_from_pod(as_v1pod(pod), cfg) is None
    # The same pod, ready and running, does map: the checks above are what excluded them.
    assert endpoint_from_pod(as_v1pod(make_pod("p", "prefill")), cfg) is not None


def test_annotations_override_container_ports_and_ipv6_is_bracketed() -> None:
    cfg = DiscoveryConfig(type="kubernetes")
    pod = make_pod(
        "p",
        "prefill",
        ip="fd00::5",
        annotations={"pd-runtime/port": "9001", "pd-runtime/kv-events-replay-port": "5558"},
    )
    endpoint = endpoint_from_pod(as_v1pod(pod), cfg)
    assert endpoint is not None
    assert endpoint.address == "[fd00::5]:9001" and endpoint.url == "http://[fd00::5]:9001"
    assert endpoint.kv_events is None and endpoint.kv_events_replay == "tcp://[fd00::5]:5558"


def test_the_registry_knows_both_types_and_the_start_up_check_refuses_others() -> None:
    assert type(create_discovery(DiscoveryConfig(type="kubernetes", namespace="x"))).__name__ == (
        "KubernetesDiscovery"
    )
    assert type(create_discovery(DiscoveryConfig())).__name__ == "StaticDiscovery"
    config = CoordinatorConfig(models=["m"], endpoints=[], discovery=DiscoveryConfig(type="consul"))
    with pytest.raises(ConfigError, match=r"discovery.type: .*choose one of: kubernetes, static"):
        check_names(config)


# ---- list + watch ----------------------------------------------------------------------------


async def test_initial_list_then_adds_unready_and_deletes_follow_the_watch() -> None:
    fake = FakeKubeAPI()
    fake.put_pod(make_pod("decode-a", "decode", port=8001))
    fake.put_pod(make_pod("prefill-a", "prefill", port=8101))
    fake.put_pod(make_pod("other", "decode", labels={"app.kubernetes.io/part-of": "else"}))
    with api_server(fake) as url:
        discovery = KubernetesDiscovery(config(url))
        seen = Recorder()
        await discovery.start(seen)
        try:
            # start() returns with the first list delivered; the pod outside the selector is not.
            assert seen.names == ["decode-a", "prefill-a"]
            assert [e.address for e in seen.sets[-1]] == ["127.0.0.1:8001", "127.0.0.1:8101"]

            fake.put_pod(make_pod("decode-b", "decode", port=8002))
            await until(lambda: seen.names == ["decode-a", "decode-b", "prefill-a"])

            fake.set_ready("decode-a", False)  # e.g. its readiness probe failed
            await until(lambda: seen.names == ["decode-b", "prefill-a"])

            fake.set_ready("decode-a", True)
            await until(lambda: seen.names == ["decode-a", "decode-b", "prefill-a"])

            fake.delete_pod("prefill-a")
            await until(lambda: seen.names == ["decode-a", "decode-b"])
            assert discovery.endpoints == seen.sets[-1]
            assert fake.count("list") == 1  # everything after the first list came by watch
        finally:
            await discovery.stop()


async def test_a_410_gone_watch_relists_and_finds_what_the_watch_missed() -> None:
    fake = FakeKubeAPI()
    fake.put_pod(make_pod("decode-a", "decode", port=8001))
    with api_server(fake) as url:
        discovery = KubernetesDiscovery(config(url, watch_timeout_s=1))
        seen = Recorder()
        await discovery.start(seen)
        try:
            assert seen.names == ["decode-a"]
            fake.compact()  # the watch's resourceVersion is now too old to resume from
            fake.put_pod(make_pod("decode-b", "decode", port=8002), unseen=True)
            # No watch event tells of decode-b: only the relist after 410 Gone can find it.
            await until(lambda: seen.names == ["decode-a", "decode-b"], timeout_s=10)
            assert fake.count("gone") >= 1
            assert discovery.stats["relists_410"] >= 1 and fake.count("list") >= 2
        finally:
            await discovery.stop()


async def test_api_server_down_keeps_the_last_endpoints_and_retries_until_back() -> None:
    fake = FakeKubeAPI()
    fake.put_pod(make_pod("decode-a", "decode", port=8001))
    fake.put_pod(make_pod("decode-b", "decode", port=8002))
    port = port_in_range()
    with api_server(fake, port) as url:
        discovery = KubernetesDiscovery(config(url))
        seen = Recorder()
        await discovery.start(seen)
    try:
        # The API server is gone: discovery fails, retries, and keeps routing to what it knew.
        await until(lambda: discovery.stats["errors"] >= 2, timeout_s=10)
        assert seen.names == ["decode-a", "decode-b"] and len(seen.sets) == 1
        fake.delete_pod("decode-b")  # changes while it cannot see them
        with api_server(fake, port):
            await until(lambda: seen.names == ["decode-a"], timeout_s=10)
        assert (
            discovery.last_error is not None and "decode-b" not in discovery.debug_state()["pods"]
        )
    finally:
        await discovery.stop()


async def test_no_api_server_at_start_serves_without_endpoints_then_catches_up() -> None:
    fake = FakeKubeAPI()
    fake.put_pod(make_pod("decode-a", "decode", port=8001))
    port = port_in_range()
    discovery = KubernetesDiscovery(config(f"http://127.0.0.1:{port}", initial_sync_timeout_s=0.3))
    seen = Recorder()
    await discovery.start(seen)  # bounded wait, then serve without discovered endpoints
    try:
        assert seen.sets == [] and discovery.endpoints == []
        with api_server(fake, port):
            await until(lambda: seen.names == ["decode-a"], timeout_s=10)
    finally:
        await discovery.stop()


async def test_stop_ends_the_watch_thread_promptly() -> None:
    fake = FakeKubeAPI()
    with api_server(fake) as url:
        discovery = KubernetesDiscovery(config(url))
        await discovery.start(Recorder())
        thread = discovery._thread
        assert thread is not None and thread.is_alive()
        started = asyncio.get_running_loop().time()
        await discovery.stop()
        assert not thread.is_alive()
        assert asyncio.get_running_loop().time() - started < 3
