"""Put prefill and decode workers on a machine: GPU groups, CPU cores and the KV transport.

GPU machine, workers in order (prefill first, then decode), each taking ``tp`` free GPUs::

    tier 1  tp free GPUs of one NUMA node, lowest indices first, all NVLink-connected
            (NVLink is only required when the machine has NVLink at all: 2 x L40S talk over PCIe)
    tier 2  tp free GPUs across NUMA nodes, only when every pair is known to be NVLink-connected
            (e.g. TP=8 on an HGX board); noted in the placement
    else    ConfigError naming the worker, what is free and what to change

    8 x H200, 2 NUMA nodes, prefill TP=4 + decode TP=4:
      NUMA 0: GPU 0 1 2 3  mlx5_0 mlx5_1   -> prefill-0  GPUs 0-3  cores of node 0  mlx5_0:1,mlx5_1:1
      NUMA 1: GPU 4 5 6 7  mlx5_2 mlx5_3   -> decode-0   GPUs 4-7  cores of node 1  mlx5_2:1,mlx5_3:1

Then each NUMA node's cores are split evenly among the GPU workers placed on it (the launcher pins
the process tree there), and each worker gets the RDMA ports nearest its GPUs
(:func:`~pd_runtime.placement.transport.select_transport`).

CPU machine (no GPU, or ``transport.platform: cpu``): worker k is pinned to core ``cores[k % n]``,
exactly the CPU demo's placement.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

from pd_runtime.errors import ConfigError
from pd_runtime.placement.machine import MachineDescription, format_cpulist
from pd_runtime.placement.transport import TransportChoice, select_transport

__all__ = ["WorkerPlacement", "WorkerRequest", "place_workers"]

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class WorkerRequest:
    name: str  # e.g. "prefill-0"
    role: str
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class WorkerPlacement:
    name: str
    role: str
    device: Device
    transport: TransportChoice
    gpus: tuple[int, ...] = ()
    numa_node: int | None = None
    cpu_cores: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def gpu_ids(self) -> str | None:
        """CUDA_VISIBLE_DEVICES."""
        return ",".join(map(str, self.gpus)) if self.gpus else None

    @property
    def cores(self) -> str:
        return format_cpulist(self.cpu_cores)

    @property
    def where(self) -> str:
        if self.gpus:
            numa = "" if self.numa_node is None else f", NUMA {self.numa_node}"
            return f"GPUs {self.gpu_ids}{numa}"
        return f"cpu core {self.cores}"


def _clique(machine: MachineDescription, gpus: tuple[int, ...]) -> bool | None:
    """True/False when NVLink reachability of every pair is known, None when some is not."""
    known = True
    for a, b in combinations(gpus, 2):
        linked = machine.nvlinked(a, b)
        if linked is False:
            return False
        known = known and linked is not None
    return True if known else None


def _windows(free: list[int], tp: int) -> Iterator[tuple[int, ...]]:
    for start in range(len(free) - tp + 1):
        yield tuple(free[start : start + tp])


def _pick_group(
    machine: MachineDescription, free: list[int], tp: int
) -> tuple[tuple[int, ...], str] | None:
    need_nvlink = tp > 1 and machine.has_nvlink
    by_node: dict[int | None, list[int]] = {}
    for index in free:
        by_node.setdefault(machine.gpu(index).numa_node, []).append(index)
    for node in sorted(by_node, key=lambda n: (n is None, n)):
        for group in _windows(by_node[node], tp):
            if not need_nvlink or _clique(machine, group):
                return group, ""
    if tp > 1 and machine.has_nvlink and len(by_node) > 1:
        for group in _windows(free, tp):
            if _clique(machine, group):
                nodes = sorted({str(machine.gpu(g).numa_node) for g in group})
                return group, f"TP group spans NUMA nodes {','.join(nodes)} (NVLink-connected)"
    return None


def _describe_free(machine: MachineDescription, free: list[int]) -> str:
    if not free:
        return "none"
    return ", ".join(f"{g} (NUMA {machine.gpu(g).numa_node})" for g in free)


def _check_memory(
    machine: MachineDescription,
    request: WorkerRequest,
    group: tuple[int, ...],
    weights_gib: float | None,
    utilization: float,
) -> None:
    if not weights_gib:
        return
    for gpu in group:
        info = machine.gpu(gpu)
        usable = info.memory_gib * utilization
        share = weights_gib / len(group)
        if info.memory_gib and share >= usable:
            raise ConfigError(
                f"model.weights_gib: {request.name} holds {share:g} GiB of weights per GPU "
                f"(TP={len(group)}), more than GPU {gpu} ({info.name}, {info.memory_gib:g} GiB x "
                f"gpu_memory_utilization {utilization:g} = {usable:.1f} GiB) can; raise "
                f"tensor_parallel_size or use bigger GPUs"
            )


def _place_on_gpus(
    requests: list[WorkerRequest],
    machine: MachineDescription,
    weights_gib: float | None,
    utilization: float,
) -> list[WorkerPlacement]:
    need = sum(r.tensor_parallel_size for r in requests)
    if need > len(machine.gpus):
        counts = " + ".join(f"{r.name} x TP {r.tensor_parallel_size}" for r in requests)
        raise ConfigError(
            f"prefill.replicas + decode.replicas: {counts} need {need} GPUs, "
            f"this machine has {len(machine.gpus)}"
        )
    free = sorted(g.index for g in machine.gpus)
    groups: list[tuple[WorkerRequest, tuple[int, ...], str]] = []
    for request in requests:
        picked = _pick_group(machine, free, request.tensor_parallel_size)
        if picked is None:
            placed = "; ".join(f"{r.name} on GPUs {','.join(map(str, g))}" for r, g, _ in groups)
            rule = "one NUMA node" + (", NVLink-connected" if machine.has_nvlink else "")
            raise ConfigError(
                f"tensor_parallel_size: no group of {request.tensor_parallel_size} neighbouring "
                f"GPUs ({rule}) is left for {request.name}; placed: {placed or 'nothing'}; free "
                f"GPUs: {_describe_free(machine, free)}. Lower tensor_parallel_size or replicas."
            )
        group, note = picked
        _check_memory(machine, request, group, weights_gib, utilization)
        free = [g for g in free if g not in group]
        groups.append((request, group, note))

    # Split each NUMA node's cores among the workers whose first GPU sits there.
    on_node: dict[int | None, list[str]] = {}
    for request, group, _ in groups:
        on_node.setdefault(machine.gpu(group[0]).numa_node, []).append(request.name)
    cores: dict[str, tuple[int, ...]] = {}
    for node, names in on_node.items():
        pool = machine.cores_of(node) or machine.cpu_cores
        share = max(1, len(pool) // len(names))
        for k, name in enumerate(names):
            chunk = pool[k * share : (k + 1) * share] if len(pool) >= len(names) else pool
            cores[name] = tuple(chunk)

    placements: list[WorkerPlacement] = []
    for request, group, note in groups:
        node = machine.gpu(group[0]).numa_node
        placements.append(
            WorkerPlacement(
                name=request.name,
                role=request.role,
                device="cuda",
                transport=select_transport(machine, group),
                gpus=group,
                numa_node=node,
                cpu_cores=cores[request.name],
                notes=(note,) if note else (),
            )
        )
    return placements


def _place_on_cpu(
    requests: list[WorkerRequest], machine: MachineDescription, cores: tuple[int, ...]
) -> list[WorkerPlacement]:
    if not cores:
        raise ConfigError("this machine lists no CPU cores to place workers on")
    transport = select_transport(machine, ())
    return [
        WorkerPlacement(
            name=r.name,
            role=r.role,
            device="cpu",
            transport=transport,
            cpu_cores=(cores[k % len(cores)],),
        )
        for k, r in enumerate(requests)
    ]


def place_workers(
    requests: list[WorkerRequest],
    machine: MachineDescription,
    *,
    device: Device,
    cpu_cores: tuple[int, ...] | None = None,
    weights_gib: float | None = None,
    gpu_memory_utilization: float = 0.9,
) -> list[WorkerPlacement]:
    """Place ``requests`` in order; raises :class:`ConfigError` when they do not fit.

    ``cpu_cores`` (CPU placement only) overrides the machine's cores: the launcher passes the
    cores this process may run on, as the CPU demo always did.
    """
    if device == "cpu":
        return _place_on_cpu(requests, machine, cpu_cores or machine.cpu_cores)
    if not machine.gpus:
        raise ConfigError(
            "transport.platform: cuda was asked for, but the machine has no GPU "
            "(no NVML device; use platform auto or cpu)"
        )
    return _place_on_gpus(requests, machine, weights_gib, gpu_memory_utilization)
