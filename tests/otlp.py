"""A real OTLP/HTTP trace receiver for the tests, and a waterfall chart of what it received.

The processes under test export with the OpenTelemetry SDK's OTLP/HTTP exporter (protobuf) and
vLLM's; this server takes ``POST /v1/traces`` as a collector does, decodes each
``ExportTraceServiceRequest`` with opentelemetry-proto and keeps the spans, flattened to
:class:`Span`. No in-process shortcut: what arrives here went over HTTP in the OTLP encoding.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    kind: int  # OTLP SpanKind: 2 server, 3 client
    attributes: dict[str, Any]
    status: int  # OTLP StatusCode: 0 unset, 1 ok, 2 error


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class OtlpReceiver:
    """Collects spans; ``url`` is the OTLP base endpoint to configure (spans to ``/v1/traces``)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    data = gzip.decompress(data)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver._take(ExportTraceServiceRequest.FromString(data))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def _take(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            service = str(resource.get("service.name", "?"))
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(
                        Span(
                            service=service,
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            kind=s.kind,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status=s.status.code,
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(
        self, condition: Callable[[list[Span]], bool], timeout_s: float = 20.0
    ) -> list[Span]:
        """The spans once ``condition`` holds for them (polled), else an AssertionError."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = list(self.spans)
            if condition(spans):
                return spans
            assert time.monotonic() < deadline, f"spans never arrived; got {_names(spans)}"
            time.sleep(0.1)

    def start(self) -> None:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _names(spans: list[Span]) -> list[str]:
    return [f"{s.service}:{s.name}" for s in spans]


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def by_name(spans: list[Span]) -> dict[str, Span]:
    """Spans keyed ``service:name`` (the last one of each)."""
    return {f"{s.service}:{s.name}": s for s in spans}


def depth_first(spans: list[Span]) -> list[tuple[int, Span]]:
    """The trace as a tree, each span after its parent, children by start time."""
    children: dict[str, list[Span]] = {}
    ids = {s.span_id for s in spans}
    for s in sorted(spans, key=lambda s: s.start_ns):
        children.setdefault(s.parent_id if s.parent_id in ids else "", []).append(s)
    out: list[tuple[int, Span]] = []

    def walk(parent: str, depth: int) -> None:
        for s in children.get(parent, []):
            out.append((depth, s))
            walk(s.span_id, depth + 1)

    walk("", 0)
    return out


def render_waterfall(spans: list[Span], path: Path, title: str) -> Path:
    """A waterfall PNG of one trace: a bar per span (indented by depth, coloured by service)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = depth_first(spans)
    t0 = min(s.start_ns for _, s in rows)
    services = sorted({s.service for _, s in rows})
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(services)}
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(rows) + 1.4))
    for i, (depth, s) in enumerate(rows):
        start, width = (s.start_ns - t0) / 1e6, max((s.end_ns - s.start_ns) / 1e6, 0.05)
        ax.barh(i, width, left=start, color=colours[s.service], height=0.6)
        label = f"{'  ' * depth}{s.name}  ({width:.1f} ms)"
        ax.text(start + width, i, " " + label, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{s.service}" for _, s in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms since the trace's first span")
    total = max(s.end_ns for _, s in rows) - t0
    ax.set_xlim(0, total / 1e6 * 1.45)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
