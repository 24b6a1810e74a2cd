"""The plan as ``pd-runtime plan`` prints it: a table for people, JSON for tools.

Both are computed from the :class:`~pd_runtime.launcher.topology.DeploymentPlan` that ``up`` would
run, so what is printed is exactly what would start (argv and environment included).
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from pd_runtime.launcher.topology import DeploymentPlan, PartSpec
from pd_runtime.placement.machine import format_cpulist

__all__ = ["plan_as_dict", "render_json", "render_table"]

# Environment variables worth showing in the command line (the rest is PYTHONUNBUFFERED and alike).
_SHOWN_ENV = ("CUDA_VISIBLE_DEVICES", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")
_SHOWN_PREFIXES = ("UCX_", "VLLM_NIXL_", "PD_RUNTIME_")


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _role(part: PartSpec) -> str:
    if part.kind == "worker":
        kv = json.loads(_flag(part.argv, "--kv-transfer-config") or "{}").get("kv_role", "")
        return {"kv_producer": "prefill", "kv_consumer": "decode"}.get(kv, "both")
    return part.kind


def _command(part: PartSpec) -> str:
    env = {k: v for k, v in part.env.items() if k in _SHOWN_ENV or k.startswith(_SHOWN_PREFIXES)}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    return f"{prefix} {shlex.join(part.argv)}".strip()


def _part(plan: DeploymentPlan, part: PartSpec) -> dict[str, Any]:
    where = plan.placements.get(part.name)
    cores = part.cpu_affinity or (
        where.cpu_cores if where is not None and where.device == "cpu" else ()
    )
    return {
        "name": part.name,
        "kind": part.kind,
        "role": _role(part),
        "host": part.host,
        "port": part.port,
        "gpus": list(part.gpus),
        "numa_node": where.numa_node if where else None,
        "cpu_cores": format_cpulist(cores),
        "side_channel_port": part.env.get("VLLM_NIXL_SIDE_CHANNEL_PORT"),
        "ucx_tls": part.env.get("UCX_TLS"),
        "ucx_net_devices": part.env.get("UCX_NET_DEVICES"),
        "transport": where.transport.kind if where else None,
        "transport_reason": where.transport.reason if where else None,
        "notes": list(where.notes) if where else [],
        "env": dict(part.env),
        "argv": list(part.argv),
        "command": _command(part),
    }


def plan_as_dict(plan: DeploymentPlan) -> dict[str, Any]:
    return {
        "machine": plan.machine.model_dump(mode="json") if plan.machine else None,
        "gateway": plan.gateway_url,
        "model": str(plan.model_path),
        "parts": [_part(plan, p) for p in plan.parts],
    }


def render_json(plan: DeploymentPlan) -> str:
    return json.dumps(plan_as_dict(plan), indent=2)


def render_table(plan: DeploymentPlan) -> str:
    rows = [_part(plan, p) for p in plan.parts]
    header = ("PART", "ROLE", "GPUS", "NUMA", "CORES", "PORT", "NIXL", "UCX_TLS", "UCX_NET_DEVICES")
    table = [header] + [
        (
            r["name"],
            r["role"],
            ",".join(map(str, r["gpus"])) or "-",
            "-" if r["numa_node"] is None else str(r["numa_node"]),
            r["cpu_cores"] or "-",
            str(r["port"]),
            r["side_channel_port"] or "-",
            r["ucx_tls"] or "-",
            r["ucx_net_devices"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [f"machine: {plan.machine.summary()}" if plan.machine else "machine: (not described)"]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]
    lines.append(f"gateway: {plan.gateway_url}")
    for r in rows:
        if r["transport_reason"] or r["notes"]:
            lines.append(
                f"{r['name']}: {'; '.join([r['transport_reason'] or '', *r['notes']]).strip('; ')}"
            )
    lines.append("")
    lines.append("commands:")
    lines += [f"  [{r['name']}] {r['command']}" for r in rows]
    return "\n".join(lines)
