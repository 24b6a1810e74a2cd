"""Where traces go: one section, the same in a deployment and in a coordinator's own config.

The launcher hands it on: the coordinator reads it from its config, the sidecars and the workers
get it as the standard OpenTelemetry variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``), and the worker command turns vLLM's own tracing on
(:mod:`pd_runtime.worker.command`). See :mod:`pd_runtime.common.tracing`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ObservabilityConfig"]


class ObservabilityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP base URL of a trace collector (e.g. http://otel-collector:4318; "
        "spans go to /v1/traces). None: no traces, unless OTEL_EXPORTER_OTLP_ENDPOINT is set in "
        "a process's environment",
    )
    service_name_prefix: str = Field(
        default="pd-",
        description="prefix of each process's service.name: PREFIXcoordinator, PREFIXsidecar, "
        "PREFIXvllm-prefill, PREFIXvllm-decode",
    )

    def service_name(self, part: str) -> str:
        return f"{self.service_name_prefix}{part}"
