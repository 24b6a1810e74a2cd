"""What one coordinator process needs: where it listens, its endpoints, its scheduling policy."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

from pd_runtime.config.discovery import DiscoveryConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.config.observability import ObservabilityConfig

__all__ = [
    "AliasTarget",
    "CoordinatorConfig",
    "CoordinatorEdge",
    "PoolConfig",
    "SchedulerConfig",
]

_STRICT = ConfigDict(extra="forbid", frozen=True)


class SchedulerConfig(BaseModel):
    model_config = _STRICT

    policy: str = Field(
        default="round-robin",
        description="a name from pd_runtime.scheduling.registry.SCHEDULERS (checked by "
        "pd_runtime.registries at start-up)",
    )
    params: dict[str, Any] = Field(default_factory=dict)


class PoolConfig(BaseModel):
    """One served base model with its own workers and policy (a multi-model coordinator has one
    per model). Its LoRA adapters are the union of its endpoints' ``adapters``."""

    model_config = _STRICT

    model: str = Field(min_length=1, description="the served model name (the workers' own)")
    endpoints: list[EndpointConfig]
    scheduler: SchedulerConfig | None = Field(
        default=None, description="this pool's policy; none: the coordinator's ``scheduler``"
    )

    @property
    def adapters(self) -> list[str]:
        return sorted({a for e in self.endpoints for a in e.adapters})


class AliasTarget(BaseModel):
    """One served name behind a public name, with its share of the traffic (a canary split)."""

    model_config = _STRICT

    model: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0)


class CoordinatorEdge(BaseModel):
    """The coordinator's edge settings (draining, admission, body limit, API keys from the
    environment): the same fields, with their one default, in a coordinator's own config and in a
    deployment's ``coordinator:`` section, which the launcher passes through as they are."""

    model_config = _STRICT

    drain_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="on SIGTERM: /health answers 503 draining, new connections are refused, and "
        "in-flight requests get this long to finish before they are cut",
    )
    drain_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="on SIGTERM, keep listening this long first, answering /health and new "
        "requests with 503 draining, so load balancers and readiness probes see the coordinator "
        "leave before its port closes (e.g. a few readiness periods on Kubernetes)",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a client connection that has not sent a complete request head this long "
        "after it opened (or after the first byte of its next request) is closed, with 408 if "
        "it had started one (slowloris); the body and the response are not bound by it",
    )
    direct_to_worker: bool = Field(
        default=False,
        description="a request the scheduler serves directly (no prefill) goes from the "
        "coordinator straight to the decode worker at the endpoint's address, skipping its "
        "sidecar's hop (a client-sent kv_transfer_params is dropped here, as the sidecar does); "
        "disaggregated requests still go through the sidecar. Only where the coordinator can "
        "reach the workers' own ports (not where the sidecar is the pod's only entry)",
    )
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=1,
        description="largest request body accepted (bytes; default 10 MiB); a larger one is "
        "refused with 413, from its Content-Length or as soon as the streamed bytes pass it",
    )
    api_keys_env: str | None = Field(
        default=None,
        description="name of an environment variable holding comma-separated API keys, added to "
        "api_keys (keeps keys out of the YAML); the coordinator refuses to start if it is unset "
        "or empty",
    )
    max_in_flight: int = Field(
        default=1024,
        ge=1,
        description="generation requests the coordinator forwards at once (admission control); "
        "more wait in a queue of max_queued",
    )
    max_queued: int = Field(
        default=256,
        ge=0,
        description="generation requests that may wait for an in-flight slot; when the queue is "
        "full an arriving request displaces the newest queued one of lower x-request-priority, "
        "or is refused with 429 and Retry-After. 0: no queue, refuse at once",
    )
    queue_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="longest wait in the admission queue before a 429 (Retry-After is this, "
        "rounded up to whole seconds)",
    )
    aliases: dict[str, str | list[AliasTarget]] = Field(
        default_factory=dict,
        description="public name -> served name (a model or an adapter), the body's 'model' "
        "rewritten before forwarding; a list of {model, weight} splits the name's requests by "
        "weight (a canary)",
    )
    canary_seed: int | None = Field(
        default=None, description="seed of the canary split's random draws (tests); none: random"
    )
    decision_log_per_s: float = Field(
        default=100.0,
        ge=0,
        description="at most this many 'Got pod scores' decision lines a second (INFO); above "
        "it, one line per second says how many were left out (and "
        "pd_coordinator_decision_lines_skipped_total counts them); retries and requests whose "
        "latency target no endpoint meets are always logged. 0: every decision",
    )
    adapter_refresh_s: float = Field(
        default=30.0,
        ge=0,
        description="with pools: ask every worker's /v1/models this often for the LoRA adapters "
        "it serves (vLLM lists each with its base model as parent), beside those in the "
        "config; 0: the config's only",
    )


class CoordinatorConfig(CoordinatorEdge):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    reuse_port: bool = Field(
        default=False,
        description="open the port with SO_REUSEPORT, so that several coordinator processes "
        "(replicas) share it and the kernel spreads new connections across them (the launcher "
        "sets it from the deployment's coordinator.replicas)",
    )
    models: list[str] = Field(
        default_factory=list,
        description="served model names clients may ask for (one pool: every endpoint serves "
        "them all); with ``pools``, leave empty",
    )
    endpoints: list[EndpointConfig] = Field(default_factory=list)
    scheduler: SchedulerConfig = SchedulerConfig()
    pools: list[PoolConfig] = Field(
        default_factory=list,
        description="several models behind one gateway: one pool per served model, each with "
        "its own endpoints and (optionally) policy; replaces ``models`` and ``endpoints``",
    )
    discovery: DiscoveryConfig = Field(
        default_factory=DiscoveryConfig,
        description="where endpoints come from: 'static' (the endpoints above) or 'kubernetes' "
        "(worker pods by label, added and removed while serving; the endpoints above stay)",
    )
    observability: ObservabilityConfig = Field(
        default_factory=ObservabilityConfig,
        description="traces: the OTLP endpoint (off by default) and the service name's prefix",
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="longest wait for any read from a decode sidecar (seconds): for the whole "
        "answer of a non-streaming request, between chunks of a streamed one",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_byte_timeout_s: float = Field(
        default=180.0,
        gt=0,
        description="streamed requests: longest wait for the decode sidecar's response headers "
        "(its prefill hop included) before the attempt is failed over to another endpoint. Keep "
        "it above the sidecars' prefill timeout (120 s by default), so that a slow prefill falls "
        "back to local decoding instead. Non-streaming requests answer only when done, so "
        "request_timeout_s bounds them",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="decode endpoints tried per request: when forwarding fails before any byte "
        "reached the client (connect error, reset, timeout, or a 502/503/504 from the sidecar), "
        "the endpoint is reported to the scheduler and the request is scheduled again on another "
        "one. 1: no failover. A stream that breaks midway is never retried",
    )
    max_tokens_limit: int = Field(
        default=2**24,
        ge=1,
        description="largest max_tokens / max_completion_tokens accepted before a request is "
        "scheduled (400 above it). The default (16,777,216) is above any context window served "
        "today and only stops absurd values; vLLM still checks against the real context length",
    )
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys accepted as 'Authorization: Bearer KEY'; empty (and no "
        "api_keys_env): no authentication. When on, every path but /health and /metrics needs a "
        "key (401 otherwise). Keys are compared in constant time and never logged",
    )

    @field_validator("api_keys")
    @classmethod
    def _non_empty_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value() for key in value):
            raise ValueError("API keys must not be empty strings")
        return value

    @field_serializer("api_keys", when_used="json")
    def _dump_keys(self, value: list[SecretStr]) -> list[str]:
        # JSON/YAML dumps (the launcher's coordinator.yaml) must round-trip; repr() stays masked.
        return [key.get_secret_value() for key in value]

    @model_validator(mode="after")
    def _has_decode_and_unique_names(self) -> CoordinatorConfig:
        if self.pools:
            self._check_pools()
        else:
            if not self.models:
                raise ValueError("models: at least one served model name is required")
            if any(e.adapters for e in self.endpoints):
                raise ValueError("endpoints: LoRA adapters need pools (one pool is enough)")
            # With discovery, decode endpoints may all arrive (and leave) while serving.
            if not self.discovery.dynamic and not any(e.role == "decode" for e in self.endpoints):
                raise ValueError("endpoints: at least one endpoint with role 'decode' is required")
        names = [e.name for e in self.all_endpoints]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"endpoints: duplicate names {duplicates}")
        self._check_aliases()
        return self

    def _check_pools(self) -> None:
        if self.models or self.endpoints:
            raise ValueError("pools: give either pools or models + endpoints, not both")
        if self.discovery.dynamic:
            raise ValueError("pools: only static discovery is supported with several pools")
        served: list[str] = []
        for i, pool in enumerate(self.pools):
            if not any(e.role == "decode" for e in pool.endpoints):
                raise ValueError(f"pools[{i}] ({pool.model}): at least one decode endpoint")
            served += [pool.model, *pool.adapters]
        duplicates = sorted({n for n in served if served.count(n) > 1})
        if duplicates:
            raise ValueError(f"pools: names served twice (models or adapters) {duplicates}")

    def _check_aliases(self) -> None:
        served = set(self.served_names)
        for name, target in self.aliases.items():
            if name in served:
                raise ValueError(f"aliases.{name}: shadows a served model or adapter")
            targets = [target] if isinstance(target, str) else [t.model for t in target]
            if not targets:
                raise ValueError(f"aliases.{name}: no target")
            unknown = sorted(set(targets) - served)
            if unknown:
                raise ValueError(
                    f"aliases.{name}: {unknown} not served here (served: {sorted(served)})"
                )

    @property
    def all_endpoints(self) -> list[EndpointConfig]:
        """Every configured endpoint, of every pool."""
        if not self.pools:
            return list(self.endpoints)
        return [e for pool in self.pools for e in pool.endpoints]

    @property
    def served_names(self) -> list[str]:
        """Names a worker answers to: models and LoRA adapters (aliases not included)."""
        if not self.pools:
            return list(self.models)
        return [name for pool in self.pools for name in (pool.model, *pool.adapters)]

    def by_role(self, role: str) -> list[EndpointConfig]:
        return [e for e in self.all_endpoints if e.role == role]
