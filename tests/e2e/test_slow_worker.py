"""A decode worker made slow: the latency-aware scheduler learns it and sends the load elsewhere.

On the session deployment, decode-1's vLLM is frozen three quarters of the time (SIGSTOP and
SIGCONT to its process group every 20 ms: a noisy neighbour that takes its CPU, or a throttled
node). A second coordinator, run by this test over the same decode endpoints (their
sidecars; no prefill endpoint, so every request is served directly; no KV events: the session's
coordinator holds those sockets), scores decode endpoints by ``predicted-latency`` alone. It
learns each endpoint's TTFT from the streams it forwards; once both are warm it should send
nearly everything to decode-0. The learned models are read from its /debug/scheduler.

Why not busy loops pinned to decode-1's core: on two cores every process that is not pinned
(coordinators, sidecars, vLLM's API servers, pytest) then runs on decode-0's core, and a CI run
measured decode-0 the slower of the two; the scheduler was right and the test's premise wrong.
Freezing the process slows decode-1 by the same factor on any machine and frees cores instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pd_runtime.demo import DEMO_PROMPT
from tests.e2e.conftest import Deployment
from tests.servers import answers_health, free_port, wait_for

FROZEN_S, RUNNING_S = 0.060, 0.020  # decode-1 runs a quarter of the wall time
WARM_SAMPLES = 4
REQUESTS = 36


@pytest.fixture
def slowed_decode_1(deployment: Deployment) -> Iterator[int]:
    """Freeze and thaw decode-1's vLLM (its API server and engine: one process group) until the
    test ends; it is left running."""
    group = deployment.pids["decode-1"]
    done = threading.Event()

    def duty_cycle() -> None:
        while not done.is_set():
            os.killpg(group, signal.SIGSTOP)
            done.wait(FROZEN_S)
            os.killpg(group, signal.SIGCONT)
            done.wait(RUNNING_S)

    thread = threading.Thread(target=duty_cycle, name="freeze-decode-1", daemon=True)
    thread.start()
    try:
        yield group
    finally:
        done.set()
        thread.join(5)
        os.killpg(group, signal.SIGCONT)


@pytest.fixture
def latency_coordinator(deployment: Deployment, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    config = {
        "port": port,
        "models": [deployment.model],
        "endpoints": [
            {"name": e.name, "role": "decode", "address": e.address, "url": e.url}
            for e in deployment.decode
        ],
        "scheduler": {
            "policy": "kv-aware",
            "params": {
                "tokenizer": str(deployment.plan.model_path.resolve()),
                "block_size": deployment.plan.workers[0].effective_block_size,
                "latency_min_samples": WARM_SAMPLES,
                "profiles": {
                    "decode": {
                        "filters": [{"type": "healthy"}],
                        "scorers": [{"type": "predicted-latency"}],
                    }
                },
            },
        },
    }
    path = tmp_path / "latency-coordinator.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    log = (tmp_path / "latency-coordinator.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pd_runtime", "coordinator", "--config", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: answers_health(url), timeout_s=120, what="the latency coordinator", poll_s=0.5
        )
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def stream(url: str, model: str, prompt: str) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        assert response.status_code == 200, response.read()
        for _ in response.iter_bytes():
            pass


def test_the_latency_aware_scheduler_moves_load_away_from_a_slowed_decode_worker(
    deployment: Deployment, slowed_decode_1: int, latency_coordinator: str
) -> None:
    url = latency_coordinator
    for i in range(REQUESTS):
        # Distinct prompts of the same length: the same prefill work on either endpoint.
        stream(url, deployment.model, f"slow {i} {uuid.uuid4().hex}: {DEMO_PROMPT}")
    state = httpx.get(f"{url}/debug/scheduler", timeout=30).json()
    latency = state["latency"]
    by_name = {e["name"]: e["address"] for e in state["endpoints"]}
    fast, slow = by_name["decode-0"], by_name["decode-1"]
    assert latency[fast]["ttft"]["n"] >= WARM_SAMPLES and latency[slow]["ttft"]["n"] >= WARM_SAMPLES
    served = Counter(_decisions(url))
    print(f"\nserved {dict(served)}; latency models {json.dumps(latency)}", flush=True)
    # The slowed worker got what the cold start and the odd re-check gave it, the rest went to
    # the fast one: a round-robin would have split 18 / 18.
    assert served["decode-1"] <= REQUESTS // 3, served
    assert served["decode-0"] + served["decode-1"] == REQUESTS


def _decisions(url: str) -> dict[str, float]:
    """Requests decided per decode endpoint name, from the coordinator's own counter."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pd_coordinator_decisions_total":
                name = sample.labels["decode"]
                counts[name] = counts.get(name, 0.0) + sample.value
    return counts
