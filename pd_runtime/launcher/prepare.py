"""Everything ``up`` and ``demo`` do before starting processes: make sure the model exists, then plan."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pd_runtime.config.deployment import DeploymentConfig
from pd_runtime.launcher.topology import DeploymentPlan, plan_deployment
from pd_runtime.platform import detect_platform, resolve_platform

__all__ = ["prepare_deployment"]


def prepare_deployment(
    config: DeploymentConfig, run_dir: Path, progress: Callable[[str], None] = print
) -> DeploymentPlan:
    if config.model.generate and not Path(config.model.path).exists():
        from pd_runtime.model.tiny import write_model

        progress(f"writing a local {config.model.generate} model to {config.model.path}")
        write_model(config.model.path, size=config.model.generate, seed=config.model.seed)
    platform = detect_platform()
    wanted = resolve_platform(config.transport.platform)
    if wanted != platform.name:
        platform = type(platform)(wanted, platform.gpu_count, platform.cpu_cores)
    return plan_deployment(config, Path(run_dir), platform)
