"""Describe the machine we are on: GPUs from NVML, RDMA ports, NUMA nodes and PCI paths from sysfs.

    NVML (pynvml, from the nvidia-ml-py package)      sysfs
    ─────────────────────────────────────────────     ─────────────────────────────────────────────
    index, name, memory, PCI bus id                   /sys/bus/pci/devices/<bdf>       -> pci_path
    NVLink peers: P2P status over NVLink per pair     /sys/bus/pci/devices/<bdf>/numa_node
      (covers NVSwitch, where link-level remote       /sys/class/infiniband/<dev>/ports/<n>/{state,link_layer}
       info would only name the switch)               /sys/class/infiniband/<dev>/device  -> pci_path, numa_node
                                                      /sys/devices/system/node/node<N>/cpulist
                                                      /dev/gdrdrv                          -> gdrcopy

No NVML (no driver, or nvidia-ml-py not installed) means no GPUs: the machine is CPU only, which is
what our development machines are. Both sources are parameters so tests feed a fake NVML object and a
fake sysfs tree.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from pd_runtime.placement.machine import (
    GpuInfo,
    MachineDescription,
    NumaNodeInfo,
    RdmaDeviceInfo,
    parse_cpulist,
)

__all__ = ["discover_machine", "normalize_bus_id"]

logger = logging.getLogger(__name__)

_GIB = 1024**3


def normalize_bus_id(bus_id: str | bytes) -> str:
    """NVML's ``00000000:19:00.0`` as sysfs spells it: ``0000:19:00.0``."""
    text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
    domain, _, rest = text.strip().lower().partition(":")
    return f"{domain[-4:].rjust(4, '0')}:{rest}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _numa(value: str | None) -> int | None:
    try:
        node = int(value) if value is not None else -1
    except ValueError:
        return None
    return node if node >= 0 else None  # the kernel writes -1 when it does not know


def _pci_path(device_link: Path, sysfs: Path) -> str | None:
    """``pci0000:15/0000:15:01.0/.../0000:19:00.0`` from a sysfs device symlink."""
    try:
        resolved = device_link.resolve(strict=True)
        return str(resolved.relative_to((sysfs / "devices").resolve()))
    except (OSError, ValueError):
        return None


def _numa_nodes(sysfs: Path, allowed: set[int]) -> list[NumaNodeInfo]:
    nodes: list[NumaNodeInfo] = []
    for node_dir in sorted((sysfs / "devices/system/node").glob("node[0-9]*")):
        cpulist = _read(node_dir / "cpulist")
        if cpulist is None:
            continue
        cpus = [c for c in parse_cpulist(cpulist) if c in allowed]
        if cpus:
            nodes.append(NumaNodeInfo(id=int(node_dir.name[4:]), cpus=cpus))
    if not nodes and allowed:  # no NUMA information (some containers): one node with every core
        nodes.append(NumaNodeInfo(id=0, cpus=sorted(allowed)))
    return nodes


def _rdma_ports(sysfs: Path) -> list[RdmaDeviceInfo]:
    ports: list[RdmaDeviceInfo] = []
    root = sysfs / "class/infiniband"
    if not root.is_dir():
        return ports
    for device in sorted(root.iterdir()):
        numa = _numa(_read(device / "device/numa_node"))
        pci_path = _pci_path(device / "device", sysfs)
        bus_id = pci_path.rsplit("/", 1)[-1] if pci_path else None
        for port_dir in sorted((device / "ports").glob("*")):
            state, link = _read(port_dir / "state"), _read(port_dir / "link_layer")
            if (
                state is None
                or link not in ("InfiniBand", "Ethernet")
                or not port_dir.name.isdigit()
            ):
                continue
            ports.append(
                RdmaDeviceInfo(
                    name=device.name,
                    port=int(port_dir.name),
                    state=state.split(":")[-1].strip(),  # "4: ACTIVE" -> "ACTIVE"
                    link_layer=link,  # type: ignore[arg-type]  # checked just above
                    numa_node=numa,
                    pci_bus_id=bus_id,
                    pci_path=pci_path,
                )
            )
    return ports


def _import_nvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _nvlink_peers(nvml: Any, i: int, handles: list[Any]) -> list[int] | None:
    """GPUs GPU ``i`` reaches over NVLink (directly or via NVSwitch); None when NVML can't say."""
    peers: list[int] = []
    for j, other in enumerate(handles):
        if i == j:
            continue
        try:
            status = nvml.nvmlDeviceGetP2PStatus(handles[i], other, nvml.NVML_P2P_CAPS_INDEX_NVLINK)
        except Exception:  # older drivers: NVLink reachability unknown
            return None
        if status == nvml.NVML_P2P_STATUS_OK:
            peers.append(j)
    return peers


def _gpus(nvml: Any, sysfs: Path) -> list[GpuInfo]:
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVML raises its own error types when no driver is loaded
        logger.debug("NVML unavailable: %s", exc)
        return []
    try:
        count = int(nvml.nvmlDeviceGetCount())
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus: list[GpuInfo] = []
        for i, handle in enumerate(handles):
            name = nvml.nvmlDeviceGetName(handle)
            bus_id = normalize_bus_id(nvml.nvmlDeviceGetPciInfo(handle).busId)
            pci_dev = sysfs / "bus/pci/devices" / bus_id
            numa = _numa(_read(pci_dev / "numa_node"))
            peers = _nvlink_peers(nvml, i, handles)
            gpus.append(
                GpuInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_gib=round(nvml.nvmlDeviceGetMemoryInfo(handle).total / _GIB, 1),
                    numa_node=numa,
                    pci_bus_id=bus_id,
                    pci_path=_pci_path(pci_dev, sysfs),
                    nvlink_peers=peers,
                )
            )
        return gpus
    finally:
        nvml.nvmlShutdown()


def discover_machine(
    *,
    nvml: Any | None = None,
    sysfs: Path = Path("/sys"),
    dev: Path = Path("/dev"),
    allowed_cpus: set[int] | None = None,
) -> MachineDescription:
    """This machine as a :class:`MachineDescription` (``nvml``: the pynvml module or a stand-in)."""
    nvml = _import_nvml() if nvml is None else nvml
    allowed = set(os.sched_getaffinity(0)) if allowed_cpus is None else allowed_cpus
    return MachineDescription(
        hostname=socket.gethostname(),
        gpus=_gpus(nvml, sysfs) if nvml is not None else [],
        rdma=_rdma_ports(sysfs),
        numa_nodes=_numa_nodes(sysfs, allowed),
        gdrcopy=(dev / "gdrdrv").exists(),
    )
