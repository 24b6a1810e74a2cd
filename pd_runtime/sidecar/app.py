"""The sidecar's HTTP server, in front of one decode worker.

Per request on /v1/completions and /v1/chat/completions:
  1. No ``x-prefiller-host-port`` header: forward to the local decode worker (transparent proxy).
  2. With the header: refuse (403) unless the prefiller is one this sidecar was configured to trust;
     the sidecar is never an open relay.
  3. Send the prefill request (see :mod:`pd_runtime.sidecar.rewrite`) and read its
     ``kv_transfer_params``.
  4. Send the client's request with those params to the decode worker and stream its answer back
     exactly as the client asked (SSE or JSON).
If the prefill fails, the decode worker prefills locally (counted and logged as a fallback), so the
client still gets its answer. Every other path is proxied to the decode worker unchanged.

If the client goes away, the sidecar closes its requests to the prefill worker (if that call is
still running) and to the decode worker, which abort the request as vLLM does on a disconnect.
Timeouts: ``connect_timeout_s`` on both hops, ``prefill_timeout_s`` per read of the prefill call
(then fallback), ``decode_timeout_s`` per read of the decode call (then 504, or an SSE error event
once streaming). On SIGTERM, /health answers 503 draining and in-flight requests get
``drain_timeout_s`` to finish.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from pd_runtime.common.http import (
    GENERATION_PATHS,
    PREFILLER_HEADER,
    REQUEST_ID_HEADER,
    TRANSPORT_ERRORS,
    Lifecycle,
    UpstreamClient,
    error_response,
    forward_headers,
    install_error_handlers,
    make_client,
    parse_json_body,
    send_streaming,
    unless_disconnected,
    upstream_timeout,
)
from pd_runtime.config.coordinator import EndpointConfig
from pd_runtime.config.discovery import DiscoveryConfig
from pd_runtime.discovery import create_discovery
from pd_runtime.errors import ForbiddenError, ServingError
from pd_runtime.sidecar.rewrite import build_decode_request, build_prefill_request

__all__ = ["SidecarSettings", "create_app"]

logger = logging.getLogger("pd_runtime.sidecar")


@dataclass(frozen=True)
class SidecarSettings:
    decode_url: str
    allowed_prefillers: frozenset[str]
    host: str = "127.0.0.1"
    port: int = 8300
    prefill_timeout_s: float = 120.0
    decode_timeout_s: float = 600.0
    connect_timeout_s: float = 5.0
    #: On SIGTERM, how long in-flight requests may run before they are cut.
    drain_timeout_s: float = 30.0
    #: On SIGTERM, how long to keep listening (``/health`` 503) before the port closes.
    drain_delay_s: float = 0.0
    #: Also trust the prefill endpoints this discovery finds (Kubernetes: ready pods labelled
    #: role prefill), kept current while serving; ``allowed_prefillers`` stay trusted too.
    prefiller_discovery: DiscoveryConfig | None = None


class SidecarMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pd_sidecar_requests",
            "Requests by how they were served: disaggregated, direct "
            "(no prefiller asked for) or fallback (prefill failed, decoded locally)",
            ["mode"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "pd_sidecar_rejected_prefillers",
            "Requests refused for naming an untrusted prefiller",
            registry=self.registry,
        )
        self.prefill_seconds = Histogram(
            "pd_sidecar_prefill_seconds", "Time of the prefill hop", registry=self.registry
        )


def create_app(settings: SidecarSettings) -> FastAPI:
    metrics = SidecarMetrics()
    lifecycle = Lifecycle()
    state: dict[str, UpstreamClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        state["client"] = make_client(settings.connect_timeout_s, settings.decode_timeout_s)
        if discovery is not None:
            await discovery.start(on_prefillers)
        yield
        if discovery is not None:
            await discovery.stop()
        await state["client"].aclose()

    # The allow-list: fixed entries plus discovered prefill pods. The set is swapped whole, so a
    # request checks either the old or the new one; the sidecar never becomes an open relay
    # (no discovery answer: only what was already trusted).
    trusted = {"prefillers": frozenset(settings.allowed_prefillers)}
    discovery = (
        create_discovery(settings.prefiller_discovery, roles=("prefill",))
        if settings.prefiller_discovery is not None
        else None
    )

    async def on_prefillers(endpoints: list[EndpointConfig]) -> None:
        found = {e.address for e in endpoints if e.role == "prefill"}
        trusted["prefillers"] = frozenset(settings.allowed_prefillers | found)
        logger.info("trusted prefillers: %s", ", ".join(sorted(trusted["prefillers"])))

    app = FastAPI(title="pd-runtime sidecar", lifespan=lifespan)
    install_error_handlers(app, "sidecar")
    app.state.settings = settings
    app.state.trusted = trusted
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    decode_url = settings.decode_url.rstrip("/")

    async def prefill(
        request: Request,
        client: UpstreamClient,
        prefiller: str,
        path: str,
        body: dict[str, Any],
        headers: dict[str, str],
    ) -> dict[str, Any] | None:
        """Step 3: returns the prefiller's kv_transfer_params, or None to decode locally."""
        started = time.perf_counter()
        try:
            # If the client leaves meanwhile, the prefill call is cancelled and its connection
            # closed, so the prefill worker aborts the request too.
            response = await unless_disconnected(
                request,
                client.fetch(
                    "POST",
                    f"http://{prefiller}{path}",
                    json_body=build_prefill_request(body),
                    headers=headers,
                    timeout=upstream_timeout(
                        settings.prefill_timeout_s, settings.connect_timeout_s
                    ),
                ),
            )
        except TRANSPORT_ERRORS as exc:
            logger.warning("prefill on %s failed (%r); decoding locally", prefiller, exc)
            return None
        finally:
            metrics.prefill_seconds.observe(time.perf_counter() - started)
        if response.status_code != 200:
            logger.warning(
                "prefill on %s answered %d (%s); decoding locally",
                prefiller,
                response.status_code,
                response.text[:200],
            )
            return None
        try:
            params = response.json().get("kv_transfer_params")
        except (json.JSONDecodeError, AttributeError):
            params = None
        if not params:
            logger.warning(
                "prefill on %s returned no kv_transfer_params; decoding locally", prefiller
            )
        return params or None

    async def generate(request: Request) -> Response:
        path = request.url.path
        prefiller = request.headers.get(PREFILLER_HEADER)
        headers = forward_headers(request.headers, drop=frozenset({PREFILLER_HEADER}))
        try:
            lifecycle.check()
            client = state["client"]
            raw_body = await request.body()
            body = parse_json_body(raw_body)
            if prefiller and prefiller not in trusted["prefillers"]:
                metrics.rejected.inc()
                logger.warning(
                    "refused untrusted prefiller %r (request %s)",
                    prefiller,
                    request.headers.get(REQUEST_ID_HEADER),
                )
                raise ForbiddenError(f"prefiller {prefiller!r} is not one this sidecar trusts")
            params = (
                await prefill(request, client, prefiller, path, body, headers)
                if prefiller
                else None
            )
            mode = "direct" if not prefiller else ("disaggregated" if params else "fallback")
            metrics.requests.labels(mode).inc()
            decode_body = build_decode_request(body, params)
            # Unchanged (direct, no client transfer params): forward the bytes as received.
            content = raw_body if decode_body is body else json.dumps(decode_body).encode()
            return await send_streaming(
                client,
                f"{decode_url}{path}",
                headers=headers,
                content=content,
                client_request=request,
            )
        except ServingError as exc:
            return error_response(exc)

    for path in GENERATION_PATHS:
        app.add_api_route(path, generate, methods=["POST"])

    @app.get("/health")
    async def health() -> Response:
        """Healthy when the decode worker behind this sidecar is (and this sidecar not draining)."""
        draining = lifecycle.health()
        if draining is not None:
            return draining
        try:
            response = await state["client"].fetch(
                "GET", f"{decode_url}/health", timeout=upstream_timeout(5.0, 5.0)
            )
        except TRANSPORT_ERRORS as exc:
            return JSONResponse({"status": "decode worker unreachable", "error": repr(exc)}, 503)
        return JSONResponse(
            {"status": "ok" if response.status_code == 200 else "decode unhealthy"},
            200 if response.status_code == 200 else 503,
        )

    @app.get("/sidecar/metrics")
    async def sidecar_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
    async def passthrough(path: str, request: Request) -> Response:
        query = f"?{request.url.query}" if request.url.query else ""
        try:
            return await send_streaming(
                state["client"],
                f"{decode_url}/{path}{query}",
                method=request.method,
                headers=forward_headers(request.headers, drop=frozenset({PREFILLER_HEADER})),
                content=await request.body(),
            )
        except ServingError as exc:
            return error_response(exc)

    return app
