"""Pick the RDMA ports a worker's KV transfers use: the ones nearest its GPUs.

For every GPU of the worker, the active ports are ranked by::

    (same NUMA node as the GPU,  PCI path components shared with the GPU)     higher is nearer

so a NIC behind the GPU's own PCIe switch beats one on the same socket, which beats one across the
inter-socket link. The best port of each GPU is kept (all tied ones when the topology cannot tell
them apart), in GPU order; UCX then drives them as rails. What comes out:

    RDMA not described   -> "detect": the worker reads sysfs when it starts (the CPU demo's way)
    no active RDMA port  -> "tcp":    UCX_TLS=tcp,sm,self[,cuda_copy,cuda_ipc]
    GPU worker + RDMA    -> "rdma":   UCX_TLS=rc,ud,sm,self,cuda_copy,cuda_ipc[,gdr_copy]
                                      UCX_NET_DEVICES=<nearest ports>   (GPUDirect RDMA: UCX registers
                                      GPU memory with the NIC; gdr_copy only with /dev/gdrdrv)
    CPU worker + RDMA    -> "rdma":   every active port (unchanged from the CPU demo)

The UCX variables themselves are written by :func:`pd_runtime.worker.transport.ucx_environment`,
so a transport set in the config or the environment still wins over this choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pd_runtime.placement.machine import MachineDescription, RdmaDeviceInfo, pci_affinity
from pd_runtime.worker.transport import RdmaPort

__all__ = ["TransportChoice", "select_transport"]

TransportKind = Literal["rdma", "tcp", "detect"]


@dataclass(frozen=True)
class TransportChoice:
    kind: TransportKind
    ports: tuple[RdmaDeviceInfo, ...] = ()
    gpu_direct: bool = False  # GPU memory goes NIC <-> GPU without a host copy
    gdr_copy: bool = False
    reason: str = ""

    @property
    def rdma_ports(self) -> tuple[RdmaPort, ...] | None:
        """What :class:`~pd_runtime.worker.command.WorkerSpec` takes; None: detect at start."""
        if self.kind == "detect":
            return None
        return tuple(RdmaPort(p.name, p.port, p.link_layer, p.active) for p in self.ports)

    @property
    def net_devices(self) -> str:
        return ",".join(p.ucx_name for p in self.ports)


def _nearness(machine: MachineDescription, gpu: int, port: RdmaDeviceInfo) -> tuple[int, int]:
    info = machine.gpu(gpu)
    same_numa = int(info.numa_node is not None and info.numa_node == port.numa_node)
    return same_numa, pci_affinity(info.pci_path, port.pci_path)


def select_transport(machine: MachineDescription, gpus: tuple[int, ...]) -> TransportChoice:
    """The transport for a worker on ``gpus`` (empty: a CPU worker) of ``machine``."""
    if machine.rdma is None:
        return TransportChoice(
            "detect", reason="RDMA not described: detected when the worker starts"
        )
    active = [p for p in machine.rdma if p.active]
    if not active:
        return TransportChoice("tcp", reason="no active InfiniBand/RoCE port: TCP")
    if not gpus:
        return TransportChoice("rdma", tuple(active), reason="CPU worker: every active RDMA port")
    chosen: list[RdmaDeviceInfo] = []
    remote: list[str] = []
    for gpu in gpus:
        best = max(_nearness(machine, gpu, p) for p in active)
        for port in active:
            if _nearness(machine, gpu, port) == best and port not in chosen:
                chosen.append(port)
        if best[0] == 0 and machine.gpu(gpu).numa_node is not None:
            remote.append(str(gpu))
    kinds = "/".join(sorted({p.kind for p in chosen}))
    reason = f"{kinds} GPUDirect via the port(s) nearest GPU(s) {','.join(map(str, gpus))}"
    if remote:
        reason += f"; no port on the NUMA node of GPU(s) {','.join(remote)}"
    return TransportChoice(
        "rdma", tuple(chosen), gpu_direct=True, gdr_copy=machine.gdrcopy, reason=reason
    )
