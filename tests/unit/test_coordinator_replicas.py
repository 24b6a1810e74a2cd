"""``coordinator.replicas``: coordinator processes sharing one port (SO_REUSEPORT).

Real processes (``pd-runtime coordinator``), real KV events from vLLM's own ZmqEventPublisher
bound on an ``ipc://`` path as the launcher configures workers for replicas, and a recording fake
engine as the decode endpoint (no vLLM engine is needed to show the port and the events).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import vllm.distributed.kv_events  # noqa: F401  (the publisher process's; fail, never skip)
import yaml
from fastapi.responses import PlainTextResponse

from tests.servers import FakeEngine, answers_health, free_port, serve, wait_for
from tests.unit.kv_events.test_vllm_publisher import PUBLISHER

REPLICAS = 2
COORDINATOR = [sys.executable, "-m", "pd_runtime", "coordinator", "--config"]
IDLE_GAUGES = "".join(
    f'{name}{{model_name="tiny"}} 0.0\n'
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    )
)


def requests_served(own_url: str) -> float:
    text = httpx.get(f"{own_url}/metrics", timeout=5, trust_env=False).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pd_coordinator_requests_total{")
    )


def indexed_blocks(own_url: str) -> int:
    """Blocks this replica's index holds (from its own KV-event subscription)."""
    state = httpx.get(f"{own_url}/debug/scheduler", timeout=5, trust_env=False).json()
    return sum(sum(e["indexed_blocks"].values()) for e in state["endpoints"])


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    tmp = tmp_path_factory.mktemp("replicas")
    engine = FakeEngine("decode-0")
    app = engine.app()

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:  # the three gauges the scraper reads, idle
        return PlainTextResponse(IDLE_GAUGES)

    with serve(app) as engine_url:
        address = engine_url.removeprefix("http://")
        events = f"ipc://{tmp}/kv.sock"
        publisher = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, events, f"kv@{address}@tiny"],
            stdout=subprocess.PIPE,
            text=True,
        )
        port = free_port()
        config = tmp / "coordinator.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "port": port,
                    "models": ["tiny"],
                    "reuse_port": True,
                    "scheduler": {"policy": "kv-aware", "params": {}},
                    "endpoints": [
                        {
                            "name": "decode-0",
                            "role": "decode",
                            "address": address,
                            "url": engine_url,
                            "kv_events": events,
                            "kv_events_bind": False,
                        }
                    ],
                }
            )
        )
        own = [free_port() for _ in range(REPLICAS)]
        processes = [
            subprocess.Popen(
                [*COORDINATOR, str(config), "--replica-port", str(p), "--log-level", "warning"],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / f"replica-{k}.log", "wb"),  # noqa: SIM115
            )
            for k, p in enumerate(own)
        ]
        own_urls = [f"http://127.0.0.1:{p}" for p in own]
        try:
            for url in own_urls:
                wait_for(lambda u=url: answers_health(u), timeout_s=90, what=f"{url} healthy")
            yield {
                "shared": f"http://127.0.0.1:{port}",
                "own": own_urls,
                "processes": processes,
                "engine": engine,
                "logs": tmp,
            }
        finally:
            for process in processes:
                process.kill()
                process.wait()
            publisher.kill()
            publisher.wait()


def complete(url: str) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=30) as client:  # a new connection each time
        return client.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": "hello there", "max_tokens": 2},
        )


def test_each_replica_sees_every_kv_event(replicas: dict[str, object]) -> None:
    own = replicas["own"]
    assert isinstance(own, list)
    for url in own:
        wait_for(lambda u=url: indexed_blocks(u) >= 2, timeout_s=60, what=f"{url} indexed blocks")


def test_both_replicas_serve_the_one_port(replicas: dict[str, object]) -> None:
    shared, own = replicas["shared"], replicas["own"]
    assert isinstance(shared, str) and isinstance(own, list)
    before = [requests_served(u) for u in own]
    answers = [complete(shared) for _ in range(24)]
    assert [a.status_code for a in answers] == [200] * 24
    served = [requests_served(u) - b for u, b in zip(own, before, strict=True)]
    assert sum(served) == 24
    # The kernel hashes each new connection to a listener: 24 connections all on one replica
    # would happen with probability 2 * 2**-24.
    assert all(n > 0 for n in served), served


def test_a_killed_replica_does_not_take_the_port_down(replicas: dict[str, object]) -> None:
    shared, own, processes = replicas["shared"], replicas["own"], replicas["processes"]
    assert isinstance(shared, str) and isinstance(own, list) and isinstance(processes, list)
    os.kill(processes[0].pid, signal.SIGKILL)
    processes[0].wait()
    answers = [complete(shared) for _ in range(12)]
    assert [a.status_code for a in answers] == [200] * 12
    assert not answers_health(own[0]) and answers_health(own[1])


def test_the_replica_flag_needs_a_free_own_port(tmp_path: Path) -> None:
    busy = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(
        "models: [m]\nreuse_port: true\nendpoints:\n"
        "  - {name: d, role: decode, address: '127.0.0.1:2', url: 'http://127.0.0.1:2'}\n"
    )
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        result = subprocess.run(
            [*COORDINATOR, str(config), "--port", str(free_port()), "--replica-port", str(busy)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode != 0
    assert "Address already in use" in result.stderr or "address already in use" in result.stderr
