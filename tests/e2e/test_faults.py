"""Faults along the real P/D chain: a client going away, a prefill worker killed mid-traffic.

The destructive tests kill workers of the shared session deployment, so they are marked to run
after every other test (see conftest). Everything is real: vLLM-CPU workers, NIXL, the sidecars
and the coordinator; the evidence is the HTTP status the client saw and the workers' own
Prometheus metrics.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from pd_runtime.common.prom import scrape_metrics
from pd_runtime.demo import DEMO_PROMPT
from tests.e2e.conftest import Deployment

NIXL = "vllm:nixl_xfer_time_seconds_count"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"


def busy(deployment: Deployment) -> dict[str, float]:
    """Requests each worker is running or holding waiting, from its own /metrics."""
    out = {}
    for endpoint in [*deployment.decode, *deployment.prefill]:
        values = scrape_metrics(endpoint.metrics_url)
        out[endpoint.address] = values.get(RUNNING, 0.0) + values.get(WAITING, 0.0)
    return out


def test_a_client_that_goes_away_mid_stream_frees_the_workers(deployment: Deployment) -> None:
    body = {
        "model": deployment.model,
        "prompt": f"disconnect {uuid.uuid4().hex}: {DEMO_PROMPT}",
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    chunks = 0
    with httpx.stream(
        "POST", f"{deployment.gateway}/v1/completions", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks >= 5:
                break  # leaving the block closes the connection mid-stream
    assert chunks >= 5
    # The abort travels coordinator -> sidecar -> decode worker; vLLM drops the request.
    deadline = time.monotonic() + 30
    while any(busy(deployment).values()):
        assert time.monotonic() < deadline, f"workers still busy: {busy(deployment)}"
        time.sleep(0.5)


@pytest.mark.destructive
def test_killing_the_prefill_worker_mid_traffic_fails_no_request(deployment: Deployment) -> None:
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    killed = threading.Event()

    def one(i: int) -> None:
        started = time.monotonic()
        prompt = f"fault {i} {uuid.uuid4().hex}: {DEMO_PROMPT}"
        response = deployment.post_completion(prompt, f"prefill-fault-{i}", max_tokens=16)
        with lock:
            results.append((response.status_code, time.monotonic() - started))
            if len(results) == 4:
                killed.set()

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(one, i) for i in range(12)]
        assert killed.wait(300), "the first requests did not complete"
        os.killpg(deployment.pids["prefill-0"], signal.SIGKILL)
        for future in futures:
            future.result()

    statuses = [status for status, _ in results]
    assert statuses == [200] * 12, statuses
    # Served within a bounded delay: the sidecar's prefill timeout, not forever.
    assert max(seconds for _, seconds in results) < 150
    # Taken out of rotation.
    assert deployment.endpoint_state(deployment.prefill[0].address)["healthy"] is False


@pytest.mark.destructive
def test_a_restarted_prefill_worker_rejoins_with_a_new_engine_identity(
    deployment: Deployment,
) -> None:
    """Runs after the kill above (file order). The new process is a new vLLM engine: a new NIXL
    engine id the decode workers must handshake with, KV events starting again at sequence 0."""
    prefill = deployment.prefill[0]
    deployment.launcher.restart("prefill-0")
    # The coordinator takes it back on its next good /metrics scrape.
    deployment.eventually(
        lambda: deployment.endpoint_state(prefill.address)["healthy"],
        "the coordinator to take the restarted prefill worker back",
    )

    before = {e.address: scrape_metrics(e.metrics_url).get(NIXL, 0.0) for e in deployment.decode}
    request_id = f"rejoin-{uuid.uuid4().hex[:8]}"
    deployment.complete(f"{request_id}: {DEMO_PROMPT}", request_id)
    record = deployment.decision(request_id)
    assert record["prefill"] == prefill.address  # disaggregated again, to the new engine
    after = scrape_metrics(f"http://{record['target']}/metrics").get(NIXL, 0.0)
    assert after >= before[str(record["target"])] + 1  # and its KV blocks came over NIXL


@pytest.mark.destructive
def test_killing_a_decode_worker_fails_requests_over_to_the_other(deployment: Deployment) -> None:
    victim = deployment.decode[1]
    os.killpg(deployment.pids[victim.name], signal.SIGKILL)
    ids = [f"decode-fault-{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    for request_id in ids:
        deployment.complete(f"{request_id}: {DEMO_PROMPT}", request_id)
    # Every request was answered by the survivor; the first attempt that met the dead worker was
    # retried there (or the scheduler had already taken the dead one out of rotation). The last
    # decision logged per request is the attempt that served it.
    finals = {rid: record["target"] for rid, record in deployment.decisions(ids).items()}
    assert set(finals) == set(ids)
    assert set(finals.values()) == {deployment.decode[0].address}, finals
