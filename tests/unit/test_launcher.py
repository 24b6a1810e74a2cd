"""The local launcher's supervision, with small stand-in processes (the same code path starts vLLM;
what is under test here is start order, health waiting, failure reporting and clean shutdown)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from pd_runtime.cli import main as cli_main
from pd_runtime.config import CoordinatorConfig
from pd_runtime.config.launcher import RestartConfig
from pd_runtime.errors import LaunchError
from pd_runtime.launcher.base import LocalBackend
from pd_runtime.launcher.local import LocalLauncher
from pd_runtime.launcher.status import STATUS_FILE
from pd_runtime.launcher.topology import DeploymentPlan, PartSpec
from tests.servers import free_port, wait_for

# Serves GET /health, and leaves a grandchild running (like vLLM's engine core) whose pid it records.
HEALTHY = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(child.pid))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""
CRASHES = "import sys, time; time.sleep(1); print('CUDA out of memory (pretend)'); sys.exit(3)"


def part(name: str, kind: str, script: str, *args: str) -> PartSpec:
    port = free_port()
    argv = [sys.executable, "-c", script, str(port), *args]
    return PartSpec(name, kind, argv, {}, "127.0.0.1", port)  # type: ignore[arg-type]


def plan(tmp_path: Path, parts: list[PartSpec]) -> DeploymentPlan:
    coordinator = CoordinatorConfig.model_validate(
        {
            "models": ["m"],
            "endpoints": [{"name": "d", "role": "decode", "address": "h:1", "url": "http://h:1"}],
        }
    )
    return DeploymentPlan(parts, coordinator, tmp_path / "coordinator.yaml", tmp_path)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_start_waits_for_health_and_stop_leaves_no_orphans(tmp_path: Path) -> None:
    pids = tmp_path / "grandchild.pid"
    parts = [
        part("w", "worker", HEALTHY, str(pids)),
        part("coordinator", "coordinator", HEALTHY, str(tmp_path / "c.pid")),
    ]
    launcher = LocalLauncher(plan(tmp_path, parts), tmp_path, startup_timeout_s=30, warm_up=False)
    launcher.start()
    processes = [p.process.pid for p in launcher.parts]
    grandchild = int(pids.read_text())
    assert all(alive(pid) for pid in [*processes, grandchild])
    assert (tmp_path / "coordinator.yaml").exists()
    launcher.stop(grace_s=5)
    time.sleep(0.2)
    assert not any(alive(pid) for pid in [*processes, grandchild])


def test_a_part_that_dies_at_startup_aborts_the_launch_with_its_log(tmp_path: Path) -> None:
    healthy = part("decode-0", "worker", HEALTHY, str(tmp_path / "g.pid"))
    parts = [healthy, part("prefill-0", "worker", CRASHES)]
    launcher = LocalLauncher(plan(tmp_path, parts), tmp_path, startup_timeout_s=30, warm_up=False)
    with pytest.raises(LaunchError) as excinfo:
        launcher.start()
    message = str(excinfo.value)
    assert "prefill-0 exited with code 3" in message
    assert "CUDA out of memory (pretend)" in message
    assert launcher.parts == []
    time.sleep(0.2)
    assert not alive(int((tmp_path / "g.pid").read_text()))


def test_a_part_that_never_gets_healthy_times_out(tmp_path: Path) -> None:
    stuck = "print('Initializing NIXL worker (pretend)', flush=True); import time; time.sleep(60)"
    silent = part("decode-0", "worker", stuck)
    launcher = LocalLauncher(
        plan(tmp_path, [silent]), tmp_path, startup_timeout_s=1.5, warm_up=False
    )
    with pytest.raises(LaunchError, match="not healthy after 2s") as excinfo:
        launcher.start()
    # Where it got stuck is in the error itself: CI shows nothing else.
    assert "Initializing NIXL worker (pretend)" in str(excinfo.value)


# Writes a real vLLM-CPU start's log (captured), a line at a time, then serves /health.
REPLAYS_A_VLLM_START = (
    "import sys, time\n"
    "for line in open(sys.argv[3]):\n"
    "    print(line, end='', flush=True); time.sleep(0.005)\n"
) + HEALTHY


def test_a_starting_worker_reports_the_phases_of_its_log(tmp_path: Path) -> None:
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "vllm_startup" / "cpu-decode.log"
    worker = part("decode-0", "worker", REPLAYS_A_VLLM_START, str(tmp_path / "g"), str(fixture))
    # What an earlier start of this part wrote (the log is appended to) is not reported again.
    (tmp_path / "decode-0.log").write_text("Starting to load model old...\n")
    messages: list[str] = []
    launcher = LocalLauncher(
        plan(tmp_path, [worker]), tmp_path, startup_timeout_s=30, warm_up=False,
        progress=messages.append,
    )  # fmt: skip
    launcher.start()
    launcher.stop(grace_s=5)
    reported = [m for m in messages if m.startswith("decode-0: ")]
    labels = [m.removeprefix("decode-0: ").rsplit(" (", 1)[0] for m in reported]
    assert labels[:3] == ["vLLM API server starting", "engine starting", "loading the model"]
    assert "KV cache 524,288 tokens" in labels and labels[-1] == "HTTP server up"
    assert labels.count("loading the model") == 1
    assert all(m.endswith("s)") for m in reported)
    # Phases come between the start and the health check.
    started = next(i for i, m in enumerate(messages) if m.startswith("started decode-0"))
    healthy = next(i for i, m in enumerate(messages) if m.startswith("decode-0 healthy after"))
    assert started < messages.index(reported[0]) and messages.index(reported[-1]) < healthy


def test_restart_starts_a_part_again_and_waits_for_it(tmp_path: Path) -> None:
    parts = [part("w", "worker", HEALTHY, str(tmp_path / "g.pid"))]
    launcher = LocalLauncher(plan(tmp_path, parts), tmp_path, startup_timeout_s=30, warm_up=False)
    launcher.start()
    try:
        first = launcher.parts[0].process.pid
        os.kill(first, 9)  # the part died
        restarted = launcher.restart("w", grace_s=2)
        assert restarted.alive and restarted.process.pid != first
        assert [p.process.pid for p in launcher.parts] == [restarted.process.pid]
        with pytest.raises(LaunchError, match="no part named"):
            launcher.restart("nope")
    finally:
        launcher.stop(grace_s=5)


# Healthy for a while, then dies: a part that crashes some time after its start.
DIES_LATER = HEALTHY.replace(
    "http.server.HTTPServer(",
    "import threading, os; threading.Timer(float(sys.argv[3]), lambda: os._exit(7)).start()\n"
    "http.server.HTTPServer(",
)


def test_a_part_that_exits_is_restarted_and_the_status_file_shows_it(tmp_path: Path) -> None:
    parts = [part("w", "worker", HEALTHY, str(tmp_path / "g.pid"))]
    events: list[str] = []
    launcher = LocalLauncher(
        plan(tmp_path, parts),
        tmp_path,
        startup_timeout_s=30,
        warm_up=False,
        restarts=RestartConfig(backoff_s=0.1, max_restarts=3, window_s=60),
        progress=events.append,
    )
    launcher.start()
    watcher = threading.Thread(target=launcher.watch, kwargs={"poll_s": 0.1}, daemon=True)
    watcher.start()
    try:
        first = launcher.parts[0].process.pid
        os.kill(first, 9)  # the part died; nobody calls restart()
        wait_for(
            lambda: (
                launcher.parts[0].status().pid not in (None, first)
                and launcher.parts[0].status().state == "running"
            ),
            timeout_s=15,
            what="the supervisor's restart",
        )

        def restarted_in_status_file() -> bool:
            row = json.loads((tmp_path / STATUS_FILE).read_text())["parts"][0]
            return bool(row["restarts"] == 1 and row["healthy"] and row["last_exit"] == -9)

        wait_for(restarted_in_status_file, timeout_s=15, what="status.json")
        assert any("w exited with code -9; restarting" in e for e in events), events
        assert any("w healthy again" in e for e in events), events
        # `pd-runtime status` reads the same file: exit 0 while every part runs.
        assert cli_main(["status", "--run-dir", str(tmp_path)]) == 0
    finally:
        launcher.stop(grace_s=5)
    assert launcher.parts == []


def test_a_crash_looping_part_ends_watch_with_its_name_and_log(tmp_path: Path) -> None:
    parts = [
        part("ok", "worker", HEALTHY, str(tmp_path / "g.pid")),
        # Healthy for 3 s, then exit 7: long enough to pass start-up on a loaded machine.
        part("loop", "worker", DIES_LATER, str(tmp_path / "l.pid"), "3"),
    ]
    launcher = LocalBackend(
        plan(tmp_path, parts),
        tmp_path,
        startup_timeout_s=30,
        warm_up=False,
        restarts=RestartConfig(backoff_s=0.05, max_backoff_s=0.1, max_restarts=2, window_s=60),
    )
    launcher.start()
    try:
        started = time.monotonic()
        reason = launcher.wait_for_failure()
        assert time.monotonic() - started < 30
        assert reason.startswith("loop is crash-looping: it exited with code 7 3 times"), reason
        assert "last lines of" in reason
        status = launcher.part("loop").status()
        assert (status.state, status.restarts) == ("crash-looping", 2)
        assert launcher.part("ok").status().state == "running"  # the others are untouched
        assert cli_main(["status", "--run-dir", str(tmp_path)]) == 1
    finally:
        launcher.stop(grace_s=5)
