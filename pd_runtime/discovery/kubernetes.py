"""``kubernetes``: worker pods found by label through the Kubernetes API (the real client).

A pod becomes an endpoint when all of these hold::

    label  <role_label> = prefill | decode        (pd-runtime/role)
    status.podIP set, phase Running, condition Ready = True, no deletionTimestamp
    a serving port: annotation pd-runtime/port, else the container port named <port_name>

and maps to (VPORT: annotation pd-runtime/vllm-port, else the port named <vllm_port_name>,
else PORT)::

    name      the pod's name
    address   PODIP:VPORT       vLLM itself: pod scores, x-prefiller-host-port, the KV-event
                                topic kv@PODIP:VPORT@MODEL, /metrics
    url       http://PODIP:PORT where requests go (a decode pod's sidecar; a prefill pod's vLLM)
    kv_events tcp://PODIP:KVPORT  (the worker binds tcp://*:KVPORT; the coordinator connects)

The client is synchronous (urllib3), so list+watch runs in one daemon thread::

    loop:  list pods (selector)  -> replace the known pods, remember resourceVersion
           watch from it (timeout = watch_timeout_s, bookmarks on)
               ADDED/MODIFIED -> pod's endpoint (or none: not ready, terminating...)
               DELETED        -> forget the pod
               ERROR 410      -> relist at once (that resourceVersion was compacted away)
           watch ended        -> watch again from the last resourceVersion seen
           every resync_period_s -> relist (corrects anything a watch could have missed)
           API error / unreachable -> keep the known pods, retry with exponential backoff,
                                      then relist

After each change the thread hands the new endpoint set to the event loop, where one pump task
awaits ``on_change`` with the newest set (intermediate sets are coalesced).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pd_runtime.config.discovery import DiscoveryConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.discovery.base import Discovery, EndpointsCallback
from pd_runtime.errors import ConfigError

__all__ = [
    "ANNOTATION_KV_EVENTS_PORT",
    "ANNOTATION_KV_EVENTS_REPLAY_PORT",
    "ANNOTATION_PORT",
    "ANNOTATION_VLLM_PORT",
    "KubernetesDiscovery",
    "endpoint_from_pod",
    "make_core_api",
]

log = logging.getLogger(__name__)

ANNOTATION_PORT = "pd-runtime/port"
ANNOTATION_VLLM_PORT = "pd-runtime/vllm-port"
ANNOTATION_KV_EVENTS_PORT = "pd-runtime/kv-events-port"
ANNOTATION_KV_EVENTS_REPLAY_PORT = "pd-runtime/kv-events-replay-port"
ROLES = ("prefill", "decode")
_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
_HTTP_GONE = 410


def _port(pod: Any, annotation: str, port_name: str) -> int | None:
    """The annotation's value if set, else the container port with that name."""
    value = (pod.metadata.annotations or {}).get(annotation)
    if value is not None:
        try:
            return int(value)
        except ValueError:
            log.warning(
                "pod %s: annotation %s=%r is not a port", pod.metadata.name, annotation, value
            )
            return None
    for container in pod.spec.containers or []:
        for port in container.ports or []:
            if port.name == port_name:
                return int(port.container_port)
    return None


def _ready(pod: Any) -> bool:
    status = pod.status
    if status is None or pod.metadata.deletion_timestamp is not None:
        return False
    if status.phase != "Running" or not status.pod_ip:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def endpoint_from_pod(pod: Any, config: DiscoveryConfig) -> EndpointConfig | None:
    """The endpoint a pod (a ``V1Pod``) serves as, or None while it cannot serve."""
    role = (pod.metadata.labels or {}).get(config.role_label)
    if role not in ROLES or not _ready(pod):
        return None
    port = _port(pod, ANNOTATION_PORT, config.port_name)
    if port is None:
        log.warning("pod %s has no port %r: ignored", pod.metadata.name, config.port_name)
        return None
    ip = pod.status.pod_ip
    host = f"[{ip}]" if ":" in ip else ip  # IPv6 pods
    vllm_port = _port(pod, ANNOTATION_VLLM_PORT, config.vllm_port_name) or port
    kv_port = _port(pod, ANNOTATION_KV_EVENTS_PORT, config.kv_events_port_name)
    replay_port = _port(pod, ANNOTATION_KV_EVENTS_REPLAY_PORT, config.kv_events_replay_port_name)
    return EndpointConfig(
        name=pod.metadata.name,
        role=role,
        address=f"{host}:{vllm_port}",
        url=f"http://{host}:{port}",
        kv_events=f"tcp://{host}:{kv_port}" if kv_port else None,
        kv_events_replay=f"tcp://{host}:{replay_port}" if replay_port else None,
        kv_events_bind=False,
    )


def _namespace(config: DiscoveryConfig) -> str:
    if config.namespace:
        return config.namespace
    with contextlib.suppress(OSError):
        return _NAMESPACE_FILE.read_text().strip()
    return os.environ.get("POD_NAMESPACE") or "default"


def make_core_api(config: DiscoveryConfig) -> Any:
    """A ``CoreV1Api``: ``api_server`` if given, else in-cluster, else the kubeconfig."""
    try:
        from kubernetes import client
        from kubernetes import config as kube_config
    except ImportError as exc:  # pragma: no cover - the k8s extra is missing
        raise ConfigError(
            "discovery type 'kubernetes' needs the kubernetes client: pip install 'pd-runtime[k8s]'"
        ) from exc
    if config.api_server:
        configuration = client.Configuration()
        configuration.host = config.api_server.rstrip("/")
        return client.CoreV1Api(client.ApiClient(configuration))
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        try:
            kube_config.load_kube_config(config_file=config.kubeconfig)
        except (kube_config.ConfigException, OSError) as exc:
            raise ConfigError(f"discovery: no Kubernetes API to talk to: {exc}") from exc
    return client.CoreV1Api()


class _Relist(Exception):
    """The watch's resourceVersion expired (410 Gone): list again before watching."""


class KubernetesDiscovery(Discovery):
    """List+watch worker pods; see the module docstring. ``api`` (a ``CoreV1Api``) is made
    from the config when not given."""

    def __init__(
        self,
        config: DiscoveryConfig,
        endpoints: Any = (),
        *,
        api: Any = None,
        roles: tuple[str, ...] = ROLES,
    ) -> None:
        self.config = config
        self.namespace = _namespace(config)
        self.roles = roles
        self._api = api
        self._pods: dict[str, EndpointConfig | None] = {}  # pod name -> endpoint (None: not ready)
        self._lock = threading.Lock()
        self._latest: list[EndpointConfig] = []
        self._delivered: list[EndpointConfig] = []
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: Any = None
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump: asyncio.Task[None] | None = None
        self.stats = {"lists": 0, "watches": 0, "events": 0, "relists_410": 0, "errors": 0}
        self.last_error: str | None = None

    # ---- Discovery ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[EndpointConfig]:
        return list(self._delivered)

    async def start(self, on_change: EndpointsCallback) -> None:
        from kubernetes import watch

        if self._api is None:
            self._api = make_core_api(self.config)
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._watch = watch.Watch()
        self._pump = asyncio.create_task(self._deliver(on_change), name="k8s-discovery-pump")
        self._thread = threading.Thread(target=self._run, name="k8s-discovery", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.config.initial_sync_timeout_s
        while not self._synced.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if not self._synced.is_set():
            log.warning(
                "no pod list from the Kubernetes API after %.0f s (%s); serving without "
                "discovered endpoints and retrying",
                self.config.initial_sync_timeout_s,
                self.last_error,
            )
        # Let the pump hand over the first set before the coordinator starts serving.
        deadline = time.monotonic() + 5.0
        while self._delivered != self._snapshot() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()  # also shuts the socket of a watch blocked in a read
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = None

    def debug_state(self) -> dict[str, Any]:
        with self._lock:
            pods = {name: (e.address if e else None) for name, e in self._pods.items()}
        return {
            "type": "kubernetes",
            "namespace": self.namespace,
            "label_selector": self.config.label_selector,
            "pods": pods,
            "endpoints": [e.model_dump() for e in self._delivered],
            "stats": dict(self.stats),
            "last_error": self.last_error,
        }

    # ---- the event loop side -----------------------------------------------------------------

    async def _deliver(self, on_change: EndpointsCallback) -> None:
        assert self._changed is not None
        while True:
            await self._changed.wait()
            self._changed.clear()
            latest = self._snapshot()
            if latest == self._delivered:
                continue
            try:
                await on_change(latest)
            except Exception:
                log.exception("applying discovered endpoints failed")
            self._delivered = latest

    def _snapshot(self) -> list[EndpointConfig]:
        with self._lock:
            return list(self._latest)

    def _publish(self) -> None:
        """Thread side: recompute the endpoint set and wake the pump if it changed."""
        with self._lock:
            latest = sorted(
                (e for e in self._pods.values() if e is not None and e.role in self.roles),
                key=lambda e: e.name,
            )
            if latest == self._latest:
                return
            self._latest = latest
        log.info(
            "discovered endpoints: %s", ", ".join(f"{e.name}={e.address}" for e in latest) or "none"
        )
        assert self._loop is not None and self._changed is not None
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._changed.set)

    # ---- the thread --------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.config.backoff_initial_s
        version: str | None = None
        listed_at = 0.0
        while not self._stopping.is_set():
            try:
                if version is None or time.monotonic() - listed_at > self.config.resync_period_s:
                    version = self._list()
                    listed_at = time.monotonic()
                backoff = self.config.backoff_initial_s
                version = self._watch_from(version)
            except _Relist:
                version = None
                self.stats["relists_410"] += 1
                log.info("pod watch expired (410 Gone): listing again")
            except Exception as exc:
                if self._stopping.is_set():
                    break
                version = None  # list again once the API answers: events may have been missed
                self.stats["errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                log.warning(
                    "Kubernetes API error (%s); keeping %d known endpoints, retrying in %.1f s",
                    self.last_error,
                    len(self._latest),
                    backoff,
                )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)

    def _list(self) -> str:
        pods = self._api.list_namespaced_pod(
            self.namespace,
            label_selector=self.config.label_selector,
            _request_timeout=(5.0, 30.0),
        )
        with self._lock:
            self._pods = {p.metadata.name: endpoint_from_pod(p, self.config) for p in pods.items}
        self.stats["lists"] += 1
        self._synced.set()
        self._publish()
        return str(pods.metadata.resource_version)

    def _watch_from(self, version: str) -> str:
        """Watch from ``version`` until the server ends the watch; returns the last
        resourceVersion seen (events and bookmarks), to resume from."""
        from kubernetes.client.rest import ApiException

        self.stats["watches"] += 1
        timeout = max(1, int(self.config.watch_timeout_s))
        stream = self._watch.stream(
            self._api.list_namespaced_pod,
            self.namespace,
            label_selector=self.config.label_selector,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            # The server ends the watch after ``timeout``; the read timeout only catches a
            # connection that went silent without closing.
            _request_timeout=(5.0, timeout + 30.0),
        )
        try:
            for event in stream:
                if self._stopping.is_set():
                    break
                if event is not None:  # the client yields None for blank keep-alive lines
                    self._apply(event)
        except ApiException as exc:
            if exc.status == _HTTP_GONE:
                raise _Relist from exc
            raise
        return str(self._watch.resource_version or version)

    def _apply(self, event: dict[str, Any]) -> None:
        kind, pod = event["type"], event["object"]
        if kind == "BOOKMARK":
            return
        self.stats["events"] += 1
        name = pod.metadata.name
        with self._lock:
            if kind == "DELETED":
                self._pods.pop(name, None)
            else:  # ADDED, MODIFIED
                self._pods[name] = endpoint_from_pod(pod, self.config)
        self._publish()
