"""The coordinator's HTTP server.

Per generation request:
  0. (``edge.py``, around the app) check the API key (401) and take an admission slot (429 when
     the coordinator is full);
  1. read the body (413 over ``max_body_bytes``), parse it (400 on bad JSON) and check its shape
     (400, ``validation.py``), check the model (404 if it is not served here);
  2. drop any routing header the client sent (``x-prefiller-host-port``): routing is ours to decide;
  3. ask the scheduler for a decode endpoint and maybe a prefill endpoint, and log the decision as
     ``Got pod scores {...}`` (the llm-d log shape; up to ``decision_log_per_s`` lines a second,
     retries and unmeetable latency targets always, ``decision_log.py``);
  4. forward to the decode endpoint's sidecar, with the prefill header when disaggregating, and
     stream the answer back; tell the scheduler when the request has ended. With
     ``direct_to_worker``, a request served without prefill goes straight to the decode worker
     (the endpoint's ``address``), one hop fewer, its client ``kv_transfer_params`` dropped;
  5. failover: if that fails before any byte reached the client (connect error, reset, timeout,
     502/503/504), report the endpoint to the scheduler, schedule again without the endpoints
     tried (a new ``Got pod scores`` line) and retry, up to ``max_attempts``; then 502/503/504.
     A stream that breaks midway is never retried: it ends with an SSE error event.
  6. while the answer streams back, time it for the scheduler (``_AnswerClock``): its first chunk
     (a stream's TTFT) and the pace of the SSE events after it (TPOT), so latency-learning
     policies see how fast each endpoint really is.
With tracing on (``observability.otlp_endpoint``, :mod:`pd_runtime.common.tracing`), the request is
one span, ``coordinator.request`` (continuing a client's ``traceparent``), with children
``coordinator.admission`` (0.), ``coordinator.prepare`` and ``coordinator.schedule`` (3., the
decision as attributes) and one ``coordinator.attempt`` per try (4.-5.), whose span the forwarded
``traceparent`` names; the decision line carries the ``trace_id``.
If the client goes away, the request to the sidecar is closed at once, before or while streaming.
On SIGTERM (``Lifecycle``): /health answers 503 draining and in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from typing import Any, NamedTuple

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Match, Route
from starlette.types import Receive, Scope, Send

from pd_runtime.common.asgi import (
    ClientWatch,
    encode_json,
    mount_generation,
    receive_body,
    request_headers,
    send_upstream,
)
from pd_runtime.common.body import parse_json_body, read_body
from pd_runtime.common.headers import (
    GENERATION_PATHS,
    PREFILLER_HEADER,
    REQUEST_ID_HEADER,
    forward_headers,
)
from pd_runtime.common.openai_errors import error_response, install_error_handlers
from pd_runtime.common.server import Lifecycle
from pd_runtime.common.sse import DONE, SSEDecoder
from pd_runtime.common.streaming import open_upstream
from pd_runtime.common.tracing import create_tracing
from pd_runtime.common.upstream import (
    TRANSPORT_ERRORS,
    UpstreamClient,
    UpstreamResponse,
    failure_kind,
    make_client,
)
from pd_runtime.config.coordinator import CoordinatorConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.coordinator.admission import AdmissionController
from pd_runtime.coordinator.dashboard import add_dashboard_routes
from pd_runtime.coordinator.decision_log import DecisionLineBudget
from pd_runtime.coordinator.edge import (
    ADMITTED_KEY,
    ARRIVED_KEY,
    ApiKeys,
    GatewayMiddleware,
    resolve_api_keys,
)
from pd_runtime.coordinator.metrics import CoordinatorMetrics
from pd_runtime.coordinator.routing import ModelRouter, build_scheduler, watch_adapters
from pd_runtime.coordinator.validation import validate_generation_body
from pd_runtime.discovery import create_discovery
from pd_runtime.errors import (
    ClientGone,
    MethodNotAllowedError,
    NoEndpointError,
    NotFoundError,
    ServingError,
    UpstreamError,
)
from pd_runtime.scheduling.base import Scheduler, SchedulingRequest, SchedulingResult
from pd_runtime.scheduling.pools import PooledScheduler

__all__ = [
    "RETRY_STATUSES",
    "create_app",
    "decision_attributes",
    "failure_reason",
    "pod_scores_line",
]

logger = logging.getLogger("pd_runtime.coordinator")

#: Sidecar statuses that mean "this endpoint cannot serve now" rather than "this request is bad".
RETRY_STATUSES = frozenset({502, 503, 504})


def failure_reason(error: UpstreamError) -> str:
    """The ``reason`` label of ``pd_coordinator_retries_total`` for a failed attempt."""
    return failure_kind(error.__cause__) or f"status_{error.status_code}"


# msgspec, not json: with a breakdown of 7 scorers x 64 endpoints the line is ~16 kB, which
# json.dumps takes ~600 us to write on our CPU machines and msgspec ~40 us (on every request).
_encode_json = msgspec.json.Encoder().encode


def pod_scores_line(
    request_id: str,
    model: str,
    result: SchedulingResult,
    *,
    full: bool = False,
    trace_id: str | None = None,
    pool: str | None = None,
    adapter: str | None = None,
    served: str | None = None,
) -> str:
    """The ``Got pod scores {...}`` decision line. Its ``breakdown`` is what the policy kept for
    the line (kv-aware: the best ``log_breakdown_top_k`` endpoints), or with ``full`` (the
    coordinator logs at DEBUG) every endpoint's. ``trace_id`` (tracing on) ties the line to the
    request's trace. With several models: ``pool`` (the served base model whose workers were
    chosen), ``adapter`` (the LoRA adapter, if any) and ``served`` (the name sent to the worker,
    when an alias or canary rewrote the client's)."""
    record: dict[str, Any] = {"x-request-id": request_id}
    if trace_id is not None:
        record["trace_id"] = trace_id
    record["model"] = model
    if served is not None and served != model:
        record["served"] = served
    if pool is not None:
        record["pool"] = pool
    if adapter is not None:
        record["adapter"] = adapter
    record |= {
        "scores": result.scores,
        "target": result.decode.address,
        "prefill": result.prefill.address if result.prefill else None,
    }
    if result.reason is not None:
        record["reason"] = result.reason
    if result.slo is not None:
        record["slo"] = result.slo
    if full and result.full_breakdown is not None:
        record["breakdown"] = result.full_breakdown()
    elif result.breakdown is not None:
        record["breakdown"] = result.breakdown
    return "Got pod scores " + _encode_json(record).decode()


def decision_attributes(result: SchedulingResult) -> dict[str, Any]:
    """The ``coordinator.schedule`` span's attributes: where the request goes and why."""
    attributes: dict[str, Any] = {
        "pd.decode": result.decode.address,
        "pd.mode": "disaggregated" if result.disaggregated else "direct",
    }
    if result.prefill is not None:
        attributes["pd.prefill"] = result.prefill.address
    if result.reason is not None:
        attributes["pd.reason"] = result.reason
    for address, score in (result.scores or {}).items():
        if isinstance(score, int | float):
            attributes[f"pd.score.{address}"] = score
    return attributes


# A request id for a request that came without one: unique per process (a random 64-bit prefix)
# and in time (a counter), 32 hex digits like a uuid4's; uuid4 itself read os.urandom for every
# request (~5% of the coordinator's samples under load in a py-spy profile).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class _Opened(NamedTuple):
    """An attempt that got its answer's head: what :func:`send_upstream` streams back."""

    upstream: UpstreamResponse
    url: str
    on_close: Callable[[int], None]
    on_chunk: Callable[[bytes], None] | None  # the scheduler's answer clock, when it wants one


class _AnswerClock:
    """Times one forwarded answer: for a successful SSE stream, the TTFT (its first chunk) and
    the mean time per SSE event after it go into the coordinator's histograms; when the
    scheduler learns latency (``times_answers``), also ``first_chunk`` (the TTFT, None for an
    answer that is not a stream) and ``stream_end`` for its model. Per chunk: a clock read, and
    only for the scheduler a pass of the SSE parser (events split across chunks counted once,
    when they complete; ``[DONE]`` not counted). Without it each chunk counts as one event,
    which is what vLLM sends, one token per event, unless chunks merge on a busy connection."""

    __slots__ = (
        "events", "first", "last", "metrics", "request", "result", "scheduler", "sent", "sse",
        "streamed",
    )  # fmt: skip

    def __init__(
        self,
        scheduler: Scheduler | None,
        request: SchedulingRequest,
        result: SchedulingResult,
        sent: float,
        streamed: bool,
        metrics: CoordinatorMetrics,
    ) -> None:
        self.scheduler = scheduler  # None: the histograms only
        self.request = request
        self.result = result
        self.sent = sent
        self.streamed = streamed
        self.metrics = metrics
        self.first: float | None = None
        self.last = 0.0
        self.events = 0
        self.sse = SSEDecoder() if streamed and scheduler is not None else None

    def chunk(self, data: bytes) -> None:
        now = time.perf_counter()
        # The first chunk's events are not counted (the time per event runs from it), but a
        # partial event in it must reach the parser.
        events = 1
        if self.sse is not None:
            events = sum(1 for d in self.sse.feed(data) if d != DONE)
        if self.first is None:
            self.first = self.last = now
            ttft = now - self.sent if self.streamed else None
            if ttft is not None:
                self.metrics.ttft_seconds.observe(ttft)
            if self.scheduler is not None:
                self.scheduler.first_chunk(self.request, self.result, ttft)
            return
        if self.streamed:
            self.last = now
            self.events += events

    def end(self, status: int) -> None:
        if self.first is None or not self.streamed or status != 200 or self.events <= 0:
            return
        per_event = (self.last - self.first) / self.events
        self.metrics.tpot_seconds.observe(per_event)
        if self.scheduler is not None:
            self.scheduler.stream_end(self.request, self.result, per_event)


def create_app(config: CoordinatorConfig, scheduler: Scheduler | None = None) -> FastAPI:
    metrics = CoordinatorMetrics()
    observability = config.observability
    tracing = create_tracing(observability.otlp_endpoint, observability.service_name("coordinator"))
    if scheduler is None:
        scheduler = build_scheduler(config)
    # Several models (pools): the scheduler knows which pool and adapter serve a name.
    pooled = scheduler if isinstance(scheduler, PooledScheduler) else None
    router = ModelRouter(config, pooled)
    state: dict[str, UpstreamClient] = {}
    keys = ApiKeys(resolve_api_keys(config))
    lifecycle = Lifecycle()
    lines = DecisionLineBudget(
        config.decision_log_per_s, logger, metrics.decision_lines_skipped.inc
    )
    admission = AdmissionController(config.max_in_flight, config.max_queued, config.queue_timeout_s)
    metrics.admitted.set_function(lambda: admission.in_flight)
    metrics.queued.set_function(lambda: admission.queued)
    # The gateway already checked the client's key; it is not passed on to the workers.
    dropped = frozenset({PREFILLER_HEADER, "authorization"} if keys.enabled else {PREFILLER_HEADER})

    # Discovery (``static``: nothing changes) hands the scheduler each new endpoint set; the
    # config's own endpoints stay as fixed extras beside the discovered ones.
    discovery = create_discovery(config.discovery, config.endpoints)

    async def on_endpoints(discovered: list[EndpointConfig]) -> None:
        fixed = {e.address for e in config.endpoints}
        await scheduler.set_endpoints(
            [*config.endpoints, *(e for e in discovered if e.address not in fixed)]
        )

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        state["client"] = make_client(config.connect_timeout_s, config.request_timeout_s)
        await scheduler.start()
        await discovery.start(on_endpoints)
        watcher = None
        if pooled is not None and config.adapter_refresh_s > 0:
            watcher = asyncio.create_task(
                watch_adapters(pooled, state["client"], config.adapter_refresh_s)
            )
        yield
        if watcher is not None:
            watcher.cancel()
            with suppress(asyncio.CancelledError):
                await watcher
        await discovery.stop()
        await scheduler.stop()
        await state["client"].aclose()
        lines.flush()
        tracing.shutdown()

    app = FastAPI(title="pd-runtime coordinator", lifespan=lifespan)
    install_error_handlers(app, "coordinator")
    app.add_middleware(
        GatewayMiddleware,
        keys=keys,
        admission=admission,
        metrics=metrics,
        max_body_bytes=config.max_body_bytes,
        timed=tracing.enabled,
    )
    app.state.config = config
    app.state.admission = admission
    app.state.metrics = metrics
    app.state.scheduler = scheduler
    app.state.router = router
    app.state.discovery = discovery
    app.state.lifecycle = lifecycle
    app.state.tracing = tracing
    created = int(time.time())

    async def generate(scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/completions and /v1/chat/completions, as plain ASGI (see ``common.asgi``)."""
        if not tracing.enabled:
            await serve(scope, receive, send)
            return
        arrived = scope.get(ARRIVED_KEY)
        root = tracing.server_span(
            "coordinator.request",
            request_headers(scope),
            start_ns=arrived,
            attributes={"http.route": scope["path"]},
        )
        with root:
            if arrived is not None:  # admitted by the gateway middleware
                tracing.record("coordinator.admission", arrived, scope[ADMITTED_KEY])
            await serve(scope, receive, send)

    def decide(request: SchedulingRequest) -> SchedulingResult:
        with tracing.span("coordinator.schedule"):
            result = scheduler.schedule(request)
            if tracing.enabled:
                tracing.set_attributes(decision_attributes(result))
        return result

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        route = scope["path"]
        started = time.perf_counter()
        headers = request_headers(scope)  # decoded once, by the gateway middleware
        try:
            lifecycle.check()
            raw_body = await receive_body(receive, headers, config.max_body_bytes)
            body = parse_json_body(raw_body)
            model = validate_generation_body(
                route, body, models=router.names, max_tokens_limit=config.max_tokens_limit
            )
            served = router.resolve(model)  # an alias or canary: the name the worker serves
            if served != model:
                body = {**body, "model": served}
                raw_body = encode_json(body)
            pool, adapter = pooled.resolve(served) if pooled is not None else (None, None)
            request_id = headers.get(REQUEST_ID_HEADER) or _new_request_id()
            sched_request = SchedulingRequest(request_id, served, route, body, headers=headers)
            if tracing.enabled:
                tracing.set_attributes({"pd.request_id": request_id, "pd.model": served})
            prepared = time.perf_counter()
            with tracing.span("coordinator.prepare"):
                sched_request = await scheduler.prepare(sched_request)
            decided = time.perf_counter()
            metrics.prepare_seconds.observe(decided - prepared)
            result = decide(sched_request)
            metrics.decision_seconds.observe(time.perf_counter() - decided)
        except ServingError as exc:
            metrics.errors.labels(exc.error_type).inc()
            await error_response(exc)(scope, receive, send)
            return

        forwarded = forward_headers(headers, drop=dropped)
        forwarded[REQUEST_ID_HEADER] = request_id
        first_byte_timeout = config.first_byte_timeout_s if body.get("stream") is True else None

        def final(status: int, mode: str) -> None:
            metrics.requests_of(route, mode, str(status)).inc()
            metrics.request_seconds_of(route).observe(time.perf_counter() - started)

        async def forward(
            attempt: SchedulingRequest, result: SchedulingResult, mode: str
        ) -> _Opened | UpstreamError:
            """One attempt on ``result.decode``: the open response to stream back, or the error
            that makes another endpoint worth a try (nothing has reached the client yet)."""
            metrics.in_flight_of(result.decode.name).inc()
            # The body is forwarded byte for byte: no re-serialisation on the hot path.
            hop_headers = dict(forwarded)
            tracing.inject(hop_headers)  # the attempt's span is the sidecar's parent
            content = raw_body
            if result.prefill is not None:
                hop_headers[PREFILLER_HEADER] = result.prefill.address
                url = f"{result.decode.url}{route}"
            elif config.direct_to_worker:
                # Served directly: straight to the worker, one hop fewer. What the sidecar would
                # have dropped is dropped here: a client's kv_transfer_params would aim the
                # worker's NIXL pull anywhere.
                url = f"http://{result.decode.address}{route}"
                if "kv_transfer_params" in body:
                    content = encode_json(
                        {k: v for k, v in body.items() if k != "kv_transfer_params"}
                    )
            else:
                url = f"{result.decode.url}{route}"

            def end_attempt() -> None:
                metrics.in_flight_of(result.decode.name).dec()
                scheduler.release(attempt, result)

            clock: _AnswerClock | None = None

            def finished(status: int) -> None:
                if clock is not None:
                    clock.end(status)
                end_attempt()
                final(status, mode)

            sent = time.perf_counter()
            try:
                upstream = await open_upstream(
                    state["client"],
                    url,
                    headers=hop_headers,
                    content=content,
                    first_byte_timeout_s=first_byte_timeout,
                )
            except UpstreamError as exc:
                end_attempt()
                return exc
            except BaseException:
                finished(ClientGone.status_code)  # the client left, or shutdown cancelled us
                raise
            if upstream.status_code in RETRY_STATUSES:
                try:
                    detail = (await upstream.aread())[:300].decode(errors="replace")
                except TRANSPORT_ERRORS as exc:
                    detail = repr(exc)
                except BaseException:
                    upstream.close()
                    finished(ClientGone.status_code)
                    raise
                upstream.close()
                end_attempt()
                message = f"decode sidecar {url} answered {upstream.status_code}: {detail}"
                return UpstreamError(message, status_code=upstream.status_code)
            streamed = upstream.status_code == 200 and upstream.headers.get(
                "content-type", ""
            ).startswith("text/event-stream")
            learns = scheduler.times_answers
            if not streamed and not learns:
                return _Opened(upstream, url, finished, None)
            clock = _AnswerClock(
                scheduler if learns else None, attempt, result, sent, streamed, metrics
            )
            return _Opened(upstream, url, finished, clock.chunk)

        # From here on the client is watched (one task): if it leaves, whatever this request
        # awaits is cancelled and the upstream connection closed, before or while streaming.
        watch = ClientWatch(receive, scope)
        streaming = False
        try:
            tried: list[str] = []
            attempt = sched_request
            while True:
                if logger.isEnabledFor(logging.INFO) and (
                    tried or result.slo == "unmet" or lines.admit()
                ):
                    full = logger.isEnabledFor(logging.DEBUG)
                    line = pod_scores_line(
                        request_id,
                        model,
                        result,
                        full=full,
                        trace_id=tracing.trace_id(),
                        pool=pool.model if pool is not None else None,
                        adapter=adapter,
                        served=served,
                    )
                    logger.info(line)
                mode = "disaggregated" if result.disaggregated else "direct"
                metrics.record_decision(result, mode)
                attributes = (
                    {"pd.attempt": len(tried) + 1, "pd.decode": result.decode.address}
                    if tracing.enabled
                    else None
                )
                with tracing.span("coordinator.attempt", attributes, client=True):
                    outcome = await forward(attempt, result, mode)
                    if isinstance(outcome, _Opened):
                        streaming = True
                        await send_upstream(send, *outcome)
                        return
                    if tracing.enabled:
                        tracing.set_attributes({"pd.failure": outcome.message[:300]})
                reason = failure_reason(outcome)
                scheduler.report_failure(result.decode, f"{reason}: {outcome.message}")
                tried.append(result.decode.address)
                if len(tried) >= config.max_attempts:
                    break
                attempt = replace(sched_request, exclude=frozenset(tried))
                try:
                    result = decide(attempt)
                except NoEndpointError:
                    break
                metrics.retries.labels(reason).inc()
                logger.warning(
                    "request %s: decode %s failed (%s); retrying on %s (attempt %d of %d)",
                    request_id,
                    tried[-1],
                    outcome.message,
                    result.decode.address,
                    len(tried) + 1,
                    config.max_attempts,
                )
        except asyncio.CancelledError:
            if not watch.client_left():
                raise
            if not streaming:  # gone before the response started: nginx's 499
                metrics.errors.labels(ClientGone.error_type).inc()
            return
        finally:
            watch.stop()
        error = UpstreamError(
            f"no decode endpoint could serve the request ({len(tried)} tried: "
            f"{', '.join(tried)}); last error: {outcome.message}",
            status_code=outcome.status_code,
        )
        logger.warning("request %s failed: %s", request_id, error.message)
        metrics.errors.labels(error.error_type).inc()
        final(error.status_code, mode)
        await error_response(error)(scope, receive, send)

    # No FastAPI dependency injection on the generation path: a plain route to an ASGI handler.
    mount_generation(app, generate, GENERATION_PATHS)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        parents = pooled.adapter_parents() if pooled is not None else {}
        aliases = router.aliases()
        data = []
        for name in router.names:
            entry: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "pd-runtime",
            }
            if name in parents:  # a LoRA adapter, as vLLM lists it
                entry["parent"] = parents[name]
            if name in aliases:
                entry["alias_of"] = aliases[name]
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> JSONResponse:
        return lifecycle.health() or JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/debug/scheduler")
    async def debug_scheduler() -> JSONResponse:
        return JSONResponse(scheduler.debug_state())

    @app.post("/debug/scheduler/match/{path:path}")
    async def debug_match(path: str, request: Request) -> JSONResponse:
        """Which endpoints hold this request's prompt (leading blocks), without routing it."""
        route = f"/{path}"
        if route not in GENERATION_PATHS:
            return error_response(NotFoundError(f"not a generation route: {route}"))
        try:
            body = parse_json_body(await read_body(request, config.max_body_bytes))
        except ServingError as exc:
            return error_response(exc)
        model = str(body.get("model", ""))
        if pooled is not None:  # the pool to ask is the one serving the (resolved) name
            try:
                model = router.resolve(model)
            except ServingError as exc:
                return error_response(exc)
        probe = SchedulingRequest("debug-match", model, route, body)
        return JSONResponse(scheduler.explain(await scheduler.prepare(probe)))

    add_dashboard_routes(app, scheduler, metrics)  # GET /dashboard, /dashboard/state

    @app.api_route(
        "/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    )
    async def unknown(path: str, request: Request) -> JSONResponse:
        allowed = {
            method
            for route in app.router.routes
            if isinstance(route, Route)
            and route.endpoint is not unknown
            and route.matches(request.scope)[0] is Match.PARTIAL
            for method in route.methods or ()
        }
        if allowed:
            message = f"method {request.method} is not allowed on /{path}"
            return error_response(MethodNotAllowedError(message, allowed=sorted(allowed)))
        return error_response(NotFoundError(f"no route for /{path}"))

    return app
