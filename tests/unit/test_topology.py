from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pd_runtime.config import DeploymentConfig
from pd_runtime.config.loader import parse_config
from pd_runtime.errors import ConfigError
from pd_runtime.launcher.topology import plan_deployment
from pd_runtime.platform import Platform

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local-cpu.yaml"


def config(**changes: object) -> DeploymentConfig:
    data = yaml.safe_load(LOCAL.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return parse_config(DeploymentConfig, data)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_cpu_plan_pins_workers_round_robin_and_wires_sidecars(tmp_path: Path) -> None:
    plan = plan_deployment(config(), tmp_path, Platform("cpu", 0, (0, 1)))
    names = [p.name for p in plan.parts]
    assert names == ["prefill-0", "decode-0", "decode-1", "sidecar-0", "sidecar-1", "coordinator"]
    workers = {p.name: p for p in plan.by_kind("worker")}
    assert [workers[n].env["VLLM_CPU_OMP_THREADS_BIND"] for n in names[:3]] == ["0", "1", "0"]
    assert {workers[n].env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for n in names[:3]} == {
        "5600",
        "5610",
        "5611",
    }
    assert (
        json.loads(flag(workers["decode-1"].argv, "--kv-transfer-config"))["kv_role"]
        == "kv_consumer"
    )
    sidecar = plan.by_kind("sidecar")[1]
    assert flag(sidecar.argv, "--decode-url") == "http://127.0.0.1:8201"
    assert flag(sidecar.argv, "--prefiller") == "127.0.0.1:8100"
    assert flag(sidecar.argv, "--drain-timeout") == "30.0"
    decode = plan.coordinator.by_role("decode")
    assert [(e.address, e.url) for e in decode] == [
        ("127.0.0.1:8200", "http://127.0.0.1:8300"),
        ("127.0.0.1:8201", "http://127.0.0.1:8301"),
    ]
    assert plan.coordinator.by_role("prefill")[0].kv_events == "tcp://127.0.0.1:5700"
    assert plan.gateway_url == "http://127.0.0.1:8000"
    assert plan.coordinator.models == ["tiny-qwen3"]


def test_gpu_plan_gives_each_worker_its_own_gpu_group(tmp_path: Path) -> None:
    plan = plan_deployment(
        config(engine__tensor_parallel_size=2), tmp_path, Platform("cuda", 8, (0, 1))
    )
    gpus = [p.env["CUDA_VISIBLE_DEVICES"] for p in plan.by_kind("worker")]
    assert gpus == ["0,1", "2,3", "4,5"]
    assert all("VLLM_CPU_OMP_THREADS_BIND" not in p.env for p in plan.by_kind("worker"))


def test_gpu_plan_refuses_more_workers_than_gpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need 6 GPUs, this machine has 4"):
        plan_deployment(config(engine__tensor_parallel_size=2), tmp_path, Platform("cuda", 4, (0,)))


def test_drain_settings_reach_the_sidecars_and_the_coordinator(tmp_path: Path) -> None:
    plan = plan_deployment(
        config(
            sidecar__drain_delay_s=4, coordinator__drain_delay_s=6, coordinator__drain_timeout_s=9
        ),
        tmp_path,
        Platform("cpu", 0, (0, 1)),
    )
    assert {flag(s.argv, "--drain-delay") for s in plan.by_kind("sidecar")} == {"4.0"}
    assert (plan.coordinator.drain_delay_s, plan.coordinator.drain_timeout_s) == (6, 9)


def test_the_edge_settings_pass_through_and_the_launch_settings_stay_behind(
    tmp_path: Path,
) -> None:
    # plan_deployment passes the section's edge settings (a CoordinatorEdge) through by name; how
    # the launcher runs the coordinator (replicas) is not a coordinator's own setting.
    from pd_runtime.config.coordinator import CoordinatorConfig, CoordinatorEdge

    plan = plan_deployment(
        config(coordinator__replicas=2, coordinator__max_queued=7),
        tmp_path,
        Platform("cpu", 0, (0, 1)),
    )
    assert plan.coordinator.max_queued == 7
    assert set(CoordinatorEdge.model_fields) <= set(CoordinatorConfig.model_fields)
    assert not {"replicas", "replica_port"} & set(CoordinatorConfig.model_fields)


def test_coordinator_replicas_share_the_port_and_connect_to_bound_publishers(
    tmp_path: Path,
) -> None:
    plan = plan_deployment(config(coordinator__replicas=2), tmp_path, Platform("cpu", 0, (0, 1)))
    coordinators = plan.by_kind("coordinator")
    assert [(p.name, p.port) for p in coordinators] == [
        ("coordinator-0", 8001),
        ("coordinator-1", 8002),
    ]
    assert [flag(p.argv, "--replica-port") for p in coordinators] == ["8001", "8002"]
    assert plan.coordinator.reuse_port and plan.coordinator.port == 8000
    assert plan.coordinator.scheduler.params["replicas"] == 2  # the replicated profiles
    assert plan.gateway_url == "http://127.0.0.1:8000"
    socket = f"ipc://{tmp_path.resolve()}/kv-events-decode-1.sock"
    worker = next(p for p in plan.parts if p.name == "decode-1")
    assert json.loads(flag(worker.argv, "--kv-events-config"))["endpoint"] == socket
    decode1 = next(e for e in plan.coordinator.endpoints if e.name == "decode-1")
    assert (decode1.kv_events, decode1.kv_events_bind) == (socket, False)
    assert decode1.kv_events_replay == "tcp://127.0.0.1:5761"


def test_workers_can_bind_their_publishers_for_one_coordinator(tmp_path: Path) -> None:
    """workers_bind_kv_events without replicas: the workers bind (ipc://), the one coordinator
    connects, and stays one process with the default (unreplicated) profiles."""
    plan = plan_deployment(
        config(coordinator__workers_bind_kv_events=True), tmp_path, Platform("cpu", 0, (0, 1))
    )
    assert [p.name for p in plan.by_kind("coordinator")] == ["coordinator"]
    assert not plan.coordinator.reuse_port
    assert plan.coordinator.scheduler.params["replicas"] == 1
    socket = f"ipc://{tmp_path.resolve()}/kv-events-decode-1.sock"
    worker = next(p for p in plan.parts if p.name == "decode-1")
    assert json.loads(flag(worker.argv, "--kv-events-config"))["endpoint"] == socket
    decode1 = next(e for e in plan.coordinator.endpoints if e.name == "decode-1")
    assert (decode1.kv_events, decode1.kv_events_bind) == (socket, False)


def test_one_coordinator_keeps_its_name_port_and_bound_subscriber(tmp_path: Path) -> None:
    plan = plan_deployment(config(), tmp_path, Platform("cpu", 0, (0, 1)))
    assert [(p.name, p.port) for p in plan.by_kind("coordinator")] == [("coordinator", 8000)]
    assert not plan.coordinator.reuse_port
    assert all(e.kv_events_bind for e in plan.coordinator.endpoints)


def test_replica_ports_are_claimed_like_every_other_port() -> None:
    with pytest.raises(
        ConfigError, match=r"coordinator\.replica_port: port 8300 collides with sidecar"
    ):
        config(coordinator__replicas=2, coordinator__replica_port=8299)
    assert config(
        coordinator__replicas=3, coordinator__replica_port=9000
    ).coordinator.replica_ports == [9000, 9001, 9002]


def test_a_too_long_run_directory_for_the_event_sockets_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 90)
    with pytest.raises(ConfigError, match="longer than a unix socket allows"):
        plan_deployment(config(coordinator__replicas=2), deep, Platform("cpu", 0, (0, 1)))


def test_staging_prefill_packs_a_head_range_per_decode_rank_reading_from_it(
    tmp_path: Path,
) -> None:
    """Prefill TP2 -> decode TP4 on 10 GPUs: each prefill rank is read by two decode ranks."""
    data, staging = _staging_plan(tmp_path, prefill_tp=2, decode_tp=4, gpus=10)
    # Every decode rank reads whole slots, so the prefill frees a packed request's blocks.
    assert staging["prefill-0"] == {"buffer_mib": 128, "reader_splits": 2, "release_blocks": True}
    assert staging["decode-0"] == staging["decode-1"] == {"buffer_mib": 128}
    data["transport"]["kv_staging_reader_splits"] = 1  # an explicit setting wins
    plan = plan_deployment(
        parse_config(DeploymentConfig, data), tmp_path, Platform("cuda", 10, (0,))
    )
    prefill = plan.by_kind("worker")[0]
    transfer = json.loads(flag(prefill.argv, "--kv-transfer-config"))
    assert transfer["kv_connector_extra_config"]["pd_staging"]["reader_splits"] == 1


def test_a_prefill_keeps_its_blocks_where_decodes_cannot_read_whole_slots(tmp_path: Path) -> None:
    """Prefill TP4 -> decode TP2: a decode rank would need two prefill ranks' slots, so it reads
    per block, and the prefill must keep the blocks it packed for that read."""
    _, staging = _staging_plan(tmp_path, prefill_tp=4, decode_tp=2, gpus=8)
    assert staging["prefill-0"] == {"buffer_mib": 128, "reader_splits": 1}


def _staging_plan(
    tmp_path: Path, *, prefill_tp: int, decode_tp: int, gpus: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The embedded config with 128 MiB staging and these TPs on ``gpus`` GPUs, and each
    worker's ``pd_staging`` settings as its command line gives them to vLLM."""
    data = yaml.safe_load(LOCAL.read_text())
    data["transport"]["kv_staging_mib"] = 128
    data["prefill"]["tensor_parallel_size"] = prefill_tp
    data["decode"]["tensor_parallel_size"] = decode_tp
    plan = plan_deployment(
        parse_config(DeploymentConfig, data), tmp_path, Platform("cuda", gpus, (0,))
    )
    return data, {
        p.name: json.loads(flag(p.argv, "--kv-transfer-config"))["kv_connector_extra_config"][
            "pd_staging"
        ]
        for p in plan.by_kind("worker")
    }


@pytest.mark.parametrize(("setting", "expected"), [(None, "none"), ("peer", "peer")])
def test_workers_of_one_plan_skip_ucxs_tcp_wire_up_unless_told_peer(
    tmp_path: Path, setting: str | None, expected: str
) -> None:
    """Every worker of a plan runs on this host (Ray restores peer across nodes), so a config that
    says nothing gets 'none': no TCP handshake between the workers (README, Known issues)."""
    plan = plan_deployment(
        config(transport__ucx_error_handling=setting), tmp_path, Platform("cpu", 0, (0, 1))
    )
    modes = {p.env["PD_RUNTIME_UCX_ERROR_HANDLING"] for p in plan.by_kind("worker")}
    assert modes == {expected}
