"""What one coordinator process needs: where it listens, its endpoints, its scheduling policy."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["CoordinatorConfig", "EndpointConfig", "SchedulerConfig"]

_STRICT = ConfigDict(extra="forbid", frozen=True)


class EndpointConfig(BaseModel):
    """One model server the coordinator may route to.

    ``address`` (``HOST:PORT`` of the vLLM server) is the endpoint's identity: it keys the pod
    scores, and for a prefill endpoint it is the value of the ``x-prefiller-host-port`` header.
    ``url`` is where the coordinator sends requests: the sidecar for a decode endpoint.
    """

    model_config = _STRICT

    name: str
    role: Literal["prefill", "decode"]
    address: str = Field(pattern=r"^[^\s:/]+:\d{1,5}$")
    url: str
    kv_events: str | None = Field(
        default=None, description="tcp://HOST:PORT the coordinator binds for this worker's events"
    )
    kv_events_replay: str | None = Field(
        default=None, description="tcp://HOST:PORT of the worker's replay socket (vLLM binds it)"
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


class SchedulerConfig(BaseModel):
    model_config = _STRICT

    policy: str = "round-robin"
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        from pd_runtime.scheduling.registry import SCHEDULERS

        if value not in SCHEDULERS:
            raise ValueError(
                f"unknown policy {value!r}; choose one of: {', '.join(SCHEDULERS.names())}"
            )
        return value


class CoordinatorConfig(BaseModel):
    model_config = _STRICT

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    models: list[str] = Field(min_length=1, description="served model names clients may ask for")
    endpoints: list[EndpointConfig]
    scheduler: SchedulerConfig = SchedulerConfig()
    request_timeout_s: float = Field(default=600.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)

    @model_validator(mode="after")
    def _has_decode_and_unique_names(self) -> CoordinatorConfig:
        if not any(e.role == "decode" for e in self.endpoints):
            raise ValueError("endpoints: at least one endpoint with role 'decode' is required")
        names = [e.name for e in self.endpoints]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"endpoints: duplicate names {duplicates}")
        return self

    def by_role(self, role: str) -> list[EndpointConfig]:
        return [e for e in self.endpoints if e.role == role]
