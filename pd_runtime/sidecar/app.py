"""The sidecar's HTTP server, in front of one decode worker.

Per request on /v1/completions and /v1/chat/completions:
  1. No ``x-prefiller-host-port`` header: forward to the local decode worker (transparent proxy).
  2. With the header: refuse (403) unless the prefiller is one this sidecar was configured to trust;
     the sidecar is never an open relay.
  3. The prefill hop, as the configured KV connector speaks it (one module per protocol under
     :mod:`pd_runtime.sidecar.connectors`; ``nixl``: a one-token prefill whose answer's
     ``kv_transfer_params`` the decode worker pulls the KV with), over :mod:`pd_runtime.sidecar.prefill`.
  4. Send the connector's decode request to the decode worker and stream its answer back
     exactly as the client asked (SSE or JSON).
If the prefill fails, the decode worker prefills locally (counted and logged as a fallback), so the
client still gets its answer. Every other path is proxied to the decode worker unchanged.

If the client goes away, the sidecar closes its requests to the prefill worker (if that call is
still running) and to the decode worker, which abort the request as vLLM does on a disconnect.
Timeouts: ``connect_timeout_s`` on both hops; on the prefill call ``prefill_timeout_s`` per read
and a total deadline from what that prefill should take (see :mod:`pd_runtime.sidecar.deadline`:
clamp(``prefill_deadline_floor_s``, ``prefill_deadline_factor`` * predicted + 1 s,
``prefill_timeout_s``), at least ``prefill_deadline_cold_s`` for a prefiller with no completed
prefill yet), after which the call is cancelled (its connection closed, so vLLM aborts it) and the
decode worker prefills locally, counted in ``pd_sidecar_prefill_deadline_exceeded_total``;
``decode_timeout_s`` per read of the decode call (then 504, or an SSE error event once
streaming). On SIGTERM, /health answers 503 draining and in-flight requests get
``drain_timeout_s`` to finish.

With tracing on (``OTEL_EXPORTER_OTLP_ENDPOINT`` in its environment, :mod:`pd_runtime.common.tracing`)
each request is a ``sidecar.request`` span (the child of the coordinator's attempt, from the
``traceparent`` it sent), with ``sidecar.prefill`` (3.) and ``sidecar.decode`` (4.) around the two
calls, each of which forwards a ``traceparent`` naming its own span, so the workers' vLLM
``llm_request`` spans hang below them. ``pd.mode`` on the request span says ``direct``,
``disaggregated`` or ``fallback`` (the prefill span then has an error status and the reason).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
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
from pydantic import Field, field_validator
from starlette.types import Receive, Scope, Send

from pd_runtime.common.asgi import (
    ClientWatch,
    encode_json,
    mount_generation,
    receive_body,
    request_headers,
    send_upstream,
)
from pd_runtime.common.body import parse_json_body
from pd_runtime.common.headers import (
    GENERATION_PATHS,
    PREFILLER_HEADER,
    REQUEST_ID_HEADER,
    forward_headers,
)
from pd_runtime.common.openai_errors import error_response, install_error_handlers
from pd_runtime.common.server import Lifecycle
from pd_runtime.common.streaming import open_upstream, send_streaming
from pd_runtime.common.tracing import create_tracing
from pd_runtime.common.upstream import (
    TRANSPORT_ERRORS,
    UpstreamClient,
    make_client,
    upstream_timeout,
)
from pd_runtime.config.discovery import DiscoveryConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.config.sidecar import SidecarTuning
from pd_runtime.discovery import create_discovery
from pd_runtime.errors import ForbiddenError, ServingError
from pd_runtime.sidecar.connectors.base import CONNECTORS
from pd_runtime.sidecar.deadline import DeadlinePolicy, PrefillDeadlines
from pd_runtime.sidecar.prefill import PrefillHop

__all__ = ["SidecarSettings", "create_app"]

logger = logging.getLogger("pd_runtime.sidecar")

_DROP = frozenset({PREFILLER_HEADER})


class SidecarSettings(SidecarTuning):
    """One sidecar process: the shared tuning (:class:`~pd_runtime.config.sidecar.SidecarTuning`,
    where every default lives) plus where it listens, what it fronts and whom it trusts."""

    decode_url: str = Field(description="the local decode worker, e.g. http://127.0.0.1:8200")
    allowed_prefillers: frozenset[str] = Field(
        description="HOST:PORT of the prefill endpoints this sidecar may forward to; no others"
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8300, ge=1, le=65535)
    prefiller_discovery: DiscoveryConfig | None = Field(
        default=None,
        description="also trust the prefill endpoints this discovery finds (Kubernetes: ready "
        "pods labelled role prefill), kept current while serving; allowed_prefillers stay too",
    )

    @field_validator("connector")
    @classmethod
    def _known_connector(cls, value: str) -> str:
        if value not in CONNECTORS:
            raise ValueError(
                f"unknown {CONNECTORS.kind} {value!r}; choose one of: {', '.join(CONNECTORS.names())}"
            )
        return value

    def deadline_policy(self) -> DeadlinePolicy:
        return DeadlinePolicy(
            floor_s=self.prefill_deadline_floor_s,
            factor=self.prefill_deadline_factor,
            ceiling_s=self.prefill_timeout_s,
            cold_s=self.prefill_deadline_cold_s,
        )


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
        self.prefill_deadline_seconds = Histogram(
            "pd_sidecar_prefill_deadline_seconds",
            "Total deadline given to each prefill call (from its predicted time)",
            buckets=(1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.prefill_deadline_exceeded = Counter(
            "pd_sidecar_prefill_deadline_exceeded",
            "Prefill calls cancelled at their deadline, then decoded locally "
            "(also counted as mode=fallback)",
            registry=self.registry,
        )


def create_app(settings: SidecarSettings) -> FastAPI:
    metrics = SidecarMetrics()
    deadlines = PrefillDeadlines(settings.deadline_policy())
    lifecycle = Lifecycle()
    state: dict[str, UpstreamClient] = {}
    tracing = create_tracing(None, "pd-sidecar")

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        state["client"] = make_client(settings.connect_timeout_s, settings.decode_timeout_s)
        if discovery is not None:
            await discovery.start(on_prefillers)
        yield
        if discovery is not None:
            await discovery.stop()
        await state["client"].aclose()
        tracing.shutdown()

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
        deadlines.retain(trusted["prefillers"])
        logger.info("trusted prefillers: %s", ", ".join(sorted(trusted["prefillers"])))

    app = FastAPI(title="pd-runtime sidecar", lifespan=lifespan)
    install_error_handlers(app, "sidecar")
    app.state.settings = settings
    app.state.trusted = trusted
    app.state.metrics = metrics
    app.state.deadlines = deadlines
    app.state.lifecycle = lifecycle
    app.state.tracing = tracing
    decode_url = settings.decode_url.rstrip("/")
    decode_attributes = {"server.address": decode_url}

    connector = CONNECTORS.create(settings.connector)
    hop = PrefillHop(
        lambda: state["client"],
        deadlines,
        read_timeout_s=settings.prefill_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        seconds=metrics.prefill_seconds,
        deadline_seconds=metrics.prefill_deadline_seconds,
        deadline_exceeded=metrics.prefill_deadline_exceeded,
        tracing=tracing,
    )

    async def prefill(
        prefiller: str,
        path: str,
        body: dict[str, Any],
        prefill_body: dict[str, Any],
        headers: dict[str, str],
    ) -> dict[str, Any] | None:
        """The prefill hop, in its own ``sidecar.prefill`` span when tracing is on."""
        if not tracing.enabled:
            return await hop.call(prefiller, path, body, prefill_body, headers)
        with tracing.span("sidecar.prefill", {"server.address": prefiller}, client=True):
            headers = {**headers}
            tracing.inject(headers)  # the prefill worker's vLLM span hangs below this one
            answer = await hop.call(prefiller, path, body, prefill_body, headers)
            if answer is None:
                tracing.fail("prefill failed; the decode worker prefills locally")
            return answer

    async def generate(scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/completions and /v1/chat/completions, as plain ASGI (see ``common.asgi``)."""
        if not tracing.enabled:
            await serve(scope, receive, send)
            return
        headers = request_headers(scope)
        attributes = {"http.route": scope["path"]}
        if REQUEST_ID_HEADER in headers:
            attributes["pd.request_id"] = headers[REQUEST_ID_HEADER]
        with tracing.server_span("sidecar.request", headers, attributes=attributes):
            await serve(scope, receive, send)

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        request_headers_ = request_headers(scope)  # decoded once
        prefiller = request_headers_.get(PREFILLER_HEADER)
        headers = forward_headers(request_headers_, drop=_DROP)
        watch: ClientWatch | None = None
        try:
            lifecycle.check()
            client = state["client"]
            raw_body = await receive_body(receive, request_headers_)
            if not prefiller:
                content = connector.direct_content(raw_body)
            else:
                body = parse_json_body(raw_body)
                if prefiller not in trusted["prefillers"]:
                    metrics.rejected.inc()
                    logger.warning(
                        "refused untrusted prefiller %r (request %s%s)",
                        prefiller,
                        request_headers_.get(REQUEST_ID_HEADER),
                        hop.trace_note(),
                    )
                    raise ForbiddenError(f"prefiller {prefiller!r} is not one this sidecar trusts")
            # From here on the client is watched (one task): if it leaves, the prefill call, the
            # decode call or the stream in progress is cancelled and its connection closed.
            watch = ClientWatch(receive, scope)
            if prefiller:
                result = await connector.disaggregate(
                    body, lambda prefill_body: prefill(prefiller, path, body, prefill_body, headers)
                )
                mode = "disaggregated" if result.transferred else "fallback"
                metrics.requests.labels(mode).inc()
                if tracing.enabled:
                    tracing.set_attributes({"pd.mode": mode})
                # Unchanged (prefill failed, no client transfer params): the bytes as received.
                decode_body = result.decode_body
                content = raw_body if decode_body is body else encode_json(decode_body)
            else:
                metrics.requests.labels("direct").inc()
                if tracing.enabled:
                    tracing.set_attributes({"pd.mode": "direct"})
            url = f"{decode_url}{path}"
            with tracing.span("sidecar.decode", decode_attributes, client=True):
                if tracing.enabled:
                    headers = {**headers}  # the prefill call's copy named its own span
                    tracing.inject(headers)
                upstream = await open_upstream(client, url, headers=headers, content=content)
                await send_upstream(send, upstream, url)
        except ServingError as exc:
            await error_response(exc)(scope, receive, send)
        except asyncio.CancelledError:
            if watch is None or not watch.client_left():
                raise
        finally:
            if watch is not None:
                watch.stop()

    # No FastAPI dependency injection on the generation path: a plain route to an ASGI handler.
    mount_generation(app, generate, GENERATION_PATHS)

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
                headers=forward_headers(request.headers, drop=_DROP),
                content=await request.body(),
            )
        except ServingError as exc:
            return error_response(exc)

    return app
