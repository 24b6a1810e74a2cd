"""Turn a DeploymentConfig into concrete parts: processes with command lines, env, ports, placement.

Placement (:mod:`pd_runtime.placement`), on this machine or on a described one::

    GPUs present:  each worker gets tp neighbouring GPUs (one NUMA node, NVLink-connected where the
                   machine has NVLink) via CUDA_VISIBLE_DEVICES, prefill first; the cores of that
                   NUMA node (PartSpec.cpu_affinity); the RDMA ports nearest its GPUs for UCX
    CPU only:      worker k is pinned to core cores[k % ncores]  via VLLM_CPU_OMP_THREADS_BIND

The plan is pure data (no processes started), so it is what ``up`` runs and what tests inspect.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pd_runtime.common.flags import to_argv
from pd_runtime.common.tracing import ENDPOINT_ENV, SERVICE_ENV
from pd_runtime.config.coordinator import (
    CoordinatorConfig,
    CoordinatorEdge,
    PoolConfig,
    SchedulerConfig,
)
from pd_runtime.config.deployment import DeploymentConfig, WorkerGroupConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.config.sidecar import SidecarTuning
from pd_runtime.errors import ConfigError
from pd_runtime.placement.machine import MachineDescription
from pd_runtime.placement.placer import WorkerPlacement, WorkerRequest, place_workers
from pd_runtime.platform import Platform
from pd_runtime.worker.command import WorkerSpec, build_worker_command

__all__ = ["DeploymentPlan", "PartKind", "PartSpec", "plan_deployment"]

PartKind = Literal["worker", "sidecar", "coordinator"]


@dataclass(frozen=True)
class PartSpec:
    name: str
    kind: PartKind
    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    placement: str = ""  # e.g. "cpu core 1" or "GPUs 0,1, NUMA 0"
    gpus: tuple[int, ...] = ()  # GPU workers: the machine's GPU indices (CUDA_VISIBLE_DEVICES)
    cpu_affinity: tuple[int, ...] = ()  # GPU workers: cores the launcher pins the process tree to

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@dataclass(frozen=True)
class DeploymentPlan:
    parts: list[PartSpec]
    coordinator: CoordinatorConfig
    coordinator_config_path: Path
    model_path: Path
    workers: list[WorkerSpec] = field(default_factory=list)
    placements: dict[str, WorkerPlacement] = field(default_factory=dict)  # by worker part name
    machine: MachineDescription | None = None  # what the workers were placed on

    def by_kind(self, kind: PartKind) -> list[PartSpec]:
        return [p for p in self.parts if p.kind == kind]

    @property
    def gateway_url(self) -> str:
        return f"http://{self.coordinator.host}:{self.coordinator.port}"


def _groups(
    config: DeploymentConfig,
) -> list[tuple[Literal["prefill", "decode"], WorkerGroupConfig]]:
    return [("prefill", config.prefill), ("decode", config.decode)]


def _reader_splits(config: DeploymentConfig) -> int:
    """Head ranges a prefill worker packs per staging slot: one per decode rank reading from it."""
    if config.transport.kv_staging_reader_splits is not None:
        return config.transport.kv_staging_reader_splits
    prefill = _tensor_parallel(config, config.prefill)
    decode = _tensor_parallel(config, config.decode)
    return decode // prefill if decode % prefill == 0 else 1


def _staging_release(config: DeploymentConfig) -> bool:
    """Whether prefill workers may free a packed request's blocks at once: every decode worker
    of a plan stages (the transport section is the deployment's), and reads whole slots where
    its TP is a multiple of the prefill's (or the config names the split); otherwise a decode
    would recompute what it could have read per block."""
    if config.transport.kv_staging_reader_splits is not None:
        return True
    return _tensor_parallel(config, config.decode) % _tensor_parallel(config, config.prefill) == 0


def _tensor_parallel(config: DeploymentConfig, group: WorkerGroupConfig) -> int:
    return group.tensor_parallel_size or config.engine.tensor_parallel_size


def _lora_args(config: DeploymentConfig) -> tuple[str, ...]:
    """vLLM's flags for the model's LoRA adapters (every worker of the model serves them all)."""
    adapters = config.model.adapters
    if not adapters:
        return ()
    rank = max(a.rank for a in adapters)
    modules = [f"{a.name}={Path(a.path).resolve()}" for a in adapters]
    return ("--enable-lora", "--max-lora-rank", str(rank), "--lora-modules", *modules)


def _worker_specs(
    models: list[tuple[str, DeploymentConfig]], platform: Platform, machine: MachineDescription
) -> list[tuple[str, WorkerSpec, WorkerPlacement]]:
    """Every model's workers, placed together (one model's workers never share another's GPUs;
    on CPU the cores are dealt out across all of them), each part name with its model's prefix."""
    requests = [
        WorkerRequest(
            f"{prefix}{role}-{i}",
            role,
            _tensor_parallel(config, group),
        )
        for prefix, config in models
        for role, group in _groups(config)
        for i in range(group.replicas)
    ]
    first = models[0][1]
    placements = iter(
        place_workers(
            requests,
            machine,
            device=platform.name,
            cpu_cores=platform.cpu_cores,
            weights_gib=max(
                (c.model.weights_gib for _, c in models if c.model.weights_gib is not None),
                default=None,
            ),
            gpu_memory_utilization=first.engine.gpu_memory_utilization,
        )
    )
    specs: list[tuple[str, WorkerSpec, WorkerPlacement]] = []
    for _, config in models:
        specs += _model_worker_specs(config, platform, placements)
    return specs


def _model_worker_specs(
    config: DeploymentConfig, platform: Platform, placements: Iterator[WorkerPlacement]
) -> list[tuple[str, WorkerSpec, WorkerPlacement]]:
    engine, host = config.engine, config.host
    lora = _lora_args(config)
    specs: list[tuple[str, WorkerSpec, WorkerPlacement]] = []
    on_staging = config.transport.kv_staging_mib is not None
    for role, group in _groups(config):
        for i in range(group.replicas):
            where = next(placements)
            on_cpu = where.device == "cpu"
            spec = WorkerSpec(
                role=role,
                model=config.model.path,
                served_model_name=config.model.name,
                host=host,
                port=group.port + i,
                platform=platform.name,
                side_channel_port=group.side_channel_port + i,
                kv_events_port=group.kv_events_port + i,
                kv_events_replay_port=(
                    group.kv_events_replay_port + i
                    if group.kv_events_replay_port is not None
                    else None
                ),
                block_size=engine.block_size,
                max_model_len=engine.max_model_len,
                enforce_eager=engine.enforce_eager,
                tensor_parallel_size=len(where.gpus) or 1,
                kv_cache_gib=engine.kv_cache_gib if on_cpu else None,
                gpu_memory_utilization=None if on_cpu else engine.gpu_memory_utilization,
                cpu_cores=where.cores if on_cpu else None,
                gpu_ids=where.gpu_ids,
                ucx_tls=config.transport.ucx_tls,
                ucx_net_devices=config.transport.ucx_net_devices,
                rdma_ports=where.transport.rdma_ports,
                gdr_copy=where.transport.gdr_copy,
                nixl_num_threads=config.transport.nixl_num_threads,
                nixl_progress_delay_us=config.transport.nixl_progress_delay_us,
                # Unset means one host's choice: every worker of this plan runs here (Ray's
                # relocate_plan gives NIXL's peer back when it spreads them over nodes).
                ucx_error_handling=config.transport.ucx_error_handling or "none",
                kv_lease_s=config.transport.kv_lease_s,
                kv_staging_mib=config.transport.kv_staging_mib,
                kv_staging_max_descriptor_bytes=config.transport.kv_staging_max_descriptor_bytes,
                kv_staging_release=role == "prefill" and on_staging and _staging_release(config),
                kv_staging_reader_splits=(
                    _reader_splits(config) if role == "prefill" and on_staging else None
                ),
                otlp_endpoint=config.observability.otlp_endpoint,
                service_name=config.observability.service_name(f"vllm-{role}"),
                extra_args=tuple(engine.extra_args) + lora + tuple(group.extra_args),
                extra_env=dict(group.env),
            )
            specs.append((where.name, spec, where))
    return specs


def _kv_events_source(host: str, spec: WorkerSpec) -> dict[str, Any]:
    """The coordinator's side of a worker's KV events: where to subscribe, and who binds."""
    replay = spec.kv_events_replay_port
    source: dict[str, Any] = {
        "kv_events": spec.kv_events_endpoint or f"tcp://{host}:{spec.kv_events_port}",
        "kv_events_replay": f"tcp://{host}:{replay}" if replay is not None else None,
    }
    if spec.kv_events_endpoint is not None:
        source["kv_events_bind"] = False  # the worker binds it
    return source


#: Linux's limit on a unix socket path (sun_path is 108 bytes with the terminating NUL).
_MAX_IPC_PATH = 107


def _ipc_endpoint(run_dir: Path, name: str) -> str:
    path = run_dir.resolve() / f"kv-events-{name}.sock"
    if len(str(path)) > _MAX_IPC_PATH:
        raise ConfigError(
            f"coordinator: the KV-event socket path {path} is longer than a unix socket "
            f"allows ({_MAX_IPC_PATH} bytes); use a shorter run directory"
        )
    return f"ipc://{path}"


def _scheduler_for(config: DeploymentConfig, worker: WorkerSpec | None) -> SchedulerConfig:
    """The KV-aware policy must key prompts exactly as the engines do: same tokenizer (the
    model's), same block size. Fill both in from the deployment unless the config says."""
    scheduler = config.coordinator.scheduler
    if scheduler.policy != "kv-aware" or worker is None:
        return scheduler
    model = Path(config.model.path)
    params = {
        "tokenizer": str(model.resolve()) if model.exists() else config.model.path,
        "block_size": worker.effective_block_size,
        "replicas": config.coordinator.replicas,
        **scheduler.params,
    }
    return scheduler.model_copy(update={"params": params})


def plan_deployment(
    config: DeploymentConfig,
    run_dir: Path,
    platform: Platform,
    machine: MachineDescription | None = None,
) -> DeploymentPlan:
    """Plan every part. ``machine``: the topology to place workers on (discovered or described);
    default: what ``platform`` alone says (GPU count and cores, no NUMA/NVLink/RDMA knowledge)."""
    host = config.host
    python = [sys.executable, "-m", "pd_runtime"]
    worker_parts: list[PartSpec] = []
    sidecar_parts: list[PartSpec] = []
    machine = machine or MachineDescription.from_platform(platform)
    models = config.single_models()
    placed = _worker_specs(models, platform, machine)
    replicated = config.coordinator.replicas > 1
    # Each worker binds its publisher and every subscriber (each replica) connects.
    if replicated or config.coordinator.workers_bind_kv_events:
        placed = [
            (name, replace(spec, kv_events_endpoint=_ipc_endpoint(run_dir, name)), where)
            if spec.kv_events_port is not None
            else (name, spec, where)
            for name, spec, where in placed
        ]
    workers = [(name, spec) for name, spec, _ in placed]

    # The sidecars trace when the deployment does, told as OpenTelemetry's own variables say.
    sidecar_env = {"PYTHONUNBUFFERED": "1"}
    if config.observability.otlp_endpoint is not None:
        sidecar_env[ENDPOINT_ENV] = config.observability.otlp_endpoint
        sidecar_env[SERVICE_ENV] = config.observability.service_name("sidecar")
    pools: list[PoolConfig] = []
    remaining = iter(placed)
    for prefix, sub in models:
        count = sub.prefill.replicas + sub.decode.replicas
        own = [next(remaining) for _ in range(count)]
        adapters = [a.name for a in sub.model.adapters]
        endpoints: list[EndpointConfig] = []
        prefill_addresses = [f"{host}:{s.port}" for _, s, _ in own if s.role == "prefill"]
        for name, spec, where in own:
            argv, env = build_worker_command(spec)
            gpu = where.device == "cuda"
            worker_parts.append(
                PartSpec(
                    name,
                    "worker",
                    argv,
                    env,
                    host,
                    spec.port,
                    where.where,
                    gpus=where.gpus,
                    cpu_affinity=where.cpu_cores if gpu else (),
                )
            )
            if spec.role == "prefill":
                endpoints.append(
                    EndpointConfig(
                        name=name,
                        role="prefill",
                        address=f"{host}:{spec.port}",
                        url=f"http://{host}:{spec.port}",
                        adapters=adapters,
                        **_kv_events_source(host, spec),
                    )
                )
        decodes = [spec for _, spec, _ in own if spec.role == "decode"]
        for i, spec in enumerate(decodes):
            sidecar_port = sub.sidecar.port + i
            argv = [
                *python,
                "sidecar",
                "--host",
                host,
                "--port",
                str(sidecar_port),
                "--decode-url",
                f"http://{host}:{spec.port}",
                *to_argv(sub.sidecar, SidecarTuning),
            ]
            for address in prefill_addresses:
                argv += ["--prefiller", address]
            sidecar_parts.append(
                PartSpec(
                    f"{prefix}sidecar-{i}", "sidecar", argv, dict(sidecar_env), host, sidecar_port
                )
            )
            endpoints.append(
                EndpointConfig(
                    name=f"{prefix}decode-{i}",
                    role="decode",
                    address=f"{host}:{spec.port}",
                    url=f"http://{host}:{sidecar_port}",
                    adapters=adapters,
                    **_kv_events_source(host, spec),
                )
            )
        first = own[0][1] if own else None
        pools.append(
            PoolConfig(
                model=sub.model.name, endpoints=endpoints, scheduler=_scheduler_for(sub, first)
            )
        )
    parts = worker_parts + sidecar_parts

    # The section's edge settings (API keys, admission, body limit, draining) are
    # CoordinatorConfig's own fields (both are a CoordinatorEdge), so they pass through as they are.
    edge = config.coordinator.model_dump(include=set(CoordinatorEdge.model_fields))
    # One model without adapters: the coordinator config as it always was. Several models, or
    # adapters: one pool per model (its own scheduler, index and scorers).
    layout: dict[str, Any]
    if len(pools) == 1 and not config.model.adapters:
        layout = {"models": [pools[0].model], "endpoints": pools[0].endpoints}
        layout["scheduler"] = pools[0].scheduler
    else:
        layout = {"pools": pools, "scheduler": config.coordinator.scheduler}
    coordinator = CoordinatorConfig(
        host=host,
        port=config.coordinator.port,
        reuse_port=replicated,
        observability=config.observability,
        **layout,
        **edge,
    )
    coordinator_path = run_dir / "coordinator.yaml"
    command = [*python, "coordinator", "--config", str(coordinator_path)]
    env = {"PYTHONUNBUFFERED": "1"}
    if not replicated:
        parts.append(
            PartSpec("coordinator", "coordinator", command, env, host, config.coordinator.port)
        )
    # A replica's part is checked on its own port: the shared one answers for any replica.
    for k, own_port in enumerate(config.coordinator.replica_ports):
        argv = [*command, "--replica-port", str(own_port)]
        parts.append(PartSpec(f"coordinator-{k}", "coordinator", argv, env, host, own_port))
    return DeploymentPlan(
        parts,
        coordinator,
        coordinator_path,
        Path(config.model.path),
        [s for _, s in workers],
        placements={name: where for name, _, where in placed},
        machine=machine,
    )
