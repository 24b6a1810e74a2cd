"""Turn a worker description into the vLLM command line and environment that runs it.

The P/D essentials every worker gets:
  * ``--kv-transfer-config`` with NixlConnector (or, with ``kv_staging_mib``, pd-runtime's
    staging subclass of it), ``kv_producer`` (prefill) / ``kv_consumer``
    (decode) / ``kv_both``, and the KV buffer on the platform's device (``cpu`` here, ``cuda`` on GPUs);
  * ``VLLM_NIXL_SIDE_CHANNEL_HOST/PORT`` so the decode side can fetch the prefill's NIXL metadata;
  * ``--kv-events-config`` publishing block events over ZMQ with topic ``kv@HOST:PORT@MODEL``
    (vLLM connects to ``tcp://HOST:PORT``, where the coordinator's subscriber listens: nothing
    is bound on a public interface; with several coordinator replicas vLLM binds an ``ipc://``
    path, or ``tcp://*:PORT`` across nodes, and every replica connects);
  * a block size the platform accepts (a multiple of 32 on CPU);
  * the UCX transport chosen by :mod:`pd_runtime.worker.transport`;
  * on CPU, a poll timeout for NIXL's UCX progress thread (see :mod:`pd_runtime.worker.vllm_plugin`),
    without which every worker spins a core;
  * with an OTLP endpoint (``otlp_endpoint``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` in the
    environment), vLLM's own tracing: ``--otlp-traces-endpoint`` over HTTP/protobuf, so each
    request's ``llm_request`` span continues the ``traceparent`` the sidecar sends.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from pd_runtime.common.tracing import SERVICE_ENV, resolve_endpoint, traces_url
from pd_runtime.errors import ConfigError
from pd_runtime.platform import UcxErrorHandling
from pd_runtime.worker.transport import RdmaPort, ucx_environment
from pd_runtime.worker.vllm_plugin import DELAY_ENV as NIXL_PROGRESS_DELAY_ENV
from pd_runtime.worker.vllm_plugin import INIT_AMX_ENV, PLUGIN_NAME, UCX_ERROR_HANDLING_ENV

__all__ = [
    "CPU_NIXL_PROGRESS_DELAY_US",
    "KV_ROLES",
    "WorkerSpec",
    "build_worker_command",
    "default_block_size",
    "kv_events_topic",
]

Role = Literal["prefill", "decode", "both"]
KV_ROLES: dict[str, str] = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}
# 1 ms: the progress thread still wakes at once on UCX events; the timeout only bounds how long a
# missed wake-up can stall it. Measured idle cost with it: ~6 % of a core per worker instead of 100 %.
CPU_NIXL_PROGRESS_DELAY_US = 1000
# pd-runtime's staging connector, loaded by vLLM through kv_connector_module_path, and the key of
# its settings in kv_connector_extra_config (and of a staged slot in kv_transfer_params).
STAGING_CONNECTOR = "PdStagingConnector"
STAGING_CONNECTOR_MODULE = "pd_runtime.worker.staging_connector"
STAGING_KEY = "pd_staging"


def default_block_size(platform: str) -> int:
    return 32 if platform == "cpu" else 16


def kv_events_topic(host: str, port: int, model: str) -> str:
    return f"kv@{host}:{port}@{model}"


@dataclass(frozen=True)
class WorkerSpec:
    role: Role
    model: str
    port: int
    platform: Literal["cpu", "cuda"]
    host: str = "127.0.0.1"
    served_model_name: str | None = None
    side_channel_port: int = 5600
    kv_events_port: int | None = 5557
    kv_events_replay_port: int | None = None  # vLLM binds its replay ROUTER here (loopback ok)
    # Where the coordinator's subscriber listens (vLLM connects there); default: ``host``. On a
    # multi-node cluster it is the coordinator's node, while ``host`` stays this worker's own.
    kv_events_host: str | None = None
    # The PUB socket's endpoint as it is, instead of tcp://kv_events_host:kv_events_port: an
    # ``ipc://`` path, which vLLM binds, so that several coordinator replicas on this machine
    # connect to one publisher that listens on no network interface.
    kv_events_endpoint: str | None = None
    block_size: int | None = None
    max_model_len: int | None = None
    enforce_eager: bool = True
    tensor_parallel_size: int = 1
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float | None = None
    cpu_cores: str | None = None  # VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or "0-3"
    gpu_ids: str | None = None  # CUDA_VISIBLE_DEVICES
    ucx_tls: str | None = None
    ucx_net_devices: str | None = None
    rdma_ports: tuple[RdmaPort, ...] | None = None  # None: every port sysfs lists when built
    gdr_copy: bool = False  # add gdr_copy to UCX_TLS (cuda over RDMA, GDRCopy driver present)
    nixl_num_threads: int | None = None  # NIXL UCX worker threads (vLLM's default: 4)
    nixl_progress_delay_us: int | None = None  # None: CPU_NIXL_PROGRESS_DELAY_US on cpu
    ucx_error_handling: UcxErrorHandling | None = None  # None: NIXL's (peer)
    kv_lease_s: int | None = None  # prefill keeps unpulled KV blocks this long (vLLM's default: 30)
    # pd-runtime's staging connector (worker/staging_connector.py) with a buffer of this many MiB;
    # None: vLLM's NixlConnector, one descriptor per (layer, block).
    kv_staging_mib: int | None = None
    kv_staging_max_descriptor_bytes: int | None = None  # None: StagingSettings' default
    # Prefill: head ranges per slot, one per decode rank reading from this rank (decode TP /
    # prefill TP); None: 1.
    kv_staging_reader_splits: int | None = None
    # Prefill: free a packed request's blocks at once (every decode reading from it stages).
    kv_staging_release: bool = False
    otlp_endpoint: str | None = None  # OTLP/HTTP base URL: vLLM's traces go there
    service_name: str | None = None  # their service.name; default vllm-ROLE
    extra_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def name_for_clients(self) -> str:
        return self.served_model_name or self.model

    @property
    def effective_block_size(self) -> int:
        size = self.block_size or default_block_size(self.platform)
        if self.platform == "cpu" and size % 32:
            raise ConfigError(
                f"block_size: {size} is not a multiple of 32, which vLLM-CPU requires"
            )
        return size


def build_worker_command(
    spec: WorkerSpec, environ: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """Return ``(argv, env_updates)`` for vLLM's OpenAI server; the caller merges env into its own."""
    if spec.role not in KV_ROLES:
        raise ConfigError(f"role: {spec.role!r} is not one of {sorted(KV_ROLES)}")
    kv_transfer: dict[str, object] = {
        "kv_connector": "NixlConnector",
        "kv_role": KV_ROLES[spec.role],
        "kv_buffer_device": "cpu" if spec.platform == "cpu" else "cuda",
        # A KV pull that fails (the prefill worker died between its answer and the pull:
        # NIXL_ERR_REMOTE_DISCONNECT) is recomputed on the decode worker, like the sidecar's
        # local-prefill fallback, instead of vLLM's default: failing the request with a 500.
        "kv_load_failure_policy": "recompute",
    }
    extra: dict[str, object] = {}
    if spec.nixl_num_threads is not None:
        extra["num_threads"] = spec.nixl_num_threads
    if spec.kv_lease_s is not None:
        extra["kv_lease_duration"] = spec.kv_lease_s
    if spec.kv_staging_mib is not None:
        kv_transfer["kv_connector"] = STAGING_CONNECTOR
        kv_transfer["kv_connector_module_path"] = STAGING_CONNECTOR_MODULE
        staging: dict[str, int | bool] = {"buffer_mib": spec.kv_staging_mib}
        if spec.kv_staging_max_descriptor_bytes is not None:
            staging["max_descriptor_bytes"] = spec.kv_staging_max_descriptor_bytes
        if spec.kv_staging_reader_splits is not None:
            staging["reader_splits"] = spec.kv_staging_reader_splits
        if spec.kv_staging_release:
            staging["release_blocks"] = True
        extra[STAGING_KEY] = staging
    if extra:
        kv_transfer["kv_connector_extra_config"] = extra
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        spec.model,
        "--served-model-name",
        spec.name_for_clients,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--block-size",
        str(spec.effective_block_size),
        "--kv-transfer-config",
        json.dumps(kv_transfer),
        "--enable-prefix-caching",
    ]
    if spec.kv_events_port is not None:
        kv_events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": spec.kv_events_endpoint
            or f"tcp://{spec.kv_events_host or spec.host}:{spec.kv_events_port}",
            "topic": kv_events_topic(spec.host, spec.port, spec.name_for_clients),
        }
        if spec.kv_events_replay_port is not None:
            kv_events["replay_endpoint"] = f"tcp://{spec.host}:{spec.kv_events_replay_port}"
        argv += ["--kv-events-config", json.dumps(kv_events)]
    if spec.max_model_len:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.enforce_eager:
        argv.append("--enforce-eager")
    if spec.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    if spec.gpu_memory_utilization is not None and spec.platform == "cuda":
        argv += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
    environ_ = os.environ if environ is None else environ
    otlp = resolve_endpoint(spec.otlp_endpoint, environ_)
    if otlp is not None:
        argv += ["--otlp-traces-endpoint", traces_url(otlp)]
    argv += list(spec.extra_args)

    env = {
        "VLLM_NIXL_SIDE_CHANNEL_HOST": spec.host,
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(spec.side_channel_port),
        "PYTHONUNBUFFERED": "1",
    }
    if otlp is not None:
        # vLLM's exporter speaks gRPC unless told otherwise; ours, and the URL above, are HTTP.
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
        env[SERVICE_ENV] = spec.service_name or environ_.get(SERVICE_ENV) or f"vllm-{spec.role}"
    env.update(
        ucx_environment(
            spec.platform,
            override_tls=spec.ucx_tls,
            override_net_devices=spec.ucx_net_devices,
            ports=list(spec.rdma_ports) if spec.rdma_ports is not None else None,
            environ=environ,
            gdr_copy=spec.gdr_copy,
        )
    )
    if spec.platform == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_cores or "nobind"
        env[INIT_AMX_ENV] = "1"  # no SIGILL in vLLM-CPU's AMX attention: see vllm_plugin.py
        if spec.kv_cache_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{spec.kv_cache_gib:g}"
    elif spec.gpu_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec.gpu_ids
    delay = spec.nixl_progress_delay_us
    if delay is None and spec.platform == "cpu":
        delay = CPU_NIXL_PROGRESS_DELAY_US
    if delay is not None:
        env[NIXL_PROGRESS_DELAY_ENV] = str(delay)
    if spec.ucx_error_handling is not None:
        env[UCX_ERROR_HANDLING_ENV] = spec.ucx_error_handling
    if delay is not None or INIT_AMX_ENV in env or UCX_ERROR_HANDLING_ENV in env:
        # An operator's VLLM_PLUGINS allow-list would otherwise keep our plugin out.
        allowed = environ_.get("VLLM_PLUGINS")
        if allowed and PLUGIN_NAME not in allowed.split(","):
            env["VLLM_PLUGINS"] = f"{allowed},{PLUGIN_NAME}"
    env.update(spec.extra_env)
    return argv, env
