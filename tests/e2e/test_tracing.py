"""One disaggregated request, one trace across all four processes, as a collector receives it.

The shared deployment exports every part's spans over OTLP/HTTP to the session's receiver
(conftest's ``otlp``): the coordinator's and the sidecar's from pd-runtime, and vLLM's own
``llm_request`` span from the prefill and the decode worker (started with
``--otlp-traces-endpoint``), each the child of the sidecar span whose ``traceparent`` it received.
The test draws the trace as a waterfall (docs/trace.png is one of these).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pd_runtime.demo import DEMO_PROMPT
from tests.e2e.conftest import REPO, Deployment
from tests.otlp import OtlpReceiver, Span, depth_first, render_waterfall


def test_a_disaggregated_request_is_one_trace_across_all_four_processes(
    deployment: Deployment, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    # Unique from the first block on: cached nowhere, so the coordinator disaggregates it.
    tag = uuid.uuid4().hex
    request_id = f"traced-{tag[:8]}"
    answer = deployment.complete(f"{tag} traced: {DEMO_PROMPT}", request_id, max_tokens=8)

    # The decision line ties the request id to the trace id.
    decision = deployment.decision(request_id)
    assert decision["prefill"] is not None, decision
    trace_id = str(decision["trace_id"])
    assert len(trace_id) == 32

    # Each process exports in its own batches, so wait for every span the test reads (the
    # sidecar's request span ends, and may be exported, after vLLM's spans have arrived).
    expected = {
        ("pd-coordinator", "coordinator.request"),
        ("pd-coordinator", "coordinator.prepare"),
        ("pd-coordinator", "coordinator.schedule"),
        ("pd-coordinator", "coordinator.attempt"),
        ("pd-sidecar", "sidecar.request"),
        ("pd-sidecar", "sidecar.prefill"),
        ("pd-sidecar", "sidecar.decode"),
        ("pd-vllm-prefill", "llm_request"),
        ("pd-vllm-decode", "llm_request"),
    }

    def complete(_: list[Span]) -> bool:
        return expected <= {(s.service, s.name) for s in otlp.trace(trace_id)}

    otlp.wait_for(complete, timeout_s=60)
    spans = otlp.trace(trace_id)
    by_id = {s.span_id: s for s in spans}

    def one(service: str, name: str) -> Span:
        found = [s for s in spans if s.service == service and s.name == name]
        assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
        return found[0]

    root = one("pd-coordinator", "coordinator.request")
    assert root.parent_id == "" and root.attributes["pd.request_id"] == request_id
    schedule = one("pd-coordinator", "coordinator.schedule")
    assert schedule.attributes["pd.mode"] == "disaggregated"
    assert schedule.attributes["pd.prefill"] == decision["prefill"]
    assert schedule.attributes["pd.decode"] == decision["target"]
    attempt = one("pd-coordinator", "coordinator.attempt")
    for child in (schedule, attempt, one("pd-coordinator", "coordinator.prepare")):
        assert child.parent_id == root.span_id, child.name
    sidecar = one("pd-sidecar", "sidecar.request")
    assert sidecar.parent_id == attempt.span_id
    assert sidecar.attributes["pd.mode"] == "disaggregated"
    prefill_hop = one("pd-sidecar", "sidecar.prefill")
    decode_hop = one("pd-sidecar", "sidecar.decode")
    assert prefill_hop.parent_id == decode_hop.parent_id == sidecar.span_id
    assert prefill_hop.attributes["server.address"] == decision["prefill"]

    # vLLM's own spans, from the two workers' processes, below the hops that called them.
    prefill_vllm = one("pd-vllm-prefill", "llm_request")
    decode_vllm = one("pd-vllm-decode", "llm_request")
    assert prefill_vllm.parent_id == prefill_hop.span_id
    assert decode_vllm.parent_id == decode_hop.span_id
    assert prefill_vllm.attributes["gen_ai.usage.completion_tokens"] == 1
    # The decode worker's span counts exactly the tokens the client was given.
    completion_tokens = answer.json()["usage"]["completion_tokens"]
    assert decode_vllm.attributes["gen_ai.usage.completion_tokens"] == completion_tokens
    # Every span's parent is in the trace: no broken link between the processes.
    assert all(s.parent_id in by_id for s in spans if s is not root)
    assert len({s.service for s in spans}) == 4

    png = render_waterfall(
        spans, tmp_path / "trace.png", f"one disaggregated request ({request_id}), trace {trace_id}"
    )
    print(f"waterfall: {png}")
    for depth, span in depth_first(spans):
        ms = (span.end_ns - span.start_ns) / 1e6
        print(f"{'  ' * depth}{span.service}: {span.name} {ms:.1f} ms")
    if os.environ.get("PD_RUNTIME_WRITE_DOCS"):
        shutil.copyfile(png, REPO / "docs" / "trace.png")
