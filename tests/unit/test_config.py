from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pd_runtime.config import CoordinatorConfig, DeploymentConfig, load_config
from pd_runtime.config.loader import parse_config
from pd_runtime.errors import ConfigError
from pd_runtime.registries import check_names

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "configs" / "local-cpu.yaml"


def local_data() -> dict:
    return yaml.safe_load(LOCAL.read_text())


def test_every_shipped_config_loads() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert LOCAL in configs
    for path in configs:
        config = load_config(DeploymentConfig, path)
        assert config.decode.replicas >= 1


def test_local_config_describes_one_prefill_two_decode_on_the_tiny_model() -> None:
    config = load_config(DeploymentConfig, LOCAL)
    assert (config.prefill.replicas, config.decode.replicas) == (1, 2)
    assert config.model.generate == "tiny"
    assert config.engine.block_size is not None and config.engine.block_size % 32 == 0


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["decode"].update(replicas="two"), "decode.replicas"),
        (lambda d: d["prefill"].update(port=70000), "prefill.port"),
        (lambda d: d["engine"].update(max_model_len=-1), "engine.max_model_len"),
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["model"].pop("path"), "model.path"),
        (lambda d: d["decode"].update(replicas=0), "decode.replicas"),
        (lambda d: d["sidecar"].update(port=d["decode"]["port"] + 1), "sidecar.port"),
        (
            lambda d: d["coordinator"]["scheduler"].update(policy="psychic"),
            "coordinator.scheduler.policy",
        ),
        (lambda d: d["model"].update(generate="huge"), "model.generate"),
        (
            lambda d: d["decode"].update(kv_events_replay_port=d["prefill"]["kv_events_port"]),
            "decode.kv_events_replay_port",
        ),
    ],
)
def test_bad_config_names_the_field(mutate, field: str) -> None:
    data = local_data()
    mutate(data)
    with pytest.raises(ConfigError) as excinfo:
        # What an entry point does: parse, then check the registry-backed names.
        check_names(parse_config(DeploymentConfig, data, "test.yaml"), "test.yaml")
    message = str(excinfo.value)
    assert "test.yaml" in message
    assert field in message, message


def test_unknown_policy_lists_the_known_ones() -> None:
    data = local_data()
    data["coordinator"]["scheduler"]["policy"] = "psychic"
    with pytest.raises(ConfigError, match="round-robin"):
        check_names(parse_config(DeploymentConfig, data))


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(DeploymentConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DeploymentConfig, bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(DeploymentConfig, scalar)


def test_coordinator_config_needs_a_decode_endpoint_and_unique_names() -> None:
    prefill = {"name": "p", "role": "prefill", "address": "h:1", "url": "http://h:1"}
    with pytest.raises(ConfigError, match="decode"):
        parse_config(CoordinatorConfig, {"models": ["m"], "endpoints": [prefill]})
    decode = {"name": "p", "role": "decode", "address": "h:2", "url": "http://h:3"}
    with pytest.raises(ConfigError, match="duplicate"):
        parse_config(CoordinatorConfig, {"models": ["m"], "endpoints": [prefill, decode]})
    bad_address = {**decode, "name": "d", "address": "http://h:2"}
    with pytest.raises(ConfigError, match=r"endpoints\.1\.address"):
        parse_config(CoordinatorConfig, {"models": ["m"], "endpoints": [prefill, bad_address]})
