"""A typed description of one machine: GPUs, RDMA ports and NUMA nodes.

It is what the placer works on, whether it was discovered here (:mod:`.discover`: NVML + sysfs) or
loaded from a YAML/JSON file written on (or for) another machine, so a deployment can be planned
for a GPU node from a laptop::

    hostname: h200-node
    gdrcopy: true                       # /dev/gdrdrv present: UCX may use gdr_copy
    numa_nodes: [{id: 0, cpus: "0-55"}, {id: 1, cpus: "56-111"}]
    gpus:
      - {index: 0, name: NVIDIA H200, memory_gib: 141, numa_node: 0,
         pci_bus_id: "0000:19:00.0", pci_path: "pci0000:15/0000:15:01.0/0000:16:00.0/0000:19:00.0",
         nvlink_peers: [1, 2, 3, 4, 5, 6, 7]}
    rdma:
      - {name: mlx5_0, port: 1, state: ACTIVE, link_layer: InfiniBand, numa_node: 0,
         pci_path: "pci0000:15/0000:15:01.0/0000:16:00.0/0000:18:00.0"}

``pci_path`` is the chain of PCI bridges from the root complex (the resolved sysfs path under
``/sys/devices``); two devices behind the same PCIe switch share a longer prefix, which is how the
placer finds the NIC nearest a GPU. ``nvlink_peers: null`` means "not known"; ``[]`` means "none".
``rdma: null`` means "not described": workers then detect RDMA ports from sysfs when they start
(the CPU demo's behaviour).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pd_runtime.platform import Platform

__all__ = [
    "GpuInfo",
    "MachineDescription",
    "NumaNodeInfo",
    "RdmaDeviceInfo",
    "format_cpulist",
    "load_machine",
    "parse_cpulist",
    "pci_affinity",
]

_STRICT = ConfigDict(extra="forbid", frozen=True)


def parse_cpulist(text: str) -> list[int]:
    """The kernel's cpulist format (``0-3,8,10-11``) as a sorted list."""
    cpus: set[int] = set()
    for chunk in text.replace(" ", "").split(","):
        if not chunk:
            continue
        low, _, high = chunk.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return sorted(cpus)


def format_cpulist(cpus: tuple[int, ...] | list[int]) -> str:
    """Inverse of :func:`parse_cpulist`: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    ordered = sorted(set(cpus))
    runs: list[str] = []
    start = prev = None
    for cpu in [*ordered, None]:
        if cpu is not None and prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None and prev is not None:
            runs.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    return ",".join(runs)


def pci_affinity(a: str | None, b: str | None) -> int:
    """How many PCI path components two devices share (0 when either path is unknown)."""
    if not a or not b:
        return 0
    shared = 0
    for x, y in zip(a.split("/"), b.split("/"), strict=False):
        if x != y:
            break
        shared += 1
    return shared


class GpuInfo(BaseModel):
    model_config = _STRICT

    index: int = Field(ge=0, description="NVML index (what CUDA_VISIBLE_DEVICES names)")
    name: str = "unknown GPU"
    memory_gib: float = Field(default=0.0, ge=0, description="total memory; 0: unknown")
    numa_node: int | None = None
    pci_bus_id: str | None = None
    pci_path: str | None = None
    nvlink_peers: list[int] | None = Field(default=None, description="None: unknown")


class RdmaDeviceInfo(BaseModel):
    """One port of an InfiniBand or RoCE adapter (``/sys/class/infiniband/<name>/ports/<port>``)."""

    model_config = _STRICT

    name: str
    port: int = Field(default=1, ge=1)
    state: str = "ACTIVE"
    link_layer: Literal["InfiniBand", "Ethernet"] = "InfiniBand"
    numa_node: int | None = None
    pci_bus_id: str | None = None
    pci_path: str | None = None

    @property
    def active(self) -> bool:
        return self.state.upper().endswith("ACTIVE")

    @property
    def ucx_name(self) -> str:
        return f"{self.name}:{self.port}"

    @property
    def kind(self) -> str:
        return "IB" if self.link_layer == "InfiniBand" else "RoCE"


class NumaNodeInfo(BaseModel):
    model_config = _STRICT

    id: int = Field(ge=0)
    cpus: list[int]

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpulist(cls, value: Any) -> Any:
        return parse_cpulist(value) if isinstance(value, str) else value


class MachineDescription(BaseModel):
    model_config = _STRICT

    hostname: str = ""
    gpus: list[GpuInfo] = Field(default_factory=list)
    rdma: list[RdmaDeviceInfo] | None = None
    numa_nodes: list[NumaNodeInfo] = Field(default_factory=list)
    gdrcopy: bool = Field(default=False, description="GDRCopy driver loaded (/dev/gdrdrv)")

    @model_validator(mode="after")
    def _check(self) -> MachineDescription:
        indexes = [g.index for g in self.gpus]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"gpus: duplicate index in {indexes}")
        for gpu in self.gpus:
            unknown = set(gpu.nvlink_peers or ()) - set(indexes) - {gpu.index}
            if unknown:
                raise ValueError(f"gpus.{gpu.index}.nvlink_peers: no GPU {sorted(unknown)}")
        nodes = [n.id for n in self.numa_nodes]
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"numa_nodes: duplicate id in {nodes}")
        return self

    # -- derived views -------------------------------------------------------------------------

    @property
    def cpu_cores(self) -> tuple[int, ...]:
        return tuple(sorted({c for n in self.numa_nodes for c in n.cpus}))

    def cores_of(self, numa_node: int | None) -> tuple[int, ...]:
        """The cores of one NUMA node; every core when the node is unknown or not described."""
        for node in self.numa_nodes:
            if node.id == numa_node:
                return tuple(node.cpus)
        return self.cpu_cores

    def gpu(self, index: int) -> GpuInfo:
        for gpu in self.gpus:
            if gpu.index == index:
                return gpu
        raise KeyError(index)

    @property
    def has_nvlink(self) -> bool:
        return any(g.nvlink_peers for g in self.gpus)

    def nvlinked(self, a: int, b: int) -> bool | None:
        """Whether two GPUs talk over NVLink (directly or through NVSwitch); None: unknown."""
        peers = self.gpu(a).nvlink_peers
        return None if peers is None else b in peers

    def summary(self) -> str:
        parts = [self.hostname or "machine"]
        if self.gpus:
            names = sorted({g.name for g in self.gpus})
            parts.append(f"{len(self.gpus)} x {'/'.join(names)}")
        else:
            parts.append("no GPU")
        parts.append(f"{len(self.numa_nodes)} NUMA node(s), {len(self.cpu_cores)} cores")
        if self.rdma is None:
            parts.append("RDMA not described")
        else:
            active = [p for p in self.rdma if p.active]
            kinds = sorted({p.kind for p in active})
            parts.append(f"{len(active)} active RDMA port(s) {'/'.join(kinds)}".rstrip())
        if self.gdrcopy:
            parts.append("gdrcopy")
        return ", ".join(parts)

    def to_platform(self) -> Platform:
        """The coarse view the rest of pd-runtime uses (cuda when there are GPUs)."""
        return Platform("cuda" if self.gpus else "cpu", len(self.gpus), self.cpu_cores)

    @classmethod
    def from_platform(cls, platform: Platform) -> MachineDescription:
        """What is known from a bare :class:`Platform`: GPU count and cores, no topology."""
        return cls(
            gpus=[GpuInfo(index=i) for i in range(platform.gpu_count)],
            numa_nodes=[NumaNodeInfo(id=0, cpus=list(platform.cpu_cores))]
            if platform.cpu_cores
            else [],
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def load_machine(path: str | Path) -> MachineDescription:
    """A machine description from YAML or JSON (JSON is YAML); errors name the field
    (``gpus.3.numa_node``)."""
    from pd_runtime.config.loader import load_config

    return load_config(MachineDescription, path)
