"""The leaf type every layer may import: one model server the runtime routes to.

It imports nothing from ``pd_runtime``: the scheduler, discovery, the sidecar, the launcher and the
coordinator all speak of endpoints, and none of them should pull in another's configuration to
do so (the import contract in ``pyproject.toml`` keeps it that way).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["EndpointConfig"]


class EndpointConfig(BaseModel):
    """One model server the coordinator may route to.

    ``address`` (``HOST:PORT`` of the vLLM server) is the endpoint's identity: it keys the pod
    scores, and for a prefill endpoint it is the value of the ``x-prefiller-host-port`` header.
    ``url`` is where the coordinator sends requests: the sidecar for a decode endpoint.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Literal["prefill", "decode"]
    address: str = Field(pattern=r"^([^\s:/\[\]]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}$")  # [IPv6]:PORT too
    url: str
    kv_events: str | None = Field(
        default=None, description="tcp://HOST:PORT the coordinator binds for this worker's events"
    )
    kv_events_replay: str | None = Field(
        default=None, description="tcp://HOST:PORT of the worker's replay socket (vLLM binds it)"
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="LoRA adapters this endpoint's worker serves (vLLM --lora-modules names): an "
        "adapter request goes only to endpoints holding it, prefill and decode alike",
    )
    kv_events_bind: bool = Field(
        default=True,
        description="True: the coordinator binds kv_events and the worker connects to it (local "
        "launcher); False: the worker binds (tcp://*:PORT) and the coordinator connects to "
        "kv_events (Kubernetes, where the coordinator cannot bind another pod's address)",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}/metrics"
