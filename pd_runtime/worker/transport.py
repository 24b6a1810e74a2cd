"""Choose the UCX transports NIXL uses to move KV blocks between workers.

    RDMA device (InfiniBand or RoCE) active?  ──yes──▶  UCX_TLS=rc,ud,sm,self[,cuda_copy,cuda_ipc[,gdr_copy]]
                 │                                      UCX_NET_DEVICES=<active ports>
                 no
                 ▼
    UCX_TLS=tcp,sm,self[,cuda_copy,cuda_ipc]   (TCP between hosts, shared memory on one host)

An explicit override (config or an already-set UCX_TLS in the environment) always wins, so operators
can pin a transport without editing code. Detection reads sysfs only: no libibverbs needed. The
placer (:mod:`pd_runtime.placement`) passes ``ports`` itself: the ports nearest the worker's GPUs
on the machine it plans for, and ``gdr_copy`` when that machine has the GDRCopy driver.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RdmaPort", "detect_rdma_ports", "ucx_environment"]

logger = logging.getLogger(__name__)

SYSFS_INFINIBAND = Path("/sys/class/infiniband")


@dataclass(frozen=True)
class RdmaPort:
    device: str
    port: int
    link_layer: str  # "InfiniBand" or "Ethernet" (RoCE)
    active: bool

    @property
    def ucx_name(self) -> str:
        return f"{self.device}:{self.port}"


def detect_rdma_ports(sysfs: Path = SYSFS_INFINIBAND) -> list[RdmaPort]:
    """Every RDMA port the kernel knows, active or not; empty when there is no RDMA stack."""
    ports: list[RdmaPort] = []
    if not sysfs.is_dir():
        return ports
    for device in sorted(sysfs.iterdir()):
        for port_dir in sorted((device / "ports").glob("*")):
            try:
                state = (port_dir / "state").read_text().strip()
                link_layer = (port_dir / "link_layer").read_text().strip()
                number = int(port_dir.name)
            except (OSError, ValueError):
                continue
            ports.append(RdmaPort(device.name, number, link_layer, state.endswith("ACTIVE")))
    return ports


def ucx_environment(
    platform: str,
    *,
    override_tls: str | None = None,
    override_net_devices: str | None = None,
    ports: list[RdmaPort] | None = None,
    environ: dict[str, str] | None = None,
    gdr_copy: bool = False,
) -> dict[str, str]:
    """UCX variables for one worker. ``platform`` is ``cpu`` or ``cuda``; ``ports``: the RDMA ports
    to use (default: every port sysfs lists); ``gdr_copy``: add GDRCopy on cuda over RDMA."""
    environ = dict(os.environ) if environ is None else environ
    gpu_tls = ",cuda_copy,cuda_ipc" if platform == "cuda" else ""
    env: dict[str, str] = {}
    active = [p for p in (detect_rdma_ports() if ports is None else ports) if p.active]
    if override_tls:
        env["UCX_TLS"] = override_tls
    elif "UCX_TLS" in environ:
        env["UCX_TLS"] = environ["UCX_TLS"]
    elif active:
        env["UCX_TLS"] = "rc,ud,sm,self" + gpu_tls + (",gdr_copy" if gdr_copy and gpu_tls else "")
    else:
        env["UCX_TLS"] = "tcp,sm,self" + gpu_tls
    if override_net_devices:
        env["UCX_NET_DEVICES"] = override_net_devices
    elif "UCX_NET_DEVICES" in environ:
        env["UCX_NET_DEVICES"] = environ["UCX_NET_DEVICES"]
    elif active and not override_tls:
        env["UCX_NET_DEVICES"] = ",".join(p.ucx_name for p in active)
    logger.debug("UCX transport for %s: %s", platform, env)
    return env
