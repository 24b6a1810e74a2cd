"""Transport selection: the RDMA port nearest a worker's GPUs, GPUDirect settings, TCP fallback."""

from __future__ import annotations

import pytest

from pd_runtime.placement import MachineDescription, select_transport
from pd_runtime.worker.command import WorkerSpec, build_worker_command
from tests.unit.placement.helpers import machine

H200 = machine("h200x8-2numa-4ib")


@pytest.mark.parametrize(
    ("gpus", "devices"),
    [
        ((0,), "mlx5_0:1"),  # same PCIe switch
        ((3,), "mlx5_1:1"),
        ((5,), "mlx5_2:1"),
        ((6, 7), "mlx5_3:1"),
        ((0, 1, 2, 3), "mlx5_0:1,mlx5_1:1"),  # a TP group uses the NICs of each of its switches
        ((4, 5, 6, 7), "mlx5_2:1,mlx5_3:1"),
    ],
)
def test_each_gpu_gets_the_nic_behind_its_switch(gpus: tuple[int, ...], devices: str) -> None:
    choice = select_transport(H200, gpus)
    assert choice.kind == "rdma" and choice.gpu_direct and choice.gdr_copy
    assert choice.net_devices == devices


def _variant(**changes: object) -> MachineDescription:
    return H200.model_copy(update=changes)


def test_same_numa_wins_when_pci_paths_are_unknown() -> None:
    rdma = [p.model_copy(update={"pci_path": None}) for p in H200.rdma or []]
    gpus = [g.model_copy(update={"pci_path": None}) for g in H200.gpus]
    choice = select_transport(_variant(rdma=rdma, gpus=gpus), (5,))
    # Both NICs of NUMA node 1 tie: both are offered, none from node 0.
    assert choice.net_devices == "mlx5_2:1,mlx5_3:1"


def test_inactive_ports_are_never_chosen() -> None:
    rdma = [
        p.model_copy(update={"state": "DOWN"}) if p.name == "mlx5_0" else p for p in H200.rdma or []
    ]
    choice = select_transport(_variant(rdma=rdma), (0,))
    assert choice.net_devices == "mlx5_1:1"  # next nearest: same NUMA node, other switch


def test_a_nic_only_on_the_other_socket_is_used_and_said() -> None:
    rdma = [p for p in H200.rdma or [] if p.numa_node == 1]
    choice = select_transport(_variant(rdma=rdma), (0, 1))
    assert choice.kind == "rdma" and "no port on the NUMA node of GPU(s) 0,1" in choice.reason


def test_roce_is_rdma_too() -> None:
    rdma = [p.model_copy(update={"link_layer": "Ethernet"}) for p in H200.rdma or []]
    choice = select_transport(_variant(rdma=rdma), (2,))
    assert choice.kind == "rdma" and choice.reason.startswith("RoCE")


def test_no_active_port_is_tcp_and_undescribed_rdma_is_detected_at_start() -> None:
    assert select_transport(machine("l40sx2"), (0,)).kind == "tcp"
    assert select_transport(_variant(rdma=None), (0,)).rdma_ports is None
    assert select_transport(_variant(rdma=[]), (0,)).rdma_ports == ()


def test_cpu_workers_use_every_active_port() -> None:
    choice = select_transport(H200, ())
    assert choice.net_devices == "mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1" and not choice.gpu_direct


def _env(
    platform: str, gpus: tuple[int, ...], m: MachineDescription, **spec: object
) -> dict[str, str]:
    choice = select_transport(m, gpus)
    worker = WorkerSpec(
        role="decode",
        model="m",
        port=8200,
        platform=platform,  # type: ignore[arg-type]
        rdma_ports=choice.rdma_ports,
        gdr_copy=choice.gdr_copy,
        **spec,  # type: ignore[arg-type]
    )
    return build_worker_command(worker, environ={})[1]


def test_gpu_direct_ucx_settings() -> None:
    env = _env("cuda", (4, 5), H200)
    assert env["UCX_TLS"] == "rc,ud,sm,self,cuda_copy,cuda_ipc,gdr_copy"
    assert env["UCX_NET_DEVICES"] == "mlx5_2:1"
    no_gdr = _env("cuda", (4, 5), _variant(gdrcopy=False))
    assert no_gdr["UCX_TLS"] == "rc,ud,sm,self,cuda_copy,cuda_ipc"


def test_tcp_fallback_ucx_settings() -> None:
    env = _env("cuda", (0,), machine("l40sx2"))
    assert env["UCX_TLS"] == "tcp,sm,self,cuda_copy,cuda_ipc" and "UCX_NET_DEVICES" not in env
    assert _env("cpu", (), machine("cpu-only"))["UCX_TLS"] == "tcp,sm,self"


def test_an_explicit_transport_still_wins() -> None:
    env = _env("cuda", (0,), H200, ucx_tls="tcp,cuda_copy", ucx_net_devices="eth0")
    assert (env["UCX_TLS"], env["UCX_NET_DEVICES"]) == ("tcp,cuda_copy", "eth0")
    choice = select_transport(H200, (0,))
    worker = WorkerSpec(
        role="decode", model="m", port=1, platform="cuda", rdma_ports=choice.rdma_ports
    )
    operator = {"UCX_TLS": "rc_x,cuda_copy", "UCX_NET_DEVICES": "mlx5_9:1"}
    env = build_worker_command(worker, environ=operator)[1]
    assert (env["UCX_TLS"], env["UCX_NET_DEVICES"]) == ("rc_x,cuda_copy", "mlx5_9:1")
