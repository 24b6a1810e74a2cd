"""One real deployment per test session: 1 prefill + 2 decode vLLM-CPU workers on the tiny model,
two sidecars and the coordinator, started by the product itself (``python -m pd_runtime up`` as a
subprocess, supervising its parts) from the shipped config on ports of its own (so a running demo
does not collide). Tests read its state where an operator would: ``RUN_DIR/status.json`` (what
``pd-runtime status`` prints), ``RUN_DIR/up.out`` and the parts' logs and metrics. Tracing is on
for the whole deployment: every part exports its spans to one session-scoped OTLP receiver
(fixture ``otlp``, started first), which tests/e2e/test_tracing.py reads."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pd_runtime.config import DeploymentConfig
from pd_runtime.config.loader import dump_yaml, parse_config
from pd_runtime.demo import pod_score_lines
from pd_runtime.launcher.prepare import prepare_deployment
from pd_runtime.launcher.status import STATUS_FILE
from pd_runtime.launcher.supervisor import _child_setup
from pd_runtime.launcher.topology import DeploymentPlan
from tests.otlp import OtlpReceiver, otlp_receiver
from tests.servers import wait_for

REPO = Path(__file__).resolve().parents[2]
PREFILL_KV_BLOCKS = 72


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
    # Tests with a deployment of their own (own_deployment) run first, before the shared one starts
    # and holds workers on the cores; tests that kill workers of the shared deployment run after
    # every other test (stable sort).
    items.sort(
        key=lambda item: (
            item.get_closest_marker("own_deployment") is None,
            item.get_closest_marker("destructive") is not None,
        )
    )


KV_LEASE_S = 10
UP_READY_TIMEOUT_S = 900


def e2e_config(
    model_dir: Path, offset: int = 1000, otlp_endpoint: str | None = None
) -> DeploymentConfig:
    data = yaml.safe_load((REPO / "configs" / "local-cpu.yaml").read_text())
    data["model"]["path"] = str(model_dir)
    for section in ("prefill", "decode"):
        for key in ("port", "side_channel_port", "kv_events_port", "kv_events_replay_port"):
            data[section][key] += offset
    data["sidecar"]["port"] += offset
    data["coordinator"]["port"] += offset
    # A prefill KV cache of 72 blocks (vLLM needs 65 for one 2048-token prompt) so that a handful of
    # prompts makes it evict, and the eviction test can watch the index follow.
    data["prefill"]["extra_args"] = ["--num-gpu-blocks-override", str(PREFILL_KV_BLOCKS)]
    # A short KV lease, so the test of blocks nobody pulls sees them released within its budget.
    data["transport"]["kv_lease_s"] = KV_LEASE_S
    # Three vLLM-CPU workers start one after the other on 2 cores (plus warm-up).
    data["startup_timeout_s"] = UP_READY_TIMEOUT_S
    if otlp_endpoint is not None:
        data["observability"] = {"otlp_endpoint": otlp_endpoint}
    return parse_config(DeploymentConfig, data, "e2e")


def labelled(url: str, name: str, **labels: str) -> float:
    """Sample ``name`` from ``url`` summed over the label sets that carry ``labels`` (scrape_metrics
    sums over all label sets)."""
    text = httpx.get(url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


class Deployment:
    def __init__(self, plan: DeploymentPlan, run_dir: Path, up: subprocess.Popen[bytes]) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.up = up
        self.gateway = plan.gateway_url
        self.model = plan.coordinator.served_names[0]
        self.decode = plan.coordinator.by_role("decode")
        self.prefill = plan.coordinator.by_role("prefill")

    def status(self) -> dict[str, Any]:
        """``RUN_DIR/status.json`` as ``up`` last wrote it (every second)."""
        return json.loads((self.run_dir / STATUS_FILE).read_text())

    def part_status(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status()["parts"] if p["name"] == name)

    @property
    def pids(self) -> dict[str, int]:
        """Part name -> pid of the process ``up`` runs now (restarts change it)."""
        return {p["name"]: p["pid"] for p in self.status()["parts"]}

    def up_output(self) -> str:
        return (self.run_dir / "up.out").read_text(errors="replace")

    def sidecar_urls(self) -> list[str]:
        return [e.url for e in self.decode]

    def sidecar_metric(self, name: str, **labels: str) -> float:
        """``name`` summed over both sidecars' /sidecar/metrics."""
        return sum(
            labelled(f"{url}/sidecar/metrics", name, **labels) for url in self.sidecar_urls()
        )

    def gateway_metric(self, name: str, **labels: str) -> float:
        return labelled(f"{self.gateway}/metrics", name, **labels)

    def wait_restarted(
        self, name: str, restarts_before: int, pid_before: int, timeout_s: float = 300.0
    ) -> float:
        """Wait until ``up`` has restarted ``name`` by itself (status.json: more restarts, a new
        pid, running and healthy) and the coordinator has it back in rotation; return seconds."""
        address = self.address_of(name)

        def back() -> bool:
            part = self.part_status(name)
            return (
                part["restarts"] > restarts_before
                and part["pid"] not in (None, pid_before)
                and part["state"] == "running"
                and part["healthy"] is True
            )

        took = wait_for(back, timeout_s=timeout_s, what=f"up to restart {name}", poll_s=0.5)
        if any(e.address == address for e in [*self.decode, *self.prefill]):
            self.eventually(
                lambda: self.endpoint_state(address)["healthy"],
                f"the coordinator to take {name} back",
            )
        return took

    def post_completion(
        self, prompt: str, request_id: str, max_tokens: int = 8, **extra: Any
    ) -> httpx.Response:
        """A greedy completion through the gateway, whatever its status."""
        return httpx.post(
            f"{self.gateway}/v1/completions",
            json={
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                **extra,
            },
            headers={"x-request-id": request_id},
            timeout=300,
        )

    def complete(self, prompt: str, request_id: str, max_tokens: int = 8) -> httpx.Response:
        """``post_completion`` that must succeed."""
        response = self.post_completion(prompt, request_id, max_tokens)
        assert response.status_code == 200, response.text
        return response

    def decisions(self, request_ids: list[str]) -> dict[str, dict[str, object]]:
        """The coordinator's ``Got pod scores`` record per request id (its last attempt)."""
        return pod_score_lines(self.run_dir / "coordinator.log", request_ids)

    def decision(self, request_id: str) -> dict[str, Any]:
        return self.decisions([request_id])[request_id]

    def scheduler_state(self) -> dict[str, Any]:
        return httpx.get(f"{self.gateway}/debug/scheduler", timeout=30).json()

    def endpoint_state(self, address: str) -> dict[str, Any]:
        return next(e for e in self.scheduler_state()["endpoints"] if e["address"] == address)

    def wait_all_healthy(self, timeout_s: float = 300.0) -> None:
        """Every part running and healthy in status.json, every endpoint in the coordinator's
        rotation (after a kill: ``up`` has restarted the part and the scraper taken it back)."""
        self.eventually(
            lambda: all(p["state"] == "running" and p["healthy"] for p in self.status()["parts"]),
            "every part running and healthy in status.json",
            timeout_s=timeout_s,
        )
        for endpoint in [*self.prefill, *self.decode]:
            self.eventually(
                lambda e=endpoint: self.endpoint_state(e.address)["healthy"],
                f"the coordinator to have {endpoint.address} in rotation",
            )

    @staticmethod
    def eventually(condition: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
        wait_for(condition, timeout_s=timeout_s, what=what, poll_s=0.25)

    def address_of(self, name: str) -> str:
        """HOST:PORT of a part (for a worker: its endpoint's ``address`` in decisions)."""
        part = next(p for p in self.plan.parts if p.name == name)
        return f"{part.host}:{part.port}"

    def worker_url(self, name: str) -> str:
        part = next(p for p in self.plan.parts if p.name == name)
        return part.url


def _part_processes(pids: list[int]) -> list[psutil.Process]:
    """Live (non-zombie) processes that are a part or in a part's process group."""
    groups = set(pids)
    alive = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if process.pid in groups or os.getpgid(process.pid) in groups:
                alive.append(process)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return alive


def stop_launcher(process: subprocess.Popen[bytes], signum: int, timeout_s: float = 60.0) -> bool:
    """Signal ``up`` or ``serve`` to stop its parts and wait; SIGKILL its process group if it
    has not stopped within ``timeout_s``. True when it stopped by itself."""
    if process.poll() is not None:
        return True
    process.send_signal(signum)
    try:
        process.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        return False


def parts_left(pids: list[int], wait_s: float = 10.0) -> list[psutil.Process]:
    """The parts' processes still alive ``wait_s`` after their launcher stopped (orphans are
    reparented and reaped by init: give that a moment); killed, and returned to assert on."""
    left = _part_processes(pids)
    waited = time.monotonic()
    while left and time.monotonic() - waited < wait_s:
        time.sleep(0.5)
        left = _part_processes(pids)
    for process in left:
        process.kill()
    return left


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no output>"


@pytest.fixture(scope="session")
def otlp() -> Iterator[OtlpReceiver]:
    """The trace collector every part of the deployment exports to (OTLP/HTTP)."""
    with otlp_receiver() as receiver:
        yield receiver


@contextmanager
def running_up(
    config: DeploymentConfig,
    run_dir: Path,
    *,
    ready_timeout_s: float,
    env: dict[str, str] | None = None,
    label: str = "up",
) -> Iterator[Deployment]:
    """``pd-runtime up`` on ``config`` in its own process group until the gateway serves; yields
    the deployment, then stops it with SIGTERM and checks that no part outlived it."""
    # The same config `up` reads, so the same ports and urls; this also writes the model.
    plan = prepare_deployment(config, run_dir, progress=lambda m: print(f"[e2e] {m}", flush=True))
    config_path = run_dir / f"{label}.yaml"
    dump_yaml(config, config_path)
    out_path = run_dir / "up.out"
    started = time.monotonic()
    argv = [sys.executable, "-m", "pd_runtime", "up", "--config", str(config_path)]
    with out_path.open("wb") as out:
        up = subprocess.Popen(
            [*argv, "--run-dir", str(run_dir)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            # Its own process group, SIGTERM'd by the kernel if pytest dies (a timeout), so that
            # `up` stops its parts instead of outliving the run.
            preexec_fn=functools.partial(_child_setup, None),
        )
    deployment = Deployment(plan, run_dir, up)
    try:
        while "\ngateway: " not in "\n" + out_path.read_text(errors="replace"):
            if up.poll() is not None:
                pytest.fail(f"`up` exited with {up.returncode}:\n{_tail(out_path)}")
            if time.monotonic() - started > ready_timeout_s:
                pytest.fail(f"`up` not serving after {ready_timeout_s}s:\n{_tail(out_path)}")
            time.sleep(1)
        print(f"[e2e] {label} serving after {time.monotonic() - started:.0f}s")
        yield deployment
    finally:
        try:
            pids = [p for p in deployment.pids.values() if p]
        except (OSError, ValueError):
            pids = []
        if not stop_launcher(up, signal.SIGTERM):
            for process in _part_processes(pids):
                process.kill()
            pytest.fail(f"`up` did not stop within 60s of SIGTERM:\n{_tail(out_path)}")
        left = parts_left(pids)
        assert not left, f"parts still alive after `up` stopped: {left}\n{_tail(out_path)}"
        print(f"[e2e] {label}: {time.monotonic() - started:.0f}s from start to stopped")


@pytest.fixture(scope="session")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver
) -> Iterator[Deployment]:
    cache = Path(os.environ.get("PD_RUNTIME_CACHE", REPO / ".cache"))
    run_dir = tmp_path_factory.mktemp("run")
    config = e2e_config(cache / "models" / "tiny-qwen3-e2e", otlp_endpoint=otlp.url)
    # Spans leave every part (and vLLM) within half a second, not the SDK's 5 s.
    with running_up(
        config,
        run_dir,
        ready_timeout_s=UP_READY_TIMEOUT_S,
        env={"OTEL_BSP_SCHEDULE_DELAY": "500"},
        label="e2e",
    ) as deployment:
        yield deployment
