"""The sidecar's settings, each written once: the deployment's ``sidecar:`` section
(:class:`~pd_runtime.config.deployment.SidecarConfig`), the sidecar process's own settings
(:class:`~pd_runtime.sidecar.app.SidecarSettings`) and its command-line flags
(:func:`~pd_runtime.common.flags.add_flags`) all come from :class:`SidecarTuning`; the launcher
writes a sidecar's command line from it with :func:`~pd_runtime.common.flags.to_argv`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SidecarTuning"]


class SidecarTuning(BaseModel):
    """What every sidecar of a deployment shares (not where it listens nor what it fronts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connector: str = Field(
        default="nixl",
        description="the KV-transfer protocol spoken with the workers (a name from "
        "pd_runtime.sidecar.connectors.CONNECTORS, checked at start-up)",
    )
    prefill_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="per read of the prefill call, and the most its total deadline can be",
    )
    prefill_deadline_floor_s: float = Field(
        default=5.0,
        gt=0,
        description="the shortest total deadline of a prefill call; past its deadline the call "
        "is cancelled (the prefill worker aborts it) and the decode worker prefills locally. Set "
        "it to the prefill timeout to give every call the whole timeout",
    )
    prefill_deadline_factor: float = Field(
        default=4.0,
        ge=1,
        description="a prefill call's deadline is this many times its predicted time (learned "
        "per prefill worker from the time per prompt token of the prefills the sidecar sent it) "
        "+ 1 s, at least the floor and at most the prefill timeout",
    )
    prefill_deadline_cold_s: float = Field(
        default=15.0,
        gt=0,
        description="the shortest deadline while a prefill worker has not yet answered this "
        "sidecar (its first requests include one-time warm-up); raise it for a model whose "
        "prefills take longer",
    )
    decode_timeout_s: float = Field(
        default=600.0, gt=0, description="per read of the decode call (then 504, or an SSE error)"
    )
    connect_timeout_s: float = Field(
        default=5.0, gt=0, description="to open a connection to a prefill or the decode worker"
    )
    drain_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="on SIGTERM, how long in-flight requests may run before they are cut",
    )
    drain_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="on SIGTERM, how long to keep listening with /health at 503 before the port "
        "closes",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="close a connection that has not sent a complete request head this long "
        "after it opened or after its next request's first byte (against slowloris)",
    )
