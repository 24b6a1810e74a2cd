"""The Ray launcher's pure parts, without a cluster: placement-group bundles built from a plan (TP
groups packed, sidecars beside their decode worker, CPU vs GPU bundles), the plan relocated onto
the nodes the groups landed on, the config and CLI wiring, and the part supervisor."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pd_runtime.cli import build_parser
from pd_runtime.config import DeploymentConfig
from pd_runtime.config.launcher import LocalLauncherConfig, RayLauncherConfig
from pd_runtime.config.loader import parse_config
from pd_runtime.errors import ConfigError
from pd_runtime.launcher.base import LAUNCHERS
from pd_runtime.launcher.ray import placement_groups, relocate_plan
from pd_runtime.launcher.supervisor import PartSupervisor
from pd_runtime.launcher.topology import DeploymentPlan, plan_deployment
from pd_runtime.platform import Platform
from tests.servers import wait_for

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local-cpu.yaml"


def deployment(launcher: dict[str, Any] | None = None, tp: int = 1) -> DeploymentConfig:
    data = yaml.safe_load(LOCAL.read_text())
    data["engine"]["tensor_parallel_size"] = tp
    if launcher is not None:
        data["launcher"] = launcher
    return parse_config(DeploymentConfig, data)


def cpu_plan(tmp_path: Path, config: DeploymentConfig | None = None) -> DeploymentPlan:
    return plan_deployment(config or deployment(), tmp_path, Platform("cpu", 0, (0, 1)))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# -- bundles ---------------------------------------------------------------------------------------


def test_cpu_cluster_one_group_per_worker_with_the_sidecar_packed_beside_its_decode(
    tmp_path: Path,
) -> None:
    groups = placement_groups(cpu_plan(tmp_path), RayLauncherConfig(), prefix="demo")
    assert [(g.name, g.members, g.strategy) for g in groups] == [
        ("demo/prefill-0", ("prefill-0",), "STRICT_PACK"),
        ("demo/decode-0", ("decode-0", "sidecar-0"), "STRICT_PACK"),
        ("demo/decode-1", ("decode-1", "sidecar-1"), "STRICT_PACK"),
    ]
    assert groups[0].bundles == ({"CPU": 1.0},)
    assert groups[2].bundles == ({"CPU": 1.0}, {"CPU": 0.5})
    assert groups[2].bundle_of("sidecar-1") == 1
    assert all("GPU" not in b for g in groups for b in g.bundles)


def test_gpu_cluster_packs_a_tp_group_into_one_bundle(tmp_path: Path) -> None:
    settings = RayLauncherConfig(worker_cpus=4, sidecar_cpus=1)
    plan = plan_deployment(deployment(tp=4), tmp_path, Platform("cuda", 12, (0, 1)))
    groups = placement_groups(plan, settings)
    # One bundle holds all tp GPUs, so STRICT_PACK keeps the TP group on one node and the actor
    # (num_gpus=tp) gets every GPU of it.
    assert [g.bundles[0] for g in groups] == [{"CPU": 4.0, "GPU": 4.0}] * 3
    assert groups[1].bundles[1] == {"CPU": 1.0}  # the sidecar needs no GPU
    assert len(groups) == 3 and all(g.strategy == "STRICT_PACK" for g in groups)


def test_role_resources_go_into_that_roles_worker_bundles_only(tmp_path: Path) -> None:
    settings = RayLauncherConfig(resources={"prefill": {"node_a": 1}, "decode": {"node_b": 0.5}})
    groups = placement_groups(cpu_plan(tmp_path), settings)
    assert groups[0].bundles == ({"CPU": 1.0, "node_a": 1.0},)
    assert groups[1].bundles == ({"CPU": 1.0, "node_b": 0.5}, {"CPU": 0.5})


def test_a_decode_worker_without_its_sidecar_is_refused(tmp_path: Path) -> None:
    plan = cpu_plan(tmp_path)
    broken = DeploymentPlan(
        [p for p in plan.parts if p.name != "sidecar-1"],
        plan.coordinator,
        plan.coordinator_config_path,
        plan.model_path,
        plan.workers,
    )
    with pytest.raises(ConfigError, match="decode-1 has no sidecar-1"):
        placement_groups(broken, RayLauncherConfig())


# -- relocation ------------------------------------------------------------------------------------

HOSTS = {
    "prefill-0": "10.0.0.1",
    "decode-0": "10.0.0.2",
    "sidecar-0": "10.0.0.2",
    "decode-1": "10.0.0.3",
    "sidecar-1": "10.0.0.3",
}


def test_relocated_plan_binds_each_part_on_its_node_and_points_kv_events_at_the_coordinator(
    tmp_path: Path,
) -> None:
    plan = relocate_plan(cpu_plan(tmp_path), HOSTS, "10.0.0.9")
    parts = {p.name: p for p in plan.parts}
    decode = parts["decode-1"]
    assert flag(decode.argv, "--host") == "10.0.0.3" and decode.host == "10.0.0.3"
    assert decode.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.3"
    events = json.loads(flag(decode.argv, "--kv-events-config"))
    assert events["endpoint"] == "tcp://10.0.0.9:5711"  # the coordinator's node binds it
    assert events["topic"] == "kv@10.0.0.3:8201@tiny-qwen3"
    assert events["replay_endpoint"] == "tcp://10.0.0.3:5761"  # the worker binds it
    assert decode.env["VLLM_CPU_OMP_THREADS_BIND"] == "0"  # the rest of the spec is kept

    sidecar = parts["sidecar-1"]
    assert flag(sidecar.argv, "--host") == "10.0.0.3"
    assert flag(sidecar.argv, "--decode-url") == "http://10.0.0.3:8201"
    assert flag(sidecar.argv, "--prefiller") == "10.0.0.1:8100"
    assert parts["coordinator"].host == "10.0.0.9"
    assert plan.gateway_url == "http://10.0.0.9:8000"
    assert [w.host for w in plan.workers] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_ucx_error_handling_none_is_kept_on_one_host_and_dropped_across_hosts(
    tmp_path: Path,
) -> None:
    """local-cpu.yaml asks for ``none`` (no TCP between workers on one host); across hosts a
    dead peer must fail a transfer, so NIXL's own (peer) comes back."""
    plan = cpu_plan(tmp_path)
    assert {w.ucx_error_handling for w in plan.workers} == {"none"}
    across = relocate_plan(plan, HOSTS, "10.0.0.9")
    assert {w.ucx_error_handling for w in across.workers} == {None}
    assert all("PD_RUNTIME_UCX_ERROR_HANDLING" not in p.env for p in across.by_kind("worker"))
    one = relocate_plan(plan, dict.fromkeys(HOSTS, "10.0.0.1"), "10.0.0.1")
    assert all(p.env["PD_RUNTIME_UCX_ERROR_HANDLING"] == "none" for p in one.by_kind("worker"))


def test_relocated_replicas_connect_to_publishers_bound_on_the_workers_nodes(
    tmp_path: Path,
) -> None:
    config = deployment().model_copy(deep=True)
    config = parse_config(
        DeploymentConfig,
        {**config.model_dump(), "coordinator": {**config.coordinator.model_dump(), "replicas": 2}},
    )
    plan = relocate_plan(cpu_plan(tmp_path, config), HOSTS, "10.0.0.9")
    parts = {p.name: p for p in plan.parts}
    events = json.loads(flag(parts["decode-1"].argv, "--kv-events-config"))
    assert events["endpoint"] == "tcp://*:5711"  # no local ipc path across nodes
    decode1 = next(e for e in plan.coordinator.endpoints if e.name == "decode-1")
    assert (decode1.kv_events, decode1.kv_events_bind) == ("tcp://10.0.0.3:5711", False)
    assert {parts[f"coordinator-{k}"].host for k in range(2)} == {"10.0.0.9"}
    assert plan.coordinator.reuse_port


def test_relocated_coordinator_endpoints_come_from_the_placement(tmp_path: Path) -> None:
    coordinator = relocate_plan(cpu_plan(tmp_path), HOSTS, "10.0.0.9").coordinator
    assert [
        (e.name, e.address, e.url, e.kv_events, e.kv_events_replay) for e in coordinator.endpoints
    ] == [
        (
            "prefill-0",
            "10.0.0.1:8100",
            "http://10.0.0.1:8100",
            "tcp://10.0.0.9:5700",
            "tcp://10.0.0.1:5750",
        ),
        (
            "decode-0",
            "10.0.0.2:8200",
            "http://10.0.0.2:8300",
            "tcp://10.0.0.9:5710",
            "tcp://10.0.0.2:5760",
        ),
        (
            "decode-1",
            "10.0.0.3:8201",
            "http://10.0.0.3:8301",
            "tcp://10.0.0.9:5711",
            "tcp://10.0.0.3:5761",
        ),
    ]
    assert coordinator.host == "10.0.0.9"


# -- config and CLI --------------------------------------------------------------------------------


def test_launcher_section_selects_the_backend_and_is_validated() -> None:
    assert isinstance(deployment().launcher, LocalLauncherConfig)
    ray = deployment({"type": "ray", "address": "10.0.0.1:6379", "worker_cpus": 2}).launcher
    assert isinstance(ray, RayLauncherConfig)
    assert (ray.address, ray.worker_cpus, ray.max_restarts) == ("10.0.0.1:6379", 2.0, -1)
    with pytest.raises(ConfigError, match="launcher"):
        deployment({"type": "slurm"})
    with pytest.raises(ConfigError, match="worker_cpus"):
        deployment({"type": "ray", "worker_cpus": 0})
    assert LAUNCHERS.names() == ["local", "ray"]


def test_up_takes_a_ray_address() -> None:
    args = build_parser().parse_args(["up", "--config", "x.yaml", "--ray", "10.0.0.1:6379"])
    assert args.ray == "10.0.0.1:6379"
    assert build_parser().parse_args(["up"]).ray is None


# -- supervisor ------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_supervisor_restarts_a_killed_process_and_stops_it_for_good(tmp_path: Path) -> None:
    config_file = tmp_path / "conf" / "part.yaml"
    supervisor = PartSupervisor(
        "part",
        [
            sys.executable,
            "-c",
            "import os, time; print(os.environ['PART_ENV'], flush=True); time.sleep(60)",
        ],
        {"PART_ENV": "from-the-plan"},
        str(tmp_path / "part.log"),
        files={str(config_file): "hello"},
        backoff_s=0.1,
    )
    try:
        assert config_file.read_text() == "hello"
        wait_for(lambda: "from-the-plan" in supervisor.tail(), timeout_s=10, what="first run")
        first = supervisor.status()
        assert first.alive and first.pid is not None and first.restarts == 0
        os.kill(first.pid, signal.SIGKILL)
        wait_for(
            lambda: supervisor.status().restarts == 1 and supervisor.status().alive,
            timeout_s=10,
            what="restart",
        )
        second = supervisor.status()
        assert second.pid != first.pid and second.last_exit == -signal.SIGKILL
        wait_for(
            lambda: supervisor.tail().count("from-the-plan") == 2,
            timeout_s=10,
            what="both runs logged",
        )
    finally:
        supervisor.stop(grace_s=5)
    assert second.pid is not None
    time.sleep(1.0)  # a stopped supervisor must not restart it
    assert not _alive(second.pid) and not supervisor.status().alive


def test_supervisor_gives_up_after_its_restarts(tmp_path: Path) -> None:
    supervisor = PartSupervisor(
        "crasher",
        [sys.executable, "-c", "raise SystemExit(3)"],
        {},
        str(tmp_path / "crasher.log"),
        max_process_restarts=2,
        backoff_s=0.05,
        exit_on_give_up=False,  # in an actor it would end the actor, for Ray to restart
    )
    try:
        wait_for(lambda: supervisor.status().gave_up, timeout_s=15, what="give up")
        status = supervisor.status()
        assert (status.restarts, status.last_exit, status.alive) == (2, 3, False)
    finally:
        supervisor.stop(grace_s=1)


def test_supervisor_sets_the_parts_niceness(tmp_path: Path) -> None:
    # Ray runs actors at niceness 15; the launcher asks for 0. Raising it is always allowed, so
    # the test asks for more than this process has.
    wanted = os.getpriority(os.PRIO_PROCESS, 0) + 3
    supervisor = PartSupervisor(
        "nice", ["sleep", "30"], {}, str(tmp_path / "nice.log"), niceness=wanted
    )
    try:
        pid = supervisor.status().pid
        assert pid is not None and os.getpriority(os.PRIO_PROCESS, pid) == wanted
    finally:
        supervisor.stop(grace_s=1)
