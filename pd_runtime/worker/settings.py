"""``pd-runtime worker``'s settings: the one source of its flags and their defaults.

The flags are generated from :class:`WorkerSettings` (:func:`~pd_runtime.common.flags.add_flags`)
under the names the Kubernetes manifests use (``--kv-lease``, ``--gpus``, ``--kv-events-host=*``,
``--no-enforce-eager``), and :meth:`WorkerSettings.to_spec` is the one place they become a
:class:`~pd_runtime.worker.command.WorkerSpec`. Where a setting is also a ``WorkerSpec`` field
with a default, the default is read from there, so it is written once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pd_runtime.platform import PlatformChoice, UcxErrorHandling, resolve_platform
from pd_runtime.worker.command import Role, WorkerSpec

__all__ = ["FLAG_NAMES", "WorkerSettings"]

_SPEC: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(WorkerSpec)}

#: Settings whose flag is not the field's name (kept as the manifests spell them).
FLAG_NAMES = {"gpu_ids": "--gpus"}


class WorkerSettings(BaseModel):
    """One worker: its role, model, ports, platform and transport (vLLM's own flags go after
    ``--``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role = Field(description="prefill (kv_producer), decode (kv_consumer) or both")
    model: str = Field(description="model directory or hub id")
    served_model_name: str | None = Field(default=None, description="default: --model")
    host: str = Field(default=_SPEC["host"], description="address vLLM listens on")
    port: int = Field(description="vLLM's HTTP port", ge=1, le=65535)
    side_channel_port: int = Field(
        default=_SPEC["side_channel_port"], description="NIXL side channel", ge=1, le=65535
    )
    kv_events_port: int = Field(
        default=_SPEC["kv_events_port"], ge=0, le=65535, description="ZMQ KV events; 0 = off"
    )
    kv_events_replay_port: int | None = Field(
        default=None, description="ZMQ replay of missed KV events; default: none", ge=1, le=65535
    )
    kv_events_host: str | None = Field(
        default=None,
        description="host in the KV-events endpoint (default: --host, where the coordinator "
        "listens); '*' makes the worker bind it so the coordinator connects (Kubernetes)",
    )
    block_size: int | None = Field(default=None, gt=0, description="default: 32 on CPU, 16 on GPU")
    max_model_len: int | None = Field(default=None, gt=0, description="default: the model's")
    platform: PlatformChoice = Field(default="auto", description="cpu, cuda, or auto: detect")
    cpu_cores: str | None = Field(
        default=None, description="CPU: cores to pin to (VLLM_CPU_OMP_THREADS_BIND); default: none"
    )
    kv_cache_gib: float | None = Field(
        default=None,
        gt=0,
        description="CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE); default: vLLM's",
    )
    gpu_ids: str | None = Field(default=None, description="GPU: CUDA_VISIBLE_DEVICES; default: all")
    tensor_parallel_size: int = Field(
        default=_SPEC["tensor_parallel_size"], ge=1, description="GPUs of this worker"
    )
    ucx_tls: str | None = Field(default=None, description="override UCX_TLS; default: auto-detect")
    nixl_progress_delay_us: int | None = Field(
        default=None,
        ge=0,
        description="poll timeout of NIXL's UCX progress thread (default: 1000 on CPU, NIXL's 0 "
        "on GPU)",
    )
    ucx_error_handling: UcxErrorHandling | None = Field(
        default=None,
        description="NIXL's UCX error handling: peer (NIXL's default) or none (workers on one "
        "host: shared memory only, no TCP wire-up between them)",
    )
    kv_lease_s: int | None = Field(
        default=None,
        ge=1,
        description="prefill: keep unpulled KV blocks this long (default: vLLM's 30)",
    )
    kv_staging_mib: int | None = Field(
        default=None,
        ge=1,
        description="move each request's KV as one packed slot of a staging buffer of this "
        "many MiB (pd-runtime's staging connector; both sides need it); default: off, vLLM's "
        "per-block descriptors",
    )
    kv_staging_max_descriptor_bytes: int | None = Field(
        default=None,
        ge=0,
        description="stage only while a per-block descriptor is smaller than this (default 65536)",
    )
    kv_staging_reader_splits: int | None = Field(
        default=None,
        ge=1,
        description="prefill: pack each slot as this many head ranges, one per decode rank "
        "reading from this worker (decode TP / prefill TP); default 1",
    )
    kv_staging_release: bool = Field(
        default=False,
        description="prefill: give a packed request's KV blocks back to the pool at once (its "
        "staging slot holds the KV until the decode reads it); only where every decode reading "
        "from this worker stages too, with the TP reader_splits was computed for",
    )
    enforce_eager: bool = Field(
        default=_SPEC["enforce_eager"], description="no CUDA graphs / torch.compile"
    )

    def to_spec(self, extra_args: Sequence[str] = ()) -> WorkerSpec:
        """The worker these settings describe (``platform: auto`` detected here)."""
        fields: dict[str, Any] = self.model_dump()
        fields["platform"] = resolve_platform(self.platform)
        fields["kv_events_port"] = self.kv_events_port or None  # 0: no KV events
        return WorkerSpec(**fields, extra_args=tuple(extra_args))
