"""Everything ``up`` and ``demo`` do before starting processes: make sure the model exists, then plan."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from pd_runtime.config.deployment import DeploymentConfig, ModelConfig
from pd_runtime.errors import ConfigError
from pd_runtime.launcher.topology import DeploymentPlan, plan_deployment
from pd_runtime.placement.discover import discover_machine
from pd_runtime.placement.machine import MachineDescription
from pd_runtime.platform import detect_platform, resolve_platform

__all__ = ["prepare_deployment"]


def _generate(model: ModelConfig) -> None:
    """Write the model (and its LoRA adapters) where the config asks for a generated one."""
    if model.generate:
        from pd_runtime.model.tiny import MARKER_FILE, write_model

        # Idempotent: returns at once when the directory already holds this size/seed/format. A model
        # we generated earlier (marker present) in another size/seed/format is regenerated; any other
        # directory is left alone and reported.
        ours = (Path(model.path) / MARKER_FILE).exists()
        try:
            write_model(model.path, model.generate, model.seed, overwrite=ours)
        except FileExistsError as exc:
            raise ConfigError(f"model.path: {exc}") from exc
    for adapter in model.adapters:
        if adapter.generate:
            from pd_runtime.model.tiny_lora import write_lora

            write_lora(adapter.path, adapter.generate, adapter.rank, adapter.seed)


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
    if generate_model:
        for _, single in config.single_models():  # every model of a multi-model deployment
            _generate(single.model)
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
