"""`pd-runtime up` keeps serving while its parts are killed under load.

Destructive: runs after every other test (it sorts after test_faults by file name). Four clients
send requests in a loop; prefill-0's process group is SIGKILLed, then a few seconds later
decode-1's. Only requests in flight on decode-1 when it died may fail, and they fail cleanly; ``up``
restarts both by itself (status.json), and serving goes on. The restart times (kill -> healthy in
status.json) are printed for the README.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest

from pd_runtime.demo import DEMO_PROMPT
from tests.e2e.conftest import Deployment

REQUESTS = 40
CLIENTS = 4
NO_HANG_S = 120


@dataclass
class Outcome:
    request_id: str
    stream: bool
    started: float
    ended: float
    status: int
    error: dict | None  # the OpenAI error object when it failed, else None
    clean: bool  # a failure in OpenAI format (JSON error body or SSE error event)


def send(deployment: Deployment, request_id: str, stream: bool) -> Outcome:
    words = " ".join(DEMO_PROMPT.split()[:100])
    body = {
        "model": deployment.model,
        "prompt": f"{request_id}: {words}",
        "max_tokens": 16,
        "temperature": 0,
        "stream": stream,
    }
    headers = {"x-request-id": request_id}
    url = f"{deployment.gateway}/v1/completions"
    started = time.monotonic()
    status, error, clean = 0, None, False
    try:
        if not stream:
            response = httpx.post(url, json=body, headers=headers, timeout=NO_HANG_S)
            status = response.status_code
            if status != 200:
                try:
                    error = response.json()["error"]
                    clean = status >= 500 and {"message", "type", "code"} <= set(error)
                except (ValueError, KeyError, TypeError):
                    error = {"body": response.text[:300]}
        else:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=NO_HANG_S) as r:
                status = r.status_code
                if status != 200:
                    r.read()
                    try:
                        error = r.json()["error"]
                        clean = status >= 500 and {"message", "type", "code"} <= set(error)
                    except (ValueError, KeyError, TypeError):
                        error = {"body": r.text[:300]}
                else:
                    done = False
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            event = json.loads(line[6:])
                            if "error" in event:
                                error = event["error"]
                                clean = {"message", "type", "code"} <= set(error)
                    if error is None and not done:
                        error, clean = {"body": "stream ended without [DONE]"}, False
                    if error is not None:
                        status = int(error.get("code") or 0) if clean else -1
    except httpx.HTTPError as exc:
        status, error, clean = -1, {"exception": repr(exc)}, False
    return Outcome(request_id, stream, started, time.monotonic(), status, error, clean)


@pytest.mark.destructive
def test_up_keeps_serving_while_a_prefill_and_a_decode_worker_are_killed_under_load(
    deployment: Deployment,
) -> None:
    deployment.wait_all_healthy()
    before = {name: deployment.part_status(name) for name in ("prefill-0", "decode-1")}
    decode_1 = deployment.address_of("decode-1")

    ids = iter(range(REQUESTS))
    ids_lock = threading.Lock()
    outcomes: list[Outcome] = []

    def client() -> None:
        while True:
            with ids_lock:
                i = next(ids, None)
            if i is None:
                return
            outcome = send(deployment, f"load-{i}-{uuid.uuid4().hex[:8]}", stream=i % 2 == 1)
            with ids_lock:
                outcomes.append(outcome)

    # Watch status.json for each killed part coming back healthy under a new pid.
    killed_at: dict[str, float] = {}
    healthy_at: dict[str, float] = {}
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            for part in deployment.status()["parts"]:
                name = part["name"]
                if (
                    name in killed_at
                    and name not in healthy_at
                    and part["pid"] != before[name]["pid"]
                    and part["restarts"] > before[name]["restarts"]
                    and part["state"] == "running"
                    and part["healthy"]
                ):
                    healthy_at[name] = time.monotonic()
            time.sleep(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    try:
        for thread in clients:
            thread.start()
        deployment.eventually(lambda: len(outcomes) >= 6, "the first requests", timeout_s=300)
        killed_at["prefill-0"] = time.monotonic()
        os.killpg(before["prefill-0"]["pid"], signal.SIGKILL)
        time.sleep(4)
        killed_at["decode-1"] = time.monotonic()
        os.killpg(before["decode-1"]["pid"], signal.SIGKILL)
        for thread in clients:
            thread.join(REQUESTS * NO_HANG_S)
        assert not any(thread.is_alive() for thread in clients), "a client hung"
        deployment.eventually(
            lambda: set(healthy_at) == set(killed_at),
            "up to restart prefill-0 and decode-1 (status.json)",
            timeout_s=max(1.0, 180 - (time.monotonic() - killed_at["prefill-0"])),
        )
    finally:
        watching.set()
        watcher.join(5)

    restart_s = {name: healthy_at[name] - killed_at[name] for name in killed_at}
    failed = [o for o in outcomes if o.status != 200]
    print(
        f"[up under load] {len(outcomes)} requests, {len(failed)} failed; restart times "
        + ", ".join(
            f"{name} {seconds:.1f}s (kill -> healthy)" for name, seconds in restart_s.items()
        )
    )
    for outcome in failed:
        print(f"[up under load] failed {outcome.request_id}: {outcome.status} {outcome.error}")

    assert len(outcomes) == REQUESTS
    assert all(o.ended - o.started < NO_HANG_S for o in outcomes)  # no hang
    # Only requests in flight on decode-1 when it died may fail, and cleanly.
    decisions = deployment.decisions([o.request_id for o in failed])
    for outcome in failed:
        assert outcome.clean, outcome
        assert outcome.status >= 500, outcome
        assert decisions[outcome.request_id]["target"] == decode_1, (outcome, decisions)
        assert outcome.started < killed_at["decode-1"] < outcome.ended, outcome
    assert all(seconds < 180 for seconds in restart_s.values()), restart_s
    assert "prefill-0 exited with code -9; restarting" in deployment.up_output()
    for name in killed_at:
        part = deployment.part_status(name)
        assert part["restarts"] >= before[name]["restarts"] + 1, part
        assert (part["state"], part["healthy"]) == ("running", True), part

    # Serving goes on: through the gateway, and straight at decode-1's sidecar (no prefiller).
    deployment.wait_all_healthy()
    for i in range(4):
        outcome = send(deployment, f"after-{i}-{uuid.uuid4().hex[:8]}", stream=i % 2 == 1)
        assert outcome.status == 200, outcome
    sidecar = next(e.url for e in deployment.decode if e.address == decode_1)
    response = httpx.post(
        f"{sidecar}/v1/completions",
        json={"model": deployment.model, "prompt": DEMO_PROMPT, "max_tokens": 8, "temperature": 0},
        timeout=NO_HANG_S,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]
