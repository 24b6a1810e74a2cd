"""Run a deployment plan as local processes and keep them running.

Start order: workers (one at a time unless ``parallel_startup``) → sidecars → warm-up and pair
checks (:mod:`pd_runtime.launcher.warmup`) → coordinator; each stage waits until its parts answer
``GET /health``. A part that exits during start-up aborts the launch with the tail of its log.
While a worker starts, the phases its log shows (model load, KV cache, graph capture, HTTP server:
:mod:`pd_runtime.worker.startup`) are reported through ``progress`` with the seconds elapsed.

Once started, every part runs under a :class:`~pd_runtime.launcher.supervisor.PartSupervisor`
(the same one the Ray launcher's actors run): its own process group (stopping it also stops
vLLM's engine-core child), SIGTERM'd by the kernel if the launcher dies (no orphans), and
restarted with back-off when it exits. Meanwhile the coordinator routes around it (its scraper
marks the endpoint unhealthy; requests fail over), and a restarted worker rejoins as a new
engine; the launcher warms it and re-checks its pairs once it answers again. Only a crash loop
(``restarts.max_restarts`` within ``restarts.window_s``) ends :meth:`LocalLauncher.watch`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from pd_runtime.config.launcher import RestartConfig
from pd_runtime.config.loader import dump_yaml
from pd_runtime.errors import LaunchError
from pd_runtime.launcher.status import status_row, write_status_file
from pd_runtime.launcher.supervisor import PartStatus, PartSupervisor
from pd_runtime.launcher.topology import DeploymentPlan, PartKind, PartSpec
from pd_runtime.launcher.warmup import WarmupError, warm_up
from pd_runtime.worker.startup import LogFollower, StartupPhases

__all__ = ["LocalLauncher", "RunningPart", "log_tail"]

logger = logging.getLogger(__name__)


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


class RunningPart:
    """One part and the supervisor that keeps its process running."""

    def __init__(self, spec: PartSpec, supervisor: PartSupervisor, log_offset: int = 0) -> None:
        self.spec = spec
        self.supervisor = supervisor
        self.log_path = supervisor.log_path
        # A worker's start-up phases, read from its log from where this start began writing.
        self.startup = (LogFollower(self.log_path, log_offset), StartupPhases())
        self.healthy = False  # as last probed by the launcher's watch loop
        self.warmed_pid: int | None = None  # the process the last warm-up checked

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The part's process now (a restart replaces it)."""
        process = self.supervisor.process
        assert process is not None
        return process

    @property
    def alive(self) -> bool:
        return self.supervisor.status().alive

    def status(self) -> PartStatus:
        return self.supervisor.status()

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


class LocalLauncher:
    def __init__(
        self,
        plan: DeploymentPlan,
        run_dir: Path,
        *,
        startup_timeout_s: float = 300.0,
        parallel_startup: bool = False,
        restarts: RestartConfig | None = None,
        warm_up: bool = True,
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.startup_timeout_s = startup_timeout_s
        self.parallel_startup = parallel_startup
        self.restarts = restarts or RestartConfig()
        self.warm_up = warm_up
        self.progress = progress
        self.parts: list[RunningPart] = []
        self._warming: set[str] = set()
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(self.plan.coordinator, self.plan.coordinator_config_path)
        try:
            stages: tuple[PartKind, ...] = ("worker", "sidecar", "coordinator")
            for kind in stages:
                specs = self.plan.by_kind(kind)
                if kind == "worker" and not self.parallel_startup:
                    for spec in specs:  # one NIXL agent initialising at a time
                        self._wait_healthy([self._spawn(spec)])
                else:
                    self._wait_healthy([self._spawn(spec) for spec in specs])
                if kind == "sidecar" and self.warm_up:
                    self._warm(None)
            for part in self.parts:
                part.healthy = True
                part.warmed_pid = part.process.pid
        except BaseException:
            self.stop()
            raise
        self.write_status()

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every part (front door first), then SIGKILL what is left after ``grace_s``."""
        self._terminate(list(reversed(self.parts)), grace_s)
        self.parts.clear()

    def restart(self, name: str, grace_s: float = 20.0) -> RunningPart:
        """Stop one part and start it again from its spec, at once; wait until healthy.

        A restarted vLLM worker is a new engine (new NIXL engine id, KV events from sequence 0):
        its peers and the coordinator must take it back as such, which is what this exercises.
        """
        old = self.part(name)
        self._terminate([old], grace_s)
        index = self.parts.index(old)
        part = self._spawn(old.spec)
        self.parts.remove(part)
        self.parts[index] = part
        self._wait_healthy([part])
        part.healthy = True
        part.warmed_pid = part.process.pid
        return part

    def part(self, name: str) -> RunningPart:
        found = next((p for p in self.parts if p.spec.name == name), None)
        if found is None:
            raise LaunchError(f"no part named {name!r}")
        return found

    def _terminate(self, parts: list[RunningPart], grace_s: float) -> None:
        for part in parts:  # all at once: SIGTERM every group, then wait
            part.supervisor.request_stop()
        deadline = time.monotonic() + grace_s
        for part in parts:
            part.supervisor.stop(grace_s=max(0.1, deadline - time.monotonic()))

    def __enter__(self) -> LocalLauncher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------------

    def watch(self, poll_s: float = 1.0) -> RunningPart:
        """Keep the deployment running until a part crash-loops; return that part.

        Each round: probe every part's ``/health``, re-warm a worker that was restarted once it
        answers again (in the background), and write the parts' state to ``status.json``.
        """
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                for part in list(self.parts):
                    status = part.status()
                    if status.state == "crash-looping":
                        self.write_status()
                        return part
                    part.healthy = status.alive and _healthy(client, part.spec.url)
                    if part.healthy and status.pid != part.warmed_pid:
                        self._after_restart(part, status)
                self.write_status()
                time.sleep(poll_s)

    def _after_restart(self, part: RunningPart, status: PartStatus) -> None:
        part.warmed_pid = status.pid
        self.progress(f"{part.spec.name} healthy again (pid {status.pid})")
        if part.spec.kind != "worker" or not self.warm_up:
            return
        with self._lock:
            if part.spec.name in self._warming:
                return
            self._warming.add(part.spec.name)
        threading.Thread(
            target=self._rewarm, args=(part.spec.name,), name="rewarm", daemon=True
        ).start()

    def _rewarm(self, name: str) -> None:
        try:
            self._warm(frozenset({name}))
        except WarmupError as exc:  # serving goes on; the operator sees why in the output
            self.progress(f"WARNING {exc}")
        finally:
            with self._lock:
                self._warming.discard(name)

    def _warm(self, only: frozenset[str] | None) -> None:
        coordinator = self.plan.coordinator
        if not coordinator.pools:
            warm_up(coordinator.endpoints, coordinator.models[0], only=only, progress=self.progress)
            return
        for pool in coordinator.pools:  # pairs within a model only: P and D must share weights
            names = {e.name for e in pool.endpoints}
            if only is None or only & names:
                warm_up(pool.endpoints, pool.model, only=only, progress=self.progress)

    def write_status(self) -> dict[str, Any]:
        """Every part's state into ``status.json`` (what ``pd-runtime status`` reads); returned."""
        rows = [status_row(p.spec, p.status(), p.healthy) for p in self.parts]
        return write_status_file(self.run_dir, self.plan.gateway_url, self.restarts, rows)

    # -- internals -----------------------------------------------------------------------------

    def _spawn(self, spec: PartSpec) -> RunningPart:
        policy = self.restarts
        log_path = self.run_dir / f"{spec.name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0  # the log is appended to
        supervisor = PartSupervisor(
            spec.name,
            spec.argv,
            spec.env,
            str(log_path),
            cpu_affinity=spec.cpu_affinity,
            max_process_restarts=policy.max_restarts,
            crash_loop_window_s=policy.window_s,
            backoff_s=policy.backoff_s,
            max_backoff_s=policy.max_backoff_s,
            exit_on_give_up=False,
            on_event=self.progress,
        )
        part = RunningPart(spec, supervisor, offset)
        self.parts.append(part)
        self.progress(
            f"started {spec.name} (pid {part.process.pid}, {spec.placement or spec.kind}), "
            f"log {part.log_path}"
        )
        return part

    def _wait_healthy(self, parts: Iterable[RunningPart]) -> None:
        pending = {p.spec.name: p for p in parts}
        deadline = time.monotonic() + self.startup_timeout_s
        started = time.monotonic()
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while pending:
                for name, part in list(pending.items()):
                    status = part.status()
                    if status.last_exit is not None:
                        raise LaunchError(
                            f"{name} exited with code {status.last_exit} during start-up; "
                            f"last lines of {part.log_path}:\n{log_tail(part.log_path)}"
                        )
                    if part.spec.kind == "worker":
                        self._report_phases(part, time.monotonic() - started)
                    if _healthy(client, part.spec.url):
                        del pending[name]
                        self.progress(f"{name} healthy after {time.monotonic() - started:.0f}s")
                if pending and time.monotonic() > deadline:
                    tails = "".join(
                        f"\nlast lines of {part.log_path}:\n{log_tail(part.log_path)}"
                        for _, part in sorted(pending.items())
                    )
                    raise LaunchError(
                        f"{', '.join(sorted(pending))} not healthy after "
                        f"{self.startup_timeout_s:.0f}s; see logs in {self.run_dir}{tails}"
                    )
                if pending:
                    time.sleep(0.5)

    def _report_phases(self, part: RunningPart, elapsed_s: float) -> None:
        """The start-up phases the worker's log shows since the last look (model load, KV
        cache, graph capture, HTTP server), so that minutes of a GPU start are not silent."""
        follower, phases = part.startup
        for line in follower.lines():
            label = phases.feed(line)
            if label is not None:
                self.progress(f"{part.spec.name}: {label} ({elapsed_s:.0f}s)")


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False
