"""Where each worker runs: the machine description, the placer and the KV transport choice.

    machine.py    MachineDescription (GPUs, RDMA ports, NUMA nodes), loadable from YAML/JSON
    discover.py   this machine, from NVML (nvidia-ml-py) and sysfs
    placer.py     workers -> GPU groups / CPU cores (place_workers)
    transport.py  the RDMA ports nearest a worker's GPUs, or TCP (select_transport)
    render.py     the plan as a table or JSON (``pd-runtime plan``)

Used by :func:`pd_runtime.launcher.topology.plan_deployment`; nothing here starts a process.
"""

from __future__ import annotations

from pd_runtime.placement.discover import discover_machine
from pd_runtime.placement.machine import (
    GpuInfo,
    MachineDescription,
    NumaNodeInfo,
    RdmaDeviceInfo,
    load_machine,
)
from pd_runtime.placement.placer import WorkerPlacement, WorkerRequest, place_workers
from pd_runtime.placement.transport import TransportChoice, select_transport

__all__ = [
    "GpuInfo",
    "MachineDescription",
    "NumaNodeInfo",
    "RdmaDeviceInfo",
    "TransportChoice",
    "WorkerPlacement",
    "WorkerRequest",
    "discover_machine",
    "load_machine",
    "place_workers",
    "select_transport",
]
