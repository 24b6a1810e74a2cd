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
* ``wait_for_failure()`` blocks while the deployment serves (a backend that restarts parts does
  so meanwhile) and returns a one-paragraph reason once a part is gone for good;
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
        dead = self.wait()
        return (
            f"{dead.spec.name} exited with code {dead.process.returncode}; stopping everything."
            f"\nlast lines of {dead.log_path}:\n{log_tail(dead.log_path)}"
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
            progress=progress,
        )


LAUNCHERS.register("local", LocalBackend.from_config)
LAUNCHERS.register("ray", "pd_runtime.launcher.ray:RayLauncher")


def create_launcher(
    config: DeploymentConfig, run_dir: Path, progress: Progress = lambda _: None
) -> Launcher:
    """The backend ``config.launcher.type`` names, built from the whole deployment config."""
    return LAUNCHERS.create(config.launcher.type, config, Path(run_dir), progress)
