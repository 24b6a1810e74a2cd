"""Request traces over OpenTelemetry (OTLP over HTTP/protobuf), off unless an endpoint is set.

One trace per request, across four processes, linked by the W3C ``traceparent`` header::

    client ─traceparent?─▶ coordinator.request ─┬ coordinator.admission / .prepare / .schedule
                                                 └ coordinator.attempt ─traceparent─▶ sidecar.request
    sidecar.request ─┬ sidecar.prefill ─traceparent─▶ prefill worker: vLLM's llm_request
                     └ sidecar.decode  ─traceparent─▶ decode worker:  vLLM's llm_request

A client's own ``traceparent`` is continued; without one the coordinator starts the trace. Each
hop's header is rewritten to name the span that sends it, so every span's parent is in the trace.

The endpoint is the OTLP base URL (``http://collector:4318``; spans go to ``/v1/traces``), from the
config (``observability.otlp_endpoint``) or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``. Without
one, :func:`create_tracing` builds no provider, exporter nor thread, and every method below returns
at its first line (``span`` hands back one shared no-op context manager): the per-request cost is a
few attribute checks (measured in docs/observability.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = [
    "ENDPOINT_ENV",
    "SERVICE_ENV",
    "Tracing",
    "create_tracing",
    "resolve_endpoint",
    "traces_url",
]

#: The standard variable (OTLP base URL) that turns tracing on when the config does not.
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
#: The standard variable naming a process's ``service.name``.
SERVICE_ENV = "OTEL_SERVICE_NAME"

_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a base endpoint (as the OTel SDK derives it from the env)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def resolve_endpoint(
    configured: str | None, environ: Mapping[str, str] | None = None
) -> str | None:
    """The configured endpoint, else ``OTEL_EXPORTER_OTLP_ENDPOINT``; None: tracing off."""
    if configured:
        return configured
    return (os.environ if environ is None else environ).get(ENDPOINT_ENV) or None


class Tracing:
    """One process's tracer, or nothing (``enabled`` False: no provider was made)."""

    def __init__(self, endpoint: str | None = None, service_name: str = "pd-runtime") -> None:
        self.enabled = endpoint is not None
        self.endpoint = endpoint
        self.provider: Any = None
        self._tracer: Any = None
        if endpoint is None:
            return
        # Imported only when on: a process without tracing never loads the SDK.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind, get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._kinds = {"server": SpanKind.SERVER, True: SpanKind.CLIENT, False: SpanKind.INTERNAL}
        self._current = get_current_span
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)))
        )
        self._tracer = self.provider.get_tracer("pd_runtime")
        self._propagator = TraceContextTextMapPropagator()

    def server_span(
        self,
        name: str,
        headers: Mapping[str, str],
        *,
        start_ns: int | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[Any]:
        """A request's span in this process, the child of the ``traceparent`` in ``headers``
        (a new trace without one), current until the block ends."""
        if self._tracer is None:
            return _NOOP
        return self._tracer.start_as_current_span(
            name,
            context=self._propagator.extract(headers),
            kind=self._kinds["server"],
            start_time=start_ns,
            attributes=attributes,
        )

    def span(
        self, name: str, attributes: dict[str, Any] | None = None, *, client: bool = False
    ) -> contextlib.AbstractContextManager[Any]:
        """A child of the current span, current until the block ends (``client``: a call to
        another process, whose ``traceparent`` :meth:`inject` then names this span)."""
        if self._tracer is None:
            return _NOOP
        return self._tracer.start_as_current_span(
            name, attributes=attributes, kind=self._kinds[client]
        )

    def record(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A finished child span of the current one, from times measured elsewhere."""
        if self._tracer is None:
            return
        span = self._tracer.start_span(name, start_time=start_ns, attributes=attributes or None)
        span.end(end_time=end_ns)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Point ``headers``' ``traceparent`` (and ``tracestate``) at the current span."""
        if self._tracer is not None:
            self._propagator.inject(headers)

    def trace_id(self) -> str | None:
        """The current trace's id (32 hex digits), for log lines; None when off."""
        if self._tracer is None:
            return None
        context = self._current().get_span_context()
        return f"{context.trace_id:032x}" if context.is_valid else None

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        """Add attributes to the current span."""
        if self._tracer is None:
            return
        self._current().set_attributes(attributes)

    def fail(self, description: str) -> None:
        """Mark the current span as failed."""
        if self._tracer is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._current().set_status(Status(StatusCode.ERROR, description))

    def shutdown(self) -> None:
        """Send what is buffered and stop the export thread."""
        if self.provider is not None:
            self.provider.shutdown()


def create_tracing(configured: str | None, service_name: str) -> Tracing:
    """The process's :class:`Tracing`: on when ``configured`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``
    names an endpoint, else a no-op one. ``OTEL_SERVICE_NAME``, when set, names the service."""
    return Tracing(resolve_endpoint(configured), os.environ.get(SERVICE_ENV) or service_name)
