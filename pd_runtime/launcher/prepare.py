"""Everything ``up`` and ``demo`` do before starting processes: make sure the model exists, then plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from pd_runtime.config.deployment import DeploymentConfig
from pd_runtime.errors import ConfigError
from pd_runtime.launcher.topology import DeploymentPlan, plan_deployment
from pd_runtime.placement.discover import discover_machine
from pd_runtime.placement.machine import MachineDescription
from pd_runtime.platform import detect_platform, resolve_platform

__all__ = ["prepare_deployment"]


def prepare_deployment(
    config: DeploymentConfig,
    run_dir: Path,
    progress: Callable[[str], None] = print,
    machine: MachineDescription | None = None,
    *,
    generate_model: bool = True,
) -> DeploymentPlan:
    """``machine``: plan for this described machine instead of discovering the one we are on;
    ``generate_model=False`` (``pd-runtime plan``) plans without writing anything."""
    if config.model.generate and generate_model:
        from pd_runtime.model.tiny import MARKER_FILE, write_model

        # Idempotent: returns at once when the directory already holds this size/seed/format. A model
        # we generated earlier (marker present) in another size/seed/format is regenerated; any other
        # directory is left alone and reported.
        ours = (Path(config.model.path) / MARKER_FILE).exists()
        try:
            write_model(config.model.path, config.model.generate, config.model.seed, overwrite=ours)
        except FileExistsError as exc:
            raise ConfigError(f"model.path: {exc}") from exc
    if machine is None:
        machine = discover_machine()
        platform = detect_platform()
        wanted = resolve_platform(config.transport.platform)
    else:
        platform = machine.to_platform()
        wanted = platform.name if config.transport.platform == "auto" else config.transport.platform
    if wanted != platform.name:
        platform = dataclasses.replace(platform, name=wanted)
    return plan_deployment(config, Path(run_dir), platform, machine)
