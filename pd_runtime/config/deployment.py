"""A whole deployment: the model, the engine settings, the worker groups, sidecars and coordinator.

Port layout (each group's replicas take consecutive ports from their base)::

    prefill-i   HTTP prefill.port+i   NIXL side channel prefill.side_channel_port+i   KV events prefill.kv_events_port+i
                (replay: prefill.kv_events_replay_port+i)
    decode-i    HTTP decode.port+i    NIXL side channel decode.side_channel_port+i    KV events decode.kv_events_port+i
                (replay: decode.kv_events_replay_port+i)
    sidecar-i   sidecar.port+i   (in front of decode-i)
    coordinator coordinator.port (shared by its replicas; with replicas > 1 replica k also has
                coordinator.replica_port+k, default coordinator.port+1+k)

Every port must be unique; validation names the two fields that collide.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pd_runtime.config.coordinator import CoordinatorEdge, SchedulerConfig
from pd_runtime.config.launcher import LauncherConfig, LocalLauncherConfig, RestartConfig
from pd_runtime.config.observability import ObservabilityConfig
from pd_runtime.config.sidecar import SidecarTuning
from pd_runtime.platform import PlatformChoice, UcxErrorHandling

__all__ = [
    "AdapterConfig",
    "DeploymentConfig",
    "EngineConfig",
    "ModelConfig",
    "PoolDeployment",
    "SidecarConfig",
    "TransportConfig",
    "WorkerGroupConfig",
]

_STRICT = ConfigDict(extra="forbid", frozen=True)
Port = Field(ge=1, le=65535)


class AdapterConfig(BaseModel):
    """A LoRA adapter every worker of its model serves (vLLM ``--lora-modules name=path``)."""

    model_config = _STRICT

    name: str = Field(min_length=1, description="the name clients ask for (as 'model')")
    path: str = Field(description="adapter directory (peft format)")
    generate: Literal["tiny"] | None = Field(
        default=None, description="write a local random adapter for the tiny model at `path`"
    )
    seed: int = 1
    rank: int = Field(default=8, ge=1, description="LoRA rank (vLLM --max-lora-rank covers it)")


class ModelConfig(BaseModel):
    model_config = _STRICT

    path: str = Field(description="model directory (or hub id on machines that can download)")
    served_name: str | None = Field(default=None, description="name clients use; default: path")
    generate: Literal["tiny", "small"] | None = Field(
        default=None, description="write a local random model of this size at `path` if missing"
    )
    seed: int = 0
    weights_gib: float | None = Field(
        default=None,
        gt=0,
        description="approximate weight size; GPU placement refuses a TP group that cannot hold it",
    )
    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="LoRA adapters served by every worker of this model (prefill and decode: a "
        "disaggregated adapter request needs both)",
    )

    @property
    def name(self) -> str:
        return self.served_name or self.path


class EngineConfig(BaseModel):
    """vLLM settings shared by every worker; anything else goes in ``extra_args``."""

    model_config = _STRICT

    block_size: int | None = Field(
        default=None, gt=0, description="KV block size in tokens; default: 32 on CPU, 16 on GPU"
    )
    max_model_len: int = Field(default=2048, gt=0, description="longest prompt + output, tokens")
    enforce_eager: bool = Field(
        default=True, description="no CUDA graphs / torch.compile (faster start, slower decode)"
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="GPUs per worker (a TP group of neighbouring GPUs)"
    )
    kv_cache_gib: float = Field(default=1.0, gt=0, description="CPU only: VLLM_CPU_KVCACHE_SPACE")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="GPU only: share of GPU memory vLLM may use"
    )
    extra_args: list[str] = Field(
        default_factory=list, description="more flags for every worker's vLLM command line"
    )


class TransportConfig(BaseModel):
    model_config = _STRICT

    platform: PlatformChoice = Field(
        default="auto", description="cpu or cuda; auto: cuda where NVML finds GPUs"
    )
    ucx_tls: str | None = Field(default=None, description="override UCX_TLS; default: auto-detect")
    ucx_net_devices: str | None = Field(
        default=None, description="override UCX_NET_DEVICES; default: the RDMA ports nearest"
    )
    nixl_num_threads: int | None = Field(
        default=None, ge=0, description="NIXL UCX worker threads; default: vLLM's (4)"
    )
    nixl_progress_delay_us: int | None = Field(
        default=None,
        ge=0,
        description="poll timeout of NIXL's UCX progress thread; default: 1000 on cpu "
        "(0 makes it spin a core per worker), NIXL's own (0) on cuda",
    )
    ucx_error_handling: UcxErrorHandling | None = Field(
        default=None,
        description="NIXL's UCX error handling. peer (NIXL's default): UCX detects dead peers, "
        "which needs a TCP connection between every pair of workers; none: workers on one host "
        "talk over shared memory and cma with no TCP wire-up (whose handshake stalled a pair's "
        "first KV pull for seconds on CPU); keep peer across hosts. Default: none, since the "
        "plan puts every worker on one host (the Ray launcher restores peer when they span "
        "nodes); peer: NIXL's own everywhere",
    )
    kv_staging_mib: int | None = Field(
        default=None,
        ge=1,
        description="move each request's KV as one packed slot of a staging buffer of this many "
        "MiB per worker (pd-runtime's connector: pack on the prefill, one READ, unpack on the "
        "decode) instead of one NIXL descriptor per layer and block; pays where descriptors are "
        "small and many (RDMA, heterogeneous TP); on CPU workers the pack and unpack copies cost "
        "more than they save (benchmarks/results/2026-12-07-staging). Default: off",
    )
    kv_staging_max_descriptor_bytes: int | None = Field(
        default=None,
        ge=0,
        description="with kv_staging_mib: stage only while vLLM's per-block descriptor (one "
        "layer's K and V of one block) is smaller than this; default 65536",
    )
    kv_staging_reader_splits: int | None = Field(
        default=None,
        ge=1,
        description="with kv_staging_mib: head ranges a prefill worker packs per slot, one per "
        "decode rank that reads from it (decode TP / prefill TP), so each reads its heads as one "
        "descriptor; default: the decode group's TP over the prefill group's when it divides, "
        "else 1",
    )
    kv_lease_s: int | None = Field(
        default=None,
        ge=1,
        description="how long a prefill worker keeps a finished request's KV blocks for a decode "
        "worker that never pulls them (its sidecar or decode worker died between the hops); the "
        "decode side renews the lease while it waits. Default: vLLM's (30 s)",
    )


class WorkerGroupConfig(BaseModel):
    model_config = _STRICT

    replicas: int = Field(ge=0)
    port: int = Port
    side_channel_port: int = Port
    kv_events_port: int = Port
    kv_events_replay_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="vLLM's replay socket for missed KV events (a coordinator that starts late or "
        "sees a gap catches up from it); none: no replay",
    )
    tensor_parallel_size: int | None = Field(
        default=None, ge=1, description="GPUs per worker of this group; default: engine's"
    )
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class SidecarConfig(SidecarTuning):
    """Every sidecar's settings (:class:`~pd_runtime.config.sidecar.SidecarTuning`) and the first
    sidecar's port (sidecar-i listens on ``port + i``)."""

    port: int = Port


class CoordinatorSection(CoordinatorEdge):
    """The deployment's coordinator: where it listens, its scheduler, and the edge settings of
    :class:`~pd_runtime.config.coordinator.CoordinatorEdge` (the same fields as its own config)."""

    port: int = Port
    scheduler: SchedulerConfig = SchedulerConfig()
    replicas: int = Field(
        default=1,
        ge=1,
        description="coordinator processes behind the one port (SO_REUSEPORT): each subscribes "
        "to every worker's KV events and scrapes on its own, so they need no shared state",
    )
    workers_bind_kv_events: bool = Field(
        default=False,
        description="each worker binds its KV-event publisher (an ipc:// path on its host) and "
        "every subscriber connects: any number of subscribers (coordinator replicas, or a peer "
        "router beside ours). Implied by replicas > 1; otherwise the coordinator binds and the "
        "workers connect",
    )
    replica_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="with replicas > 1, replica k also listens on replica_port + k (its own "
        "/health and /metrics, for the launcher's checks and per-replica scraping); default: "
        "port + 1",
    )

    @property
    def replica_ports(self) -> list[int]:
        """Each replica's own port; none with one replica (it has the main port to itself)."""
        if self.replicas == 1:
            return []
        base = self.replica_port if self.replica_port is not None else self.port + 1
        return [base + k for k in range(self.replicas)]


class PoolDeployment(BaseModel):
    """A further model behind the same gateway, with workers of its own (the top-level model is
    the first pool). Ports follow the same layout as the top-level groups."""

    model_config = _STRICT

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="short name: its parts are NAME-prefill-i, NAME-decode-i, NAME-sidecar-i",
    )
    model: ModelConfig
    engine: EngineConfig | None = Field(default=None, description="none: the top-level engine")
    prefill: WorkerGroupConfig
    decode: WorkerGroupConfig
    sidecar_port: int = Field(ge=1, le=65535, description="sidecar-i listens on sidecar_port + i")
    scheduler: SchedulerConfig | None = Field(
        default=None, description="this model's policy; none: coordinator.scheduler"
    )


class DeploymentConfig(BaseModel):
    model_config = _STRICT

    name: str = "pd-runtime"
    host: str = "127.0.0.1"
    model: ModelConfig
    engine: EngineConfig = EngineConfig()
    transport: TransportConfig = TransportConfig()
    prefill: WorkerGroupConfig
    decode: WorkerGroupConfig
    sidecar: SidecarConfig
    coordinator: CoordinatorSection
    launcher: LauncherConfig = Field(
        default_factory=LocalLauncherConfig,
        description="how `up` runs the parts: local processes (default) or a Ray cluster",
    )
    restarts: RestartConfig = RestartConfig()
    observability: ObservabilityConfig = Field(
        default_factory=ObservabilityConfig,
        description="traces of every part (coordinator, sidecars, vLLM workers) to an OTLP "
        "collector; off by default",
    )
    warm_up: bool = Field(
        default=True,
        description="warm every worker and check every (prefill, decode) pair (disaggregated "
        "output equal to colocated, KV moved over NIXL) before the deployment is reported "
        "healthy, and again for a worker that was restarted",
    )
    startup_timeout_s: float = Field(default=300.0, gt=0)
    parallel_startup: bool = Field(
        default=False,
        description="start workers all at once; default one at a time, which on a few cores is "
        "as fast and keeps a slow start from being blamed on a neighbour",
    )
    pools: list[PoolDeployment] = Field(
        default_factory=list,
        description="further models behind the same gateway, each with its own prefill/decode "
        "workers, engine settings and scheduler (the top-level model is the first)",
    )

    def single_models(self) -> list[tuple[str, DeploymentConfig]]:
        """Each model as a deployment of its own, with the prefix of its part names: the
        top-level one first (prefix ''), then every pool (``NAME-``); none has ``pools``."""
        out: list[tuple[str, DeploymentConfig]] = [("", self.model_copy(update={"pools": []}))]
        for pool in self.pools:
            coordinator = self.coordinator
            if pool.scheduler is not None:
                coordinator = coordinator.model_copy(update={"scheduler": pool.scheduler})
            update = {
                "model": pool.model,
                "engine": pool.engine or self.engine,
                "prefill": pool.prefill,
                "decode": pool.decode,
                "sidecar": self.sidecar.model_copy(update={"port": pool.sidecar_port}),
                "coordinator": coordinator,
                "pools": [],
            }
            out.append((f"{pool.name}-", self.model_copy(update=update)))
        return out

    @model_validator(mode="after")
    def _check(self) -> DeploymentConfig:
        if self.decode.replicas < 1:
            raise ValueError("decode.replicas: at least one decode worker is required")
        taken: dict[int, str] = {}

        def claim(field: str, base: int, count: int) -> None:
            for i in range(count):
                owner = taken.setdefault(base + i, field)
                if owner != field:
                    raise ValueError(f"{field}: port {base + i} collides with {owner}")

        def claim_groups(at: str, prefill: WorkerGroupConfig, decode: WorkerGroupConfig) -> None:
            for role, group in ((f"{at}prefill", prefill), (f"{at}decode", decode)):
                claim(f"{role}.port", group.port, group.replicas)
                claim(f"{role}.side_channel_port", group.side_channel_port, group.replicas)
                claim(f"{role}.kv_events_port", group.kv_events_port, group.replicas)
                if group.kv_events_replay_port is not None:
                    claim(
                        f"{role}.kv_events_replay_port", group.kv_events_replay_port, group.replicas
                    )

        claim_groups("", self.prefill, self.decode)
        claim("sidecar.port", self.sidecar.port, self.decode.replicas)
        names = [self.model.name]
        for i, pool in enumerate(self.pools):
            if pool.decode.replicas < 1:
                raise ValueError(f"pools[{i}].decode.replicas: at least one decode worker")
            claim_groups(f"pools[{i}].", pool.prefill, pool.decode)
            claim(f"pools[{i}].sidecar_port", pool.sidecar_port, pool.decode.replicas)
            names.append(pool.model.name)
        served = names + [
            a.name for m in (self.model, *(p.model for p in self.pools)) for a in m.adapters
        ]
        twice = sorted({n for n in served if served.count(n) > 1})
        if twice:
            raise ValueError(f"pools: names served twice (models or adapters) {twice}")
        for alias, target in self.coordinator.aliases.items():
            targets = [target] if isinstance(target, str) else [t.model for t in target]
            unknown = sorted(set(targets) - set(served))
            if alias in served or unknown:
                raise ValueError(
                    f"coordinator.aliases.{alias}: shadows a served name or targets one not "
                    f"served here ({unknown}; served: {served})"
                )
        pool_names = [p.name for p in self.pools]
        if len(set(pool_names)) != len(pool_names):
            raise ValueError("pools: duplicate pool names")
        claim("coordinator.port", self.coordinator.port, 1)
        ports = self.coordinator.replica_ports
        if ports:
            claim("coordinator.replica_port", ports[0], len(ports))
            if ports[-1] > 65535:
                raise ValueError("coordinator.replica_port: replica ports end past 65535")
        return self
