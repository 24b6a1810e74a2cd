"""Traces across the coordinator and a real sidecar, received by a real OTLP/HTTP receiver.

The coordinator and the sidecar are the real apps, each exporting with its own tracer provider
over OTLP/HTTP to :class:`tests.otlp.OtlpReceiver`; the prefill and decode workers are recording
fakes (they show which ``traceparent`` each hop sent). vLLM's own spans are the e2e test's
(tests/e2e/test_tracing.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pd_runtime.common.tracing import ENDPOINT_ENV, Tracing, create_tracing
from pd_runtime.config import CoordinatorConfig, DeploymentConfig
from pd_runtime.config.loader import parse_config
from pd_runtime.coordinator.app import create_app
from pd_runtime.launcher.topology import plan_deployment
from pd_runtime.platform import Platform
from pd_runtime.sidecar.app import SidecarSettings
from pd_runtime.sidecar.app import create_app as create_sidecar
from pd_runtime.worker.command import WorkerSpec, build_worker_command
from tests.otlp import OtlpReceiver, Span, by_name, otlp_receiver, render_waterfall
from tests.servers import FakeEngine, serve

LOCAL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local-cpu.yaml"
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _coordinator_config(
    sidecar_url: str, prefiller: str, endpoint: str | None
) -> CoordinatorConfig:
    return CoordinatorConfig.model_validate(
        {
            "models": ["tiny"],
            "endpoints": [
                {"name": "prefill-0", "role": "prefill", "address": prefiller, "url": "http://x"},
                {
                    "name": "decode-0",
                    "role": "decode",
                    "address": "127.0.0.1:9200",
                    "url": sidecar_url,
                },
            ],
            "observability": {"otlp_endpoint": endpoint},
        }
    )


@pytest.fixture
def chain(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[tuple[str, FakeEngine, FakeEngine, OtlpReceiver | None]]:
    """coordinator → sidecar → fake prefill and decode engines; tracing on unless the test is
    parametrized with ``traced=False``."""
    traced = getattr(request, "param", True)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export within 50 ms, not 5 s
    prefill, decode = FakeEngine("prefill"), FakeEngine("decode")
    with otlp_receiver() as receiver, serve(prefill.app()) as p_url, serve(decode.app()) as d_url:
        prefiller = p_url.removeprefix("http://")
        if traced:
            monkeypatch.setenv(ENDPOINT_ENV, receiver.url)  # the sidecar's switch, as `up` sets it
        else:
            monkeypatch.delenv(ENDPOINT_ENV, raising=False)
        settings = SidecarSettings(decode_url=d_url, allowed_prefillers=frozenset({prefiller}))
        with serve(create_sidecar(settings)) as sidecar_url:
            config = _coordinator_config(sidecar_url, prefiller, None)
            if traced:
                monkeypatch.delenv(ENDPOINT_ENV)  # the coordinator's comes from its config
                config = _coordinator_config(sidecar_url, prefiller, receiver.url)
            with serve(create_app(config)) as url:
                yield url, prefill, decode, receiver if traced else None


def _post(url: str, headers: dict[str, str], **body: Any) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello there", "max_tokens": 3, **body}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)


def _parent(header: str) -> tuple[str, str]:
    """(trace id, parent span id) of a ``traceparent`` header."""
    _, trace_id, span_id, _ = header.split("-")
    return trace_id, span_id


def _complete(spans: list[Span]) -> bool:
    names = {s.name for s in spans}
    return {"coordinator.request", "sidecar.request", "sidecar.decode"} <= names


def test_one_trace_from_the_client_through_coordinator_and_sidecar(
    chain, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    url, prefill, decode, receiver = chain
    caplog.set_level(logging.INFO, logger="pd_runtime.coordinator")
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    response = _post(url, {"x-request-id": "traced-1", "traceparent": traceparent})
    assert response.status_code == 200, response.text

    spans = receiver.wait_for(_complete)
    # One trace, the client's: every span continues the traceparent it sent.
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}
    named = by_name(spans)
    root = named["pd-coordinator:coordinator.request"]
    assert root.parent_id == CLIENT_SPAN and root.kind == 2  # SERVER
    assert root.attributes["pd.request_id"] == "traced-1"
    for child in ("admission", "prepare", "schedule", "attempt"):
        assert named[f"pd-coordinator:coordinator.{child}"].parent_id == root.span_id, child
    schedule = named["pd-coordinator:coordinator.schedule"].attributes
    assert schedule["pd.mode"] == "disaggregated"
    assert schedule["pd.decode"] == "127.0.0.1:9200"
    assert schedule["pd.prefill"] == prefill.headers[-1]["host"]  # the prefiller it called
    attempt = named["pd-coordinator:coordinator.attempt"]
    assert attempt.attributes["pd.attempt"] == 1 and attempt.kind == 3  # CLIENT

    sidecar = named["pd-sidecar:sidecar.request"]
    assert sidecar.parent_id == attempt.span_id
    assert sidecar.attributes["pd.mode"] == "disaggregated"
    assert sidecar.attributes["pd.request_id"] == "traced-1"
    prefill_span = named["pd-sidecar:sidecar.prefill"]
    decode_span = named["pd-sidecar:sidecar.decode"]
    assert prefill_span.parent_id == decode_span.parent_id == sidecar.span_id
    assert prefill_span.end_ns <= decode_span.start_ns
    # Each worker was sent a traceparent naming the span that called it: vLLM's span hangs there.
    assert _parent(prefill.headers[-1]["traceparent"]) == (CLIENT_TRACE, prefill_span.span_id)
    assert _parent(decode.headers[-1]["traceparent"]) == (CLIENT_TRACE, decode_span.span_id)

    # The decision line names the trace: request id ↔ trace id.
    line = next(r.getMessage() for r in caplog.records if "Got pod scores" in r.getMessage())
    record = json.loads(line.removeprefix("Got pod scores "))
    assert record["x-request-id"] == "traced-1" and record["trace_id"] == CLIENT_TRACE

    png = render_waterfall(spans, tmp_path / "trace.png", "fake workers")
    assert png.stat().st_size > 10_000


def test_a_request_without_traceparent_starts_a_trace_and_streams_inside_it(chain) -> None:
    url, _, decode, receiver = chain
    body = {"stream": True}
    with httpx.stream(
        "POST",
        f"{url}/v1/completions",
        json={"model": "tiny", "prompt": "x", "max_tokens": 3, **body},
        headers={"x-request-id": "fresh"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        response.read()
    spans = receiver.wait_for(_complete)
    (trace_id,) = {s.trace_id for s in spans}
    named = by_name(spans)
    root = named["pd-coordinator:coordinator.request"]
    assert root.parent_id == ""
    # The decode hop's span lasts the whole stream, inside the coordinator's attempt.
    decode_span, attempt = (
        named["pd-sidecar:sidecar.decode"],
        named["pd-coordinator:coordinator.attempt"],
    )
    assert attempt.start_ns <= decode_span.start_ns <= decode_span.end_ns <= attempt.end_ns
    assert _parent(decode.headers[-1]["traceparent"]) == (trace_id, decode_span.span_id)


def test_a_failed_prefill_is_a_failed_span_and_a_fallback(chain) -> None:
    url, prefill, _, receiver = chain
    prefill.fail_with = 500
    assert _post(url, {"x-request-id": "falls-back"}).status_code == 200
    spans = receiver.wait_for(_complete)
    named = by_name(spans)
    assert named["pd-sidecar:sidecar.request"].attributes["pd.mode"] == "fallback"
    assert named["pd-sidecar:sidecar.prefill"].status == 2  # ERROR


@pytest.mark.parametrize("chain", [False], indirect=True, ids=["off"])
def test_off_by_default_nothing_is_built_and_the_client_header_passes_as_is(chain) -> None:
    url, _, decode, _ = chain
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert _post(url, {"traceparent": traceparent}).status_code == 200
    # Untouched: nobody here made a span to name.
    assert decode.headers[-1]["traceparent"] == traceparent
    assert _post(url, {}).status_code == 200
    assert "traceparent" not in decode.headers[-1]


def test_no_endpoint_means_no_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    tracing = create_tracing(None, "pd-coordinator")
    assert not tracing.enabled and tracing.provider is None
    # Every call is a no-op.
    with tracing.span("x"), tracing.server_span("y", {}):
        tracing.inject(headers := {})
        assert tracing.trace_id() is None and headers == {}
    monkeypatch.setenv(ENDPOINT_ENV, "http://127.0.0.1:1")
    on = create_tracing(None, "pd-coordinator")
    assert on.enabled and on.provider is not None
    on.shutdown()
    assert isinstance(Tracing(), Tracing) and not Tracing().enabled


def test_the_worker_command_turns_vllm_tracing_on_with_an_endpoint() -> None:
    spec = WorkerSpec(role="prefill", model="m", port=8100, platform="cpu")
    argv, env = build_worker_command(spec, environ={})
    assert "--otlp-traces-endpoint" not in argv and "OTEL_SERVICE_NAME" not in env

    traced = WorkerSpec(
        role="decode", model="m", port=8200, platform="cpu", otlp_endpoint="http://c:4318"
    )
    argv, env = build_worker_command(traced, environ={})
    assert argv[argv.index("--otlp-traces-endpoint") + 1] == "http://c:4318/v1/traces"
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    assert env["OTEL_SERVICE_NAME"] == "vllm-decode"
    # The standard variable turns it on too (a Kubernetes pod's env).
    argv, _ = build_worker_command(spec, environ={ENDPOINT_ENV: "http://c:4318/"})
    assert argv[argv.index("--otlp-traces-endpoint") + 1] == "http://c:4318/v1/traces"


def test_the_deployment_section_reaches_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    data = yaml.safe_load(LOCAL_CONFIG.read_text())
    plan = plan_deployment(
        parse_config(DeploymentConfig, data), tmp_path, Platform("cpu", 0, (0, 1))
    )
    assert not any("--otlp-traces-endpoint" in p.argv for p in plan.parts)
    assert not any(ENDPOINT_ENV in p.env for p in plan.parts)
    assert plan.coordinator.observability.otlp_endpoint is None

    data["observability"] = {"otlp_endpoint": "http://collector:4318"}
    plan = plan_deployment(
        parse_config(DeploymentConfig, data), tmp_path, Platform("cpu", 0, (0, 1))
    )
    for worker in plan.by_kind("worker"):
        i = worker.argv.index("--otlp-traces-endpoint")
        assert worker.argv[i + 1] == "http://collector:4318/v1/traces"
        role = worker.name.split("-")[0]
        assert worker.env["OTEL_SERVICE_NAME"] == f"pd-vllm-{role}"
    for sidecar in plan.by_kind("sidecar"):
        assert sidecar.env[ENDPOINT_ENV] == "http://collector:4318"
        assert sidecar.env["OTEL_SERVICE_NAME"] == "pd-sidecar"
    assert plan.coordinator.observability.otlp_endpoint == "http://collector:4318"
