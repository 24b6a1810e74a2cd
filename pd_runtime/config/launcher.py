"""How ``pd-runtime up`` runs the planned parts: as local processes, or on a Ray cluster.

    launcher: {type: local}                      # default: processes on this machine
    launcher:                                    # or: one placement group per worker on Ray
      type: ray
      address: auto                              # what ray.init gets; `up --ray ADDRESS` overrides
      worker_cpus: 1                             # logical CPUs in each worker's bundle
      sidecar_cpus: 0.5                          # the sidecar's bundle, packed with its decode worker
      resources: {prefill: {}, decode: {}}       # extra custom resources per role's worker bundle
      max_restarts: -1                           # Ray restarts of a supervisor actor (-1: forever)
      process_restarts: 5                        # restarts of a dead part by its supervisor

The type names come from the launcher registry (:data:`pd_runtime.launcher.base.LAUNCHERS`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["LauncherConfig", "LocalLauncherConfig", "RayLauncherConfig", "RestartConfig"]

_STRICT = ConfigDict(extra="forbid", frozen=True)


class RestartConfig(BaseModel):
    """How a part that exits is restarted (both launchers): after ``backoff_s``, doubling with
    each restart in the window up to ``max_backoff_s``; more than ``max_restarts`` restarts
    within ``window_s`` is a crash loop: ``up`` stops and names the part (on Ray the actor gives
    up and Ray restarts it while its ``max_restarts`` allow)."""

    model_config = _STRICT

    max_restarts: int = Field(
        default=5, ge=0, description="restarts within window_s before a part is crash-looping"
    )
    window_s: float = Field(default=600.0, gt=0, description="the crash-loop window, seconds")
    backoff_s: float = Field(default=1.0, gt=0, description="first restart delay, seconds")
    max_backoff_s: float = Field(default=30.0, gt=0, description="longest restart delay")


class LocalLauncherConfig(BaseModel):
    model_config = _STRICT

    type: Literal["local"] = "local"


class RayLauncherConfig(BaseModel):
    """Placement on a Ray cluster; see :mod:`pd_runtime.launcher.ray` for what each setting does."""

    model_config = _STRICT

    type: Literal["ray"] = "ray"
    address: str = Field(
        default="auto", description="Ray cluster address (HOST:PORT of the GCS, 'auto', ray://...)"
    )
    namespace: str = Field(default="pd-runtime", description="Ray namespace of the actors")
    worker_cpus: float = Field(default=1.0, gt=0, description="logical CPUs per worker bundle")
    sidecar_cpus: float = Field(
        default=0.5, gt=0, description="logical CPUs of the sidecar bundle beside a decode worker"
    )
    resources: dict[Literal["prefill", "decode"], dict[str, float]] = Field(
        default_factory=dict,
        description="extra custom resources in each worker bundle of a role, e.g. "
        "{prefill: {node_a: 1}} or {decode: {'accelerator_type:H200': 0.001}}",
    )
    max_restarts: int = Field(
        default=-1, ge=-1, description="Ray restarts of a part's supervisor actor (-1: unlimited)"
    )
    process_restarts: int = Field(
        default=5,
        ge=0,
        description="restarts of a part's process by its supervisor before the actor gives up "
        "(and Ray restarts the actor)",
    )
    placement_timeout_s: float = Field(
        default=120.0, gt=0, description="how long to wait for the cluster to fit every group"
    )


LauncherConfig = Annotated[LocalLauncherConfig | RayLauncherConfig, Field(discriminator="type")]
