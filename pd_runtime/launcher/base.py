"""The launch-backend seam: what ``pd-runtime up`` needs from whatever runs the parts.

    LAUNCHERS["local"]  processes on this machine (:class:`~pd_runtime.launcher.local.LocalLauncher`)
    LAUNCHERS["ray"]    supervisor actors in placement groups on a Ray cluster
                        (:class:`~pd_runtime.launcher.ray.RayLauncher`)

A backend is built from the deployment config by its registered factory
``(config, run_dir, progress) -> Launcher``; it plans the parts itself, because where they land
(this machine's cores, a cluster's nodes) changes their hosts and devices. Contract:

* ``start()`` returns once every part answers ``GET /health``; on failure it has stopped what it
  started and raises :class:`~pd_runtime.errors.LaunchError` with the failing part's log tail;
* ``plan`` is the plan as started (hosts as placed), valid after ``start()``;
* ``start()`` warms every worker and checks every (prefill, decode) pair before it returns
  (:mod:`pd_runtime.launcher.warmup`), unless the config's ``warm_up`` is off;
* ``wait_for_failure()`` blocks while the deployment serves, restarting parts that exit, and
  returns a one-paragraph reason once a part is gone for good (crash-looping);
* ``stop()`` is idempotent and leaves no process of the deployment behind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from pd_runtime.common.registry import Registry
from pd_runtime.config.deployment import DeploymentConfig
from pd_runtime.launcher.local import LocalLauncher, log_tail
from pd_runtime.launcher.prepare import prepare_deployment
from pd_runtime.launcher.topology import DeploymentPlan

__all__ = ["LAUNCHERS", "Launcher", "LocalBackend", "create_launcher"]


class Launcher(Protocol):
    @property
    def plan(self) -> DeploymentPlan: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def wait_for_failure(self) -> str: ...


Progress = Callable[[str], None]

LAUNCHERS: Registry[Launcher] = Registry("launcher")


class LocalBackend(LocalLauncher):
    """The local launcher under the backend contract."""

    def wait_for_failure(self) -> str:
        looping = self.watch()
        status = looping.status()
        return (
            f"{looping.spec.name} is crash-looping: it exited with code {status.last_exit} "
            f"{status.recent_restarts + 1} times within {self.restarts.window_s:.0f}s "
            f"({status.restarts} restarts in all); stopping everything."
            f"\nlast lines of {looping.log_path}:\n{log_tail(looping.log_path, 40)}"
        )

    @classmethod
    def from_config(
        cls, config: DeploymentConfig, run_dir: Path, progress: Progress
    ) -> LocalBackend:
        return cls(
            prepare_deployment(config, run_dir, progress=progress),
            run_dir,
            startup_timeout_s=config.startup_timeout_s,
            parallel_startup=config.parallel_startup,
            restarts=config.restarts,
            warm_up=config.warm_up,
            progress=progress,
        )


LAUNCHERS.register("local", LocalBackend.from_config)
LAUNCHERS.register("ray", "pd_runtime.launcher.ray:RayLauncher")


def create_launcher(
    config: DeploymentConfig, run_dir: Path, progress: Progress = lambda _: None
) -> Launcher:
    """The backend ``config.launcher.type`` names, built from the whole deployment config."""
    return LAUNCHERS.create(config.launcher.type, config, Path(run_dir), progress)
