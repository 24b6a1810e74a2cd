"""Run one part's process and keep it running: used by both launchers (local and Ray).

A :class:`PartSupervisor` starts the part's command (its own process group, SIGTERM'd by the
kernel if the supervisor dies, so a killed launcher or actor leaves no orphan vLLM), logs to a
file, and restarts the process when it exits, with a back-off that doubles with each restart in
the crash-loop window::

    start ──▶ running ──exit──▶ restarting (1 s) ──▶ running ──exit──▶ restarting (2 s) ──▶ ...
                                     N restarts within window_s ──exit──▶ crash-looping: give up
                                     (local: ``up`` stops and names the part; Ray: the actor
                                      exits and Ray restarts it if max_restarts allows)

Restarts older than the window are forgotten, so a part that dies once a day is restarted
forever, at once, while one that dies at every start is given up on after N tries.

A restarted vLLM worker is a new engine (new NIXL engine id, KV events from sequence 0); the
coordinator takes it back on its next good scrape, as it does for the local launcher's restarts.

It is a plain class (no Ray import), so it is tested without a cluster; the Ray launcher wraps it
with ``ray.remote``. Every method is cheap and thread-safe: the actor serves them concurrently.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

__all__ = ["PartState", "PartStatus", "PartSupervisor"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _child_setup(
    niceness: int | None, cpu_affinity: tuple[int, ...] = ()
) -> None:  # in the child, between fork and exec
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if niceness is not None:  # lowering it needs CAP_SYS_NICE; without, the part keeps the actor's
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
    if cpu_affinity:  # a GPU worker on its GPUs' NUMA node; inherited by vLLM's children
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpu_affinity)


PartState = Literal["running", "restarting", "crash-looping", "stopped"]


@dataclass(frozen=True)
class PartStatus:
    name: str
    hostname: str
    pid: int | None  # the part's process now; None between a death and its restart
    alive: bool
    restarts: int  # restarts by this supervisor (a restarted actor counts from 0 again)
    last_exit: int | None  # return code of the last process that ended
    gave_up: bool
    log_path: str
    state: PartState = "running"
    recent_restarts: int = 0  # restarts within the crash-loop window


class PartSupervisor:
    """Start ``argv`` with ``env`` (over this process's environment) and supervise it.

    ``files``: path -> text written before the first start (the coordinator's YAML, which the
    driver cannot write on a remote node). ``cwd``: the directory the command runs in, when it
    exists here (the driver's, so that relative model paths mean the same). ``niceness``: set on
    the part's process (Ray runs its workers at niceness 15, which a serving process should not
    inherit; 0 brings it back to normal where permitted). ``drop_env``: variables removed from the inherited
    environment (e.g. ``CUDA_VISIBLE_DEVICES`` from a plan made for another machine, so that the
    GPUs Ray assigned to this actor win). ``cpu_affinity``: cores the part's process tree is
    pinned to. ``max_process_restarts`` restarts within ``crash_loop_window_s`` (None: ever)
    make it give up. ``on_event``: called with a one-line message at each exit and restart (the
    local launcher prints them; default: this module's logger).
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: str,
        *,
        files: dict[str, str] | None = None,
        cwd: str | None = None,
        niceness: int | None = None,
        drop_env: tuple[str, ...] = (),
        max_process_restarts: int = 5,
        crash_loop_window_s: float | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        exit_on_give_up: bool = True,
        cpu_affinity: tuple[int, ...] = (),
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        base = {k: v for k, v in os.environ.items() if k not in drop_env}
        self.env = {**base, **env}
        self.log_path = Path(log_path)
        self.cwd = cwd if cwd and Path(cwd).is_dir() else None
        self.niceness = niceness
        self.max_process_restarts = max_process_restarts
        self.crash_loop_window_s = crash_loop_window_s
        self.cpu_affinity = tuple(cpu_affinity)
        self.on_event = on_event
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.exit_on_give_up = exit_on_give_up
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._restarts = 0
        self._restart_times: deque[float] = deque()  # monotonic times of restarts in the window
        self._waiting_restart = False
        self._last_exit: int | None = None
        self._gave_up = False
        for path, text in (files or {}).items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._spawn()
        # The monitor thread also spawns restarts: it lives as long as the supervisor, which
        # matters because PR_SET_PDEATHSIG fires when the *thread* that forked the child exits.
        self._monitor = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)
        self._monitor.start()

    # -- queries -----------------------------------------------------------------------------

    def status(self) -> PartStatus:
        with self._lock:
            process = self._process
            alive = process is not None and process.poll() is None
            state: PartState = "running" if alive else "stopped"
            if self._gave_up:
                state = "crash-looping"
            elif self._waiting_restart or (not alive and not self._stopping.is_set()):
                state = "restarting"
            return PartStatus(
                name=self.name,
                hostname=socket.gethostname(),
                pid=process.pid if alive and process is not None else None,
                alive=alive,
                restarts=self._restarts,
                last_exit=self._last_exit,
                gave_up=self._gave_up,
                log_path=str(self.log_path),
                state=state,
                recent_restarts=len(self._restart_times),
            )

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The part's process now (a restart replaces it)."""
        with self._lock:
            return self._process

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    # -- control -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM the part's process group and restart it no more; :meth:`stop` waits for it.
        (Several parts stop in parallel: request_stop each, then stop each.)"""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None:
            _signal_group(process, signal.SIGTERM)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the part's process group, SIGKILL it after ``grace_s``; no restart after."""
        self.request_stop()
        with self._lock:
            process = self._process
        if process is None:
            return self._last_exit
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs; killing it", self.name, grace_s)
        _signal_group(process, signal.SIGKILL)  # also reaps grandchildren left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        self._monitor.join(timeout=5)
        if self._log is not None:
            self._log.close()
        return process.returncode

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self) -> None:
        if self._log is None or self._log.closed:
            self._log = self.log_path.open("ab")
        process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.cwd,
            preexec_fn=functools.partial(_child_setup, self.niceness, self.cpu_affinity),
        )
        with self._lock:
            self._process = process

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                process = self._process
            if process is None or process.poll() is None:
                self._stopping.wait(0.5)
                continue
            code = process.returncode
            _signal_group(process, signal.SIGKILL)  # the engine core may outlive the API server
            now = time.monotonic()
            with self._lock:
                self._last_exit = code
                window = self.crash_loop_window_s
                while (
                    window is not None
                    and self._restart_times
                    and (now - self._restart_times[0] > window)
                ):
                    self._restart_times.popleft()
                recent = len(self._restart_times) if window is not None else self._restarts
                if recent >= self.max_process_restarts:
                    self._gave_up = True
                else:
                    self._waiting_restart = True
            if self._gave_up:
                self._give_up(code)
                return
            delay = min(self.max_backoff_s, self.backoff_s * 2**recent)
            self._event(
                f"{self.name} exited with code {code}; restarting in {delay:.0f}s "
                f"(restart {self._restarts + 1}"
                + (f", {recent + 1} within {window:.0f}s" if window is not None else "")
                + ")"
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self._restarts += 1
                self._restart_times.append(time.monotonic())
            self._spawn()
            with self._lock:
                self._waiting_restart = False
                pid = self._process.pid if self._process is not None else None
            self._event(f"{self.name} restarted (pid {pid})")

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)
        else:
            logger.warning("%s", message)

    def _give_up(self, code: int | None) -> None:
        window = self.crash_loop_window_s
        self._event(
            f"{self.name} exited with code {code} after {self._restarts} restarts"
            + (f" ({len(self._restart_times)} within {window:.0f}s)" if window is not None else "")
            + "; crash-looping, giving up"
        )
        if self.exit_on_give_up:
            # Ends the actor process: Ray restarts the actor (a fresh supervisor) while its
            # max_restarts allow, else the launcher sees it dead and stops the deployment.
            os._exit(1)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
