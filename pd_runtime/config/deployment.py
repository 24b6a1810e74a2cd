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
from pd_runtime.platform import PlatformChoice

__all__ = [
    "DeploymentConfig",
    "EngineConfig",
    "ModelConfig",
    "SidecarConfig",
    "TransportConfig",
    "WorkerGroupConfig",
]

_STRICT = ConfigDict(extra="forbid", frozen=True)
Port = Field(ge=1, le=65535)


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

        claim("prefill.port", self.prefill.port, self.prefill.replicas)
        claim("prefill.side_channel_port", self.prefill.side_channel_port, self.prefill.replicas)
        claim("prefill.kv_events_port", self.prefill.kv_events_port, self.prefill.replicas)
        claim("decode.port", self.decode.port, self.decode.replicas)
        claim("decode.side_channel_port", self.decode.side_channel_port, self.decode.replicas)
        claim("decode.kv_events_port", self.decode.kv_events_port, self.decode.replicas)
        for role, group in (("prefill", self.prefill), ("decode", self.decode)):
            if group.kv_events_replay_port is not None:
                claim(f"{role}.kv_events_replay_port", group.kv_events_replay_port, group.replicas)
        claim("sidecar.port", self.sidecar.port, self.decode.replicas)
        claim("coordinator.port", self.coordinator.port, 1)
        ports = self.coordinator.replica_ports
        if ports:
            claim("coordinator.replica_port", ports[0], len(ports))
            if ports[-1] > 65535:
                raise ValueError("coordinator.replica_port: replica ports end past 65535")
        return self
