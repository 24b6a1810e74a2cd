"""Described machines and presets for the placement tests (no GPU needed anywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pd_runtime.config import DeploymentConfig, load_config
from pd_runtime.config.loader import parse_config
from pd_runtime.placement import MachineDescription, load_machine

ROOT = Path(__file__).resolve().parents[3]
MACHINES = ROOT / "tests" / "fixtures" / "machines"
CONFIGS = ROOT / "configs"


def machine(name: str) -> MachineDescription:
    return load_machine(MACHINES / f"{name}.yaml")


def preset(name: str) -> DeploymentConfig:
    return load_config(DeploymentConfig, CONFIGS / f"{name}.yaml")


def preset_with(name: str, **changes: Any) -> DeploymentConfig:
    """A preset with ``section__key=value`` changes (``prefill__tensor_parallel_size=2``)."""
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        data[section][key] = value
    return parse_config(DeploymentConfig, data)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]
