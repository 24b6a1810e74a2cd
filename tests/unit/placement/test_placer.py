"""GPU placement on described machines, CPU placement as before, and refusals that say why."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_runtime.errors import ConfigError
from pd_runtime.launcher.prepare import prepare_deployment
from pd_runtime.launcher.topology import DeploymentPlan, plan_deployment
from pd_runtime.placement import MachineDescription, WorkerRequest, place_workers
from pd_runtime.platform import Platform
from tests.unit.placement.helpers import flag, machine, preset, preset_with

H200 = machine("h200x8-2numa-4ib")


def workers(plan: DeploymentPlan) -> dict[str, object]:
    return {p.name: p for p in plan.by_kind("worker")}


def test_h200_preset_puts_each_tp4_group_on_its_own_numa_node(tmp_path: Path) -> None:
    plan = prepare_deployment(
        preset("h200-llama3-70b"), tmp_path, machine=H200, generate_model=False
    )
    prefill, decode = plan.by_kind("worker")
    assert (prefill.gpus, decode.gpus) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert prefill.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert decode.env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert (
        plan.placements["prefill-0"].numa_node == 0 and plan.placements["decode-0"].numa_node == 1
    )
    assert prefill.cpu_affinity == H200.cores_of(0) and decode.cpu_affinity == H200.cores_of(1)
    assert prefill.env["UCX_NET_DEVICES"] == "mlx5_0:1,mlx5_1:1"
    assert decode.env["UCX_NET_DEVICES"] == "mlx5_2:1,mlx5_3:1"
    assert "gdr_copy" in decode.env["UCX_TLS"] and "rc" in decode.env["UCX_TLS"].split(",")
    assert flag(prefill.argv, "--tensor-parallel-size") == "4"
    assert flag(decode.argv, "--gpu-memory-utilization") == "0.9"
    assert (
        prefill.env["VLLM_NIXL_SIDE_CHANNEL_PORT"],
        decode.env["VLLM_NIXL_SIDE_CHANNEL_PORT"],
    ) == (
        "5600",
        "5610",
    )
    assert '"kv_buffer_device": "cuda"' in flag(decode.argv, "--kv-transfer-config")
    assert all("VLLM_CPU_OMP_THREADS_BIND" not in p.env for p in (prefill, decode))


def test_four_tp2_workers_share_numa_nodes_and_split_their_cores(tmp_path: Path) -> None:
    config = preset_with(
        "h200-llama3-70b",
        prefill__replicas=2,
        prefill__tensor_parallel_size=2,
        decode__replicas=2,
        decode__tensor_parallel_size=2,
    )
    plan = prepare_deployment(config, tmp_path, machine=H200, generate_model=False)
    got = {p.name: (p.gpus, p.env["UCX_NET_DEVICES"]) for p in plan.by_kind("worker")}
    assert got == {
        "prefill-0": ((0, 1), "mlx5_0:1"),
        "prefill-1": ((2, 3), "mlx5_1:1"),
        "decode-0": ((4, 5), "mlx5_2:1"),
        "decode-1": ((6, 7), "mlx5_3:1"),
    }
    cores = {p.name: set(p.cpu_affinity) for p in plan.by_kind("worker")}
    assert cores["prefill-0"].isdisjoint(cores["prefill-1"])
    assert cores["prefill-0"] | cores["prefill-1"] == set(H200.cores_of(0))
    assert len(cores["decode-0"]) == len(cores["decode-1"]) == 56


def test_a_tp8_worker_may_span_sockets_over_nvlink() -> None:
    [placed] = place_workers([WorkerRequest("decode-0", "decode", 8)], H200, device="cuda")
    assert placed.gpus == tuple(range(8))
    assert placed.notes == ("TP group spans NUMA nodes 0,1 (NVLink-connected)",)


def test_fragmented_gpus_fill_numa_nodes_before_spanning() -> None:
    requests = [WorkerRequest(f"w{i}", "prefill", 3) for i in range(2)]
    a, b = place_workers(requests, H200, device="cuda")
    assert (a.gpus, b.gpus) == ((0, 1, 2), (4, 5, 6))


def test_l40s_preset_one_gpu_each_tcp(tmp_path: Path) -> None:
    plan = prepare_deployment(
        preset("l40s-qwen3-0.6b"), tmp_path, machine=machine("l40sx2"), generate_model=False
    )
    prefill, decode = plan.by_kind("worker")
    assert (prefill.env["CUDA_VISIBLE_DEVICES"], decode.env["CUDA_VISIBLE_DEVICES"]) == ("0", "1")
    assert prefill.cpu_affinity == tuple(range(32)) and decode.cpu_affinity == tuple(range(32, 64))
    assert decode.env["UCX_TLS"] == "tcp,sm,self,cuda_copy,cuda_ipc"
    assert "UCX_NET_DEVICES" not in decode.env
    assert plan.placements["decode-0"].transport.kind == "tcp"
    assert flag(decode.argv, "--block-size") == "64"
    assert plan.coordinator.scheduler.params["block_size"] == 64  # the scheduler keys like vLLM


def test_cpu_placement_is_unchanged(tmp_path: Path) -> None:
    """With no GPU the described-machine path gives exactly the CPU demo's plan."""
    config = preset("local-cpu")
    described = prepare_deployment(
        config, tmp_path, machine=machine("cpu-only"), generate_model=False
    )
    bare = plan_deployment(config, tmp_path, Platform("cpu", 0, (0, 1)))
    assert [(p.name, p.argv, p.placement) for p in described.parts] == [
        (p.name, p.argv, p.placement) for p in bare.parts
    ]
    assert [p.env for p in described.parts] == [p.env for p in bare.parts]
    binds = [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in described.by_kind("worker")]
    assert binds == ["0", "1", "0"]
    assert all(p.cpu_affinity == () and p.gpus == () for p in described.parts)


def test_cpu_platform_forced_on_a_gpu_machine_places_on_cores(tmp_path: Path) -> None:
    config = preset_with("local-cpu", transport__platform="cpu")
    plan = prepare_deployment(config, tmp_path, machine=H200, generate_model=False)
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in plan.by_kind("worker")] == ["0", "1", "2"]
    assert all("CUDA_VISIBLE_DEVICES" not in p.env for p in plan.by_kind("worker"))


# -- refusals --------------------------------------------------------------------------------------


def test_too_few_gpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need 8 GPUs, this machine has 2"):
        prepare_deployment(
            preset("h200-llama3-70b"), tmp_path, machine=machine("l40sx2"), generate_model=False
        )


def test_a_cuda_preset_on_a_machine_without_gpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no GPU"):
        prepare_deployment(
            preset("h200-llama3-70b"), tmp_path, machine=machine("cpu-only"), generate_model=False
        )


def test_no_neighbouring_group_left(tmp_path: Path) -> None:
    # Two L40S on different sockets without NVLink: no TP=2 group exists.
    config = preset_with("l40s-qwen3-0.6b", prefill__replicas=0, decode__tensor_parallel_size=2)
    with pytest.raises(ConfigError) as info:
        prepare_deployment(config, tmp_path, machine=machine("l40sx2"), generate_model=False)
    message = str(info.value)
    assert "no group of 2 neighbouring GPUs (one NUMA node) is left for decode-0" in message
    assert "0 (NUMA 0), 1 (NUMA 1)" in message


def test_nvlink_is_required_within_a_group_on_an_nvlink_machine() -> None:
    # GPU 1 lost its NVLink: GPUs 0-3 are no clique, so a TP=4 group goes to NUMA node 1.
    gpus = [
        g.model_copy(update={"nvlink_peers": []})
        if g.index == 1
        else g.model_copy(update={"nvlink_peers": [p for p in g.nvlink_peers or [] if p != 1]})
        for g in H200.gpus
    ]
    broken = H200.model_copy(update={"gpus": gpus})
    [placed] = place_workers([WorkerRequest("decode-0", "decode", 4)], broken, device="cuda")
    assert placed.gpus == (4, 5, 6, 7)
    with pytest.raises(ConfigError, match="NVLink-connected"):
        place_workers(
            [WorkerRequest(f"w{i}", "decode", 4) for i in range(2)], broken, device="cuda"
        )


def test_weights_that_do_not_fit_the_gpus(tmp_path: Path) -> None:
    config = preset_with(
        "h200-llama3-70b", prefill__tensor_parallel_size=1, decode__tensor_parallel_size=1
    )
    with pytest.raises(ConfigError, match=r"model.weights_gib: prefill-0 holds 132 GiB"):
        prepare_deployment(config, tmp_path, machine=H200, generate_model=False)


def test_gpu_count_from_a_bare_platform_still_places_in_order(tmp_path: Path) -> None:
    bare = MachineDescription.from_platform(Platform("cuda", 4, (0, 1)))
    placed = place_workers(
        [WorkerRequest(f"w{i}", "decode", 2) for i in range(2)], bare, device="cuda"
    )
    assert [p.gpus for p in placed] == [(0, 1), (2, 3)]
    assert [p.transport.kind for p in placed] == ["detect", "detect"]
