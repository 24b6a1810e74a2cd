"""Run a deployment plan as local processes and supervise them.

Start order: workers (one at a time unless ``parallel_startup``) → sidecars → coordinator; each stage waits
until its parts answer ``GET /health``. Every process gets its own process group (so stopping it also
stops vLLM's engine-core child) and asks the kernel to SIGTERM it if the launcher dies, so a killed
launcher leaves no orphans. A part that exits during start-up aborts the launch with the tail of its
log in the error.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

import httpx

from pd_runtime.config.loader import dump_yaml
from pd_runtime.errors import LaunchError
from pd_runtime.launcher.topology import DeploymentPlan, PartKind, PartSpec

__all__ = ["LocalLauncher", "RunningPart", "log_tail"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _child_setup(cpu_affinity: tuple[int, ...] = ()) -> None:  # in the child, between fork and exec
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if cpu_affinity:  # a GPU worker on its GPUs' NUMA node; inherited by vLLM's children
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpu_affinity)


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


class RunningPart:
    def __init__(
        self, spec: PartSpec, process: subprocess.Popen[bytes], log_path: Path, log_file: IO[bytes]
    ) -> None:
        self.spec = spec
        self.process = process
        self.log_path = log_path
        self._log_file = log_file

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def close_log(self) -> None:
        self._log_file.close()


class LocalLauncher:
    def __init__(
        self,
        plan: DeploymentPlan,
        run_dir: Path,
        *,
        startup_timeout_s: float = 300.0,
        parallel_startup: bool = False,
        progress: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.startup_timeout_s = startup_timeout_s
        self.parallel_startup = parallel_startup
        self.progress = progress
        self.parts: list[RunningPart] = []

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
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every part (front door first), then SIGKILL what is left after ``grace_s``."""
        self._terminate(list(reversed(self.parts)), grace_s)
        self.parts.clear()

    def restart(self, name: str, grace_s: float = 20.0) -> RunningPart:
        """Stop one part if it still runs and start it again from its spec; wait until healthy.

        A restarted vLLM worker is a new engine (new NIXL engine id, KV events from sequence 0):
        its peers and the coordinator must take it back as such, which is what this exercises.
        """
        old = next((p for p in self.parts if p.spec.name == name), None)
        if old is None:
            raise LaunchError(f"no part named {name!r}")
        self._terminate([old], grace_s)
        self.parts.remove(old)
        part = self._spawn(old.spec)
        self._wait_healthy([part])
        return part

    def _terminate(self, parts: list[RunningPart], grace_s: float) -> None:
        for part in parts:
            part.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for part in parts:
            try:
                part.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0fs; killing it", part.spec.name, grace_s)
            part.signal(signal.SIGKILL)  # also reaps grandchildren left in the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                part.process.wait(timeout=5)
            part.close_log()

    def __enter__(self) -> LocalLauncher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait(self, poll_s: float = 1.0) -> RunningPart:
        """Block until some part exits; return it (the caller decides to stop the rest)."""
        while True:
            for part in self.parts:
                if not part.alive:
                    return part
            time.sleep(poll_s)

    # -- internals -----------------------------------------------------------------------------

    def _spawn(self, spec: PartSpec) -> RunningPart:
        log_path = self.run_dir / f"{spec.name}.log"
        log_file = log_path.open("ab")
        env = {**os.environ, **spec.env}
        process = subprocess.Popen(
            spec.argv,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=functools.partial(_child_setup, spec.cpu_affinity),
        )
        part = RunningPart(spec, process, log_path, log_file)
        self.parts.append(part)
        self.progress(
            f"started {spec.name} (pid {process.pid}, {spec.placement or spec.kind}), "
            f"log {log_path}"
        )
        return part

    def _wait_healthy(self, parts: Iterable[RunningPart]) -> None:
        pending = {p.spec.name: p for p in parts}
        deadline = time.monotonic() + self.startup_timeout_s
        started = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for name, part in list(pending.items()):
                    if not part.alive:
                        raise LaunchError(
                            f"{name} exited with code {part.process.returncode} during start-up; "
                            f"last lines of {part.log_path}:\n{log_tail(part.log_path)}"
                        )
                    try:
                        healthy = client.get(f"{part.spec.url}/health").status_code == 200
                    except httpx.HTTPError:
                        healthy = False
                    if healthy:
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
