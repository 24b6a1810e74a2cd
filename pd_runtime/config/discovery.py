"""Where the coordinator (and a sidecar's prefiller allow-list) learns its endpoints from.

``type: static`` (the default) is today's fixed list under ``coordinator.endpoints``.
``type: kubernetes`` lists and watches worker pods by label in one namespace; every ready pod
with a role label becomes an endpoint (see :mod:`pd_runtime.discovery.kubernetes` for how a pod
maps to an endpoint), and the endpoints in ``coordinator.endpoints``, if any, stay as fixed extras.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DiscoveryConfig"]


class DiscoveryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(
        default="static",
        description="a name from pd_runtime.discovery.registry.DISCOVERY (checked by "
        "pd_runtime.registries at start-up)",
    )
    namespace: str | None = Field(
        default=None,
        description="kubernetes: the namespace watched; default: the pod's own (the service "
        "account's namespace file), else $POD_NAMESPACE, else 'default'",
    )
    label_selector: str = Field(
        default="app.kubernetes.io/part-of=pd-runtime",
        description="kubernetes: which pods are workers (a Kubernetes label selector)",
    )
    role_label: str = Field(
        default="pd-runtime/role",
        description="kubernetes: the label whose value (prefill or decode) is the pod's role; "
        "pods without it, or with another value, are ignored",
    )
    port_name: str = Field(
        default="http",
        description="kubernetes: the container port requests are sent to (prefill: vLLM; "
        "decode: the sidecar); annotation pd-runtime/port overrides it",
    )
    vllm_port_name: str = Field(
        default="vllm",
        description="kubernetes: the container port of vLLM itself when it differs from the "
        "serving port (decode pods: the sidecar serves, vLLM is behind it); it makes the "
        "endpoint's address (scores, KV-event topic, /metrics); annotation pd-runtime/vllm-port "
        "overrides it; absent: the serving port",
    )
    kv_events_port_name: str = Field(
        default="kv-events",
        description="kubernetes: the container port where the worker publishes KV events "
        "(it binds; the coordinator connects); annotation pd-runtime/kv-events-port overrides it",
    )
    kv_events_replay_port_name: str = Field(
        default="kv-replay",
        description="kubernetes: the worker's KV-event replay port (optional); annotation "
        "pd-runtime/kv-events-replay-port overrides it",
    )
    resync_period_s: float = Field(
        default=600.0,
        gt=0,
        description="kubernetes: list the pods again this often (between watches), which "
        "corrects anything a watch could have missed",
    )
    watch_timeout_s: float = Field(
        default=240.0,
        ge=1,
        description="kubernetes: each watch request ends after this long (server side) and is "
        "resumed from the last resourceVersion seen; a 410 Gone answer means a relist",
    )
    api_server: str | None = Field(
        default=None,
        description="kubernetes: API server URL (e.g. from `kubectl proxy`); default: the "
        "in-cluster service account, else the kubeconfig",
    )
    kubeconfig: str | None = Field(
        default=None, description="kubernetes: a kubeconfig file (outside a cluster)"
    )
    initial_sync_timeout_s: float = Field(
        default=10.0,
        ge=0,
        description="kubernetes: how long start-up waits for the first pod list before serving "
        "without it (it keeps retrying in the background)",
    )
    backoff_initial_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)

    @property
    def dynamic(self) -> bool:
        """True when endpoints come and go while serving (anything but ``static``)."""
        return self.type != "static"
