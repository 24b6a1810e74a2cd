"""A *stand-in* Kubernetes API server (a fake: no cluster runs here) for the pod discovery tests.

It serves the two calls discovery makes, as the real API server answers them to the real
``kubernetes`` client:

    GET /api/v1/namespaces/NS/pods?labelSelector=...            -> PodList with resourceVersion
    GET /api/v1/namespaces/NS/pods?watch=true&resourceVersion=RV -> JSON lines, one event each
        {"type": "ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK", "object": {...pod...}}
        an RV older than the compaction point -> {"type": "ERROR", "object": Status 410 Expired}
        the stream ends after timeoutSeconds

Tests change pods from their own thread (``put_pod``, ``set_ready``, ``delete_pod``), compact
the event history (``compact``: older watches get 410) and count requests per kind.
Equality label selectors only (``a=b,c=d``), which is what the manifests use.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

__all__ = ["FakeKubeAPI", "make_pod"]


def make_pod(
    name: str,
    role: str,
    *,
    ip: str = "127.0.0.1",
    port: int = 8000,
    ready: bool = True,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    kv_events_port: int | None = None,
    vllm_port: int | None = None,
    namespace: str = "pd",
) -> dict[str, Any]:
    """A pod as the API server returns it (camelCase JSON), with the container ports by name."""
    ports: list[dict[str, Any]] = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    if vllm_port is not None:  # a decode pod: the sidecar serves "http", vLLM is behind it
        ports.append({"name": "vllm", "containerPort": vllm_port, "protocol": "TCP"})
    if kv_events_port is not None:
        ports.append({"name": "kv-events", "containerPort": kv_events_port, "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "labels": {"app.kubernetes.io/part-of": "pd-runtime", "pd-runtime/role": role}
            | (labels or {}),
            "annotations": annotations or {},
        },
        "spec": {"containers": [{"name": "vllm", "image": "pd-runtime:cuda", "ports": ports}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class FakeKubeAPI:
    """State shared between the test's thread and the server's loop (guarded by a lock)."""

    def __init__(self, namespace: str = "pd") -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._pods: dict[str, dict[str, Any]] = {}
        self._events: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, pod)
        self._rv = 100
        self._compacted = 0  # watches from an RV below this get 410 Gone
        self.requests: dict[str, int] = {"list": 0, "watch": 0, "gone": 0}
        #: Every call as ``VERB RESOURCE`` (the RBAC verb it needs), unknown ones included.
        self.calls: list[str] = []
        self.closing = False  # ends open watch streams (for a clean server stop)

    # ---- what tests do -----------------------------------------------------------------------

    def put_pod(self, pod: dict[str, Any], *, unseen: bool = False) -> None:
        """Create or replace a pod. ``unseen``: no watch event for it (as if a watch missed it),
        so only a list shows it."""
        with self._lock:
            self._rv += 1
            pod = copy.deepcopy(pod)
            pod["metadata"]["resourceVersion"] = str(self._rv)
            kind = "MODIFIED" if pod["metadata"]["name"] in self._pods else "ADDED"
            self._pods[pod["metadata"]["name"]] = pod
            if not unseen:
                self._events.append((self._rv, kind, pod))

    def set_ready(self, name: str, ready: bool) -> None:
        with self._lock:
            pod = copy.deepcopy(self._pods[name])
        pod["status"]["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        self.put_pod(pod)

    def delete_pod(self, name: str) -> None:
        with self._lock:
            self._rv += 1
            pod = self._pods.pop(name)
            pod["metadata"]["resourceVersion"] = str(self._rv)
            self._events.append((self._rv, "DELETED", pod))

    def compact(self) -> None:
        """Forget the event history, like etcd compaction: every watch resumed from an older
        resourceVersion is answered 410 Gone."""
        with self._lock:
            self._compacted = self._rv + 1
            self._events.clear()

    def count(self, kind: str) -> int:
        with self._lock:
            return self.requests[kind]

    # ---- the server --------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/api/v1/namespaces/{namespace}/pods")
        async def pods(namespace: str, request: Request) -> Response:
            query = request.query_params
            selector = _parse_selector(query.get("labelSelector", ""))
            if namespace != self.namespace:
                return JSONResponse({"kind": "PodList", "apiVersion": "v1", "items": []})
            watching = query.get("watch") in ("true", "1", "True")
            with self._lock:
                self.calls.append(f"{'watch' if watching else 'list'} pods")
            if watching:
                rv = int(query.get("resourceVersion") or 0)
                timeout = float(query.get("timeoutSeconds") or 3600)
                return StreamingResponse(
                    self._watch(rv, selector, timeout), media_type="application/json"
                )
            with self._lock:
                self.requests["list"] += 1
                items = [copy.deepcopy(p) for p in self._pods.values() if _matches(p, selector)]
                rv = self._rv
            return JSONResponse(
                {
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(rv)},
                    "items": items,
                }
            )

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        async def other(path: str, request: Request) -> Response:
            with self._lock:
                self.calls.append(f"{request.method} /{path}")
            return JSONResponse({"kind": "Status", "code": 404}, status_code=404)

        return app

    async def _watch(
        self, since: int, selector: dict[str, str], timeout_s: float
    ) -> AsyncIterator[bytes]:
        with self._lock:
            self.requests["watch"] += 1
            gone = since < self._compacted
            if gone:
                self.requests["gone"] += 1
        if gone:
            status = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {since} ({self._compacted})",
                "reason": "Expired",
                "code": 410,
            }
            yield (json.dumps({"type": "ERROR", "object": status}) + "\n").encode()
            return
        deadline = time.monotonic() + timeout_s
        sent = since
        while time.monotonic() < deadline and not self.closing:
            with self._lock:
                fresh = [e for e in self._events if e[0] > sent]
            for rv, kind, pod in fresh:
                sent = rv
                if _matches(pod, selector):
                    yield (json.dumps({"type": kind, "object": pod}) + "\n").encode()
            await asyncio.sleep(0.01)


def _parse_selector(text: str) -> dict[str, str]:
    pairs = [part.split("=", 1) for part in text.split(",") if part]
    return {k.strip(): v.strip() for k, v in pairs}


def _matches(pod: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = pod["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())
