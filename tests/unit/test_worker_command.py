from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from pd_runtime.errors import ConfigError
from pd_runtime.worker.command import WorkerSpec, build_worker_command
from pd_runtime.worker.staging import StagingSettings
from pd_runtime.worker.transport import RdmaPort, detect_rdma_ports, ucx_environment


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize(
    ("role", "kv_role"),
    [("prefill", "kv_producer"), ("decode", "kv_consumer"), ("both", "kv_both")],
)
def test_roles_map_to_nixl_kv_roles(role: str, kv_role: str) -> None:
    spec = WorkerSpec(role=role, model="/m", port=8100, platform="cpu", served_model_name="tiny")
    argv, env = build_worker_command(spec, environ={})
    transfer = json.loads(flag(argv, "--kv-transfer-config"))
    assert transfer == {
        "kv_connector": "NixlConnector",
        "kv_role": kv_role,
        "kv_buffer_device": "cpu",
        "kv_load_failure_policy": "recompute",  # a failed KV pull is prefilled locally, no 500
    }
    events = json.loads(flag(argv, "--kv-events-config"))
    assert events["topic"] == "kv@127.0.0.1:8100@tiny"
    assert events["endpoint"] == "tcp://127.0.0.1:5557"
    assert flag(argv, "--block-size") == "32"
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "5600"
    assert env["UCX_TLS"] == "tcp,sm,self"


def test_gpu_worker_uses_cuda_buffers_and_devices() -> None:
    spec = WorkerSpec(
        role="decode",
        model="/m",
        port=1,
        platform="cuda",
        gpu_ids="2,3",
        tensor_parallel_size=2,
        gpu_memory_utilization=0.85,
    )
    argv, env = build_worker_command(spec, environ={})
    assert json.loads(flag(argv, "--kv-transfer-config"))["kv_buffer_device"] == "cuda"
    assert flag(argv, "--block-size") == "16"
    assert flag(argv, "--tensor-parallel-size") == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env
    assert env["UCX_TLS"].endswith("cuda_copy,cuda_ipc")


def test_cpu_pinning_kv_cache_and_passthrough_args() -> None:
    spec = WorkerSpec(
        role="prefill",
        model="/m",
        port=1,
        platform="cpu",
        cpu_cores="1",
        kv_cache_gib=2,
        extra_args=("--max-num-seqs", "8"),
        kv_events_port=None,
    )
    argv, env = build_worker_command(spec, environ={})
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert "PD_RUNTIME_KEEP_CPU_BINDING" not in env  # opt-in for now: see vllm_plugin.py
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert argv[-2:] == ["--max-num-seqs", "8"]
    assert "--kv-events-config" not in argv


def test_cpu_block_size_must_be_a_multiple_of_32() -> None:
    spec = WorkerSpec(role="prefill", model="/m", port=1, platform="cpu", block_size=16)
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_worker_command(spec, environ={})


def test_ucx_prefers_active_rdma_ports_and_respects_overrides() -> None:
    ports = [
        RdmaPort("mlx5_0", 1, "InfiniBand", True),
        RdmaPort("mlx5_1", 1, "Ethernet", False),
        RdmaPort("mlx5_2", 1, "Ethernet", True),
    ]
    env = ucx_environment("cuda", ports=ports, environ={})
    assert env["UCX_TLS"] == "rc,ud,sm,self,cuda_copy,cuda_ipc"
    assert env["UCX_NET_DEVICES"] == "mlx5_0:1,mlx5_2:1"
    assert ucx_environment("cpu", ports=[ports[1]], environ={}) == {"UCX_TLS": "tcp,sm,self"}
    assert ucx_environment("cpu", ports=ports, override_tls="tcp", environ={}) == {"UCX_TLS": "tcp"}
    inherited = ucx_environment("cpu", ports=ports, environ={"UCX_TLS": "shm,self"})
    assert inherited["UCX_TLS"] == "shm,self"


def test_rdma_detection_reads_sysfs(tmp_path: Path) -> None:
    assert detect_rdma_ports(tmp_path / "absent") == []
    for device, state, link in (
        ("mlx5_0", "4: ACTIVE", "InfiniBand"),
        ("mlx5_1", "1: DOWN", "Ethernet"),
    ):
        port = tmp_path / device / "ports" / "1"
        port.mkdir(parents=True)
        (port / "state").write_text(state + "\n")
        (port / "link_layer").write_text(link + "\n")
    found = detect_rdma_ports(tmp_path)
    assert found == [
        RdmaPort("mlx5_0", 1, "InfiniBand", True),
        RdmaPort("mlx5_1", 1, "Ethernet", False),
    ]


def test_cpu_workers_get_a_nixl_progress_delay_and_gpu_workers_keep_nixl_default() -> None:
    cpu = WorkerSpec(role="prefill", model="/m", port=8100, platform="cpu")
    _, env = build_worker_command(cpu, environ={})
    assert env["PD_RUNTIME_NIXL_PROGRESS_DELAY_US"] == "1000"
    assert env["PD_RUNTIME_INIT_AMX"] == "1"  # vLLM-CPU's AMX attention: no SIGILL
    assert "VLLM_PLUGINS" not in env
    gpu = WorkerSpec(role="prefill", model="/m", port=8100, platform="cuda")
    _, env = build_worker_command(gpu, environ={})
    assert "PD_RUNTIME_NIXL_PROGRESS_DELAY_US" not in env
    assert "PD_RUNTIME_INIT_AMX" not in env
    tuned = WorkerSpec(
        role="decode", model="/m", port=8200, platform="cuda", nixl_progress_delay_us=5
    )
    _, env = build_worker_command(tuned, environ={"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert env["PD_RUNTIME_NIXL_PROGRESS_DELAY_US"] == "5"
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver,pd_runtime_nixl"
    assert "PD_RUNTIME_UCX_ERROR_HANDLING" not in env  # NIXL's own unless configured


def test_ucx_error_handling_reaches_the_plugin_and_keeps_it_allowed() -> None:
    spec = WorkerSpec(
        role="decode", model="/m", port=8200, platform="cuda", ucx_error_handling="none"
    )
    _, env = build_worker_command(spec, environ={"VLLM_PLUGINS": "lora_filesystem_resolver"})
    assert env["PD_RUNTIME_UCX_ERROR_HANDLING"] == "none"
    assert env["VLLM_PLUGINS"] == "lora_filesystem_resolver,pd_runtime_nixl"


def test_kv_events_replay_socket_is_bound_on_the_worker_host() -> None:
    spec = WorkerSpec(
        role="decode", model="/m", port=8200, platform="cpu", kv_events_replay_port=5760
    )
    argv, _ = build_worker_command(spec, environ={})
    events = json.loads(flag(argv, "--kv-events-config"))
    assert events["replay_endpoint"] == "tcp://127.0.0.1:5760"
    assert events["endpoint"] == "tcp://127.0.0.1:5557"  # not a wildcard: vLLM connects to it


def test_nixl_threads_and_kv_lease_go_into_the_connector_extra_config() -> None:
    spec = WorkerSpec(
        role="prefill", model="/m", port=1, platform="cpu", nixl_num_threads=2, kv_lease_s=12
    )
    argv, _ = build_worker_command(spec, environ={})
    transfer = json.loads(flag(argv, "--kv-transfer-config"))
    # vLLM's NIXL connector reads these names from kv_connector_extra_config.
    assert transfer["kv_connector_extra_config"] == {"num_threads": 2, "kv_lease_duration": 12}


def test_kv_staging_loads_our_connector_through_its_module_path() -> None:
    spec = WorkerSpec(
        role="decode",
        model="/m",
        port=1,
        platform="cpu",
        kv_staging_mib=32,
        kv_staging_max_descriptor_bytes=4096,
    )
    argv, _ = build_worker_command(spec, environ={})
    transfer = json.loads(flag(argv, "--kv-transfer-config"))
    assert transfer["kv_role"] == "kv_consumer"
    assert transfer["kv_connector_extra_config"]["pd_staging"] == {
        "buffer_mib": 32,
        "max_descriptor_bytes": 4096,
    }
    # What vLLM's connector factory does with these two names: import the module, take the class.
    module = importlib.import_module(transfer["kv_connector_module_path"])
    connector = getattr(module, transfer["kv_connector"])
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

    assert issubclass(connector, NixlPullConnector)


def test_without_kv_staging_the_worker_runs_vllms_own_connector() -> None:
    argv, _ = build_worker_command(
        WorkerSpec(role="prefill", model="/m", port=1, platform="cpu"), environ={}
    )
    transfer = json.loads(flag(argv, "--kv-transfer-config"))
    assert transfer["kv_connector"] == "NixlConnector"
    assert "kv_connector_module_path" not in transfer


def test_a_prefill_worker_packs_one_head_range_per_reading_decode_rank() -> None:
    spec = WorkerSpec(
        role="prefill", model="/m", port=1, platform="cpu", kv_staging_mib=8,
        kv_staging_reader_splits=2, kv_staging_release=True,
    )  # fmt: skip
    transfer = json.loads(flag(build_worker_command(spec, environ={})[0], "--kv-transfer-config"))
    assert transfer["kv_connector_extra_config"]["pd_staging"] == {
        "buffer_mib": 8,
        "reader_splits": 2,
        "release_blocks": True,
    }
    settings = StagingSettings.from_extra_config(transfer["kv_connector_extra_config"])
    assert settings is not None and settings.release_blocks and settings.reader_splits == 2
