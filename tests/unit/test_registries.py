"""Configuration names are checked against the registries in one place, at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from pd_runtime.config.coordinator import CoordinatorConfig, SchedulerConfig
from pd_runtime.config.discovery import DiscoveryConfig
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.discovery.registry import DISCOVERY
from pd_runtime.errors import ConfigError
from pd_runtime.registries import check_names, load_checked
from pd_runtime.scheduling.registry import SCHEDULERS

DECODE = EndpointConfig(name="d", role="decode", address="127.0.0.1:8200", url="http://x:1")


def test_every_registered_name_resolves_to_a_factory() -> None:
    # Lazy "module:attr" entries are only imported when chosen; a typo would wait for a user.
    for registry in (SCHEDULERS, DISCOVERY):
        for name in registry.names():
            assert callable(registry.factory(name)), (registry.kind, name)


def test_unknown_names_are_one_error_naming_each_field() -> None:
    config = CoordinatorConfig(
        models=["m"],
        endpoints=[DECODE],
        scheduler=SchedulerConfig(policy="fastest"),
        discovery=DiscoveryConfig(type="consul"),
    )
    with pytest.raises(ConfigError) as info:
        check_names(config, "c.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration in c.yaml:"
    assert lines[1].startswith("  scheduler.policy: unknown scheduling policy 'fastest'")
    assert "choose one of: kv-aware, round-robin" in lines[1]
    assert lines[2].startswith("  discovery.type: unknown discovery type 'consul'")


def test_known_names_pass_and_load_checked_checks_the_file(tmp_path: Path) -> None:
    good = CoordinatorConfig(models=["m"], endpoints=[DECODE])
    assert check_names(good) is good
    path = tmp_path / "c.yaml"
    path.write_text(
        "models: [m]\nscheduler: {policy: nope}\n"
        "endpoints: [{name: d, role: decode, address: '127.0.0.1:8200', url: 'http://x:1'}]\n"
    )
    with pytest.raises(ConfigError, match=r"scheduler\.policy: unknown scheduling policy 'nope'"):
        load_checked(CoordinatorConfig, path)
