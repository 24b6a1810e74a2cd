"""A deployment with several models: the shipped preset, its validation, and its plan (each model
its own workers, sidecars and pool; LoRA flags on the adapter's model's workers only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from pd_runtime.config import DeploymentConfig
from pd_runtime.config.loader import load_config
from pd_runtime.launcher.topology import plan_deployment
from pd_runtime.model.tiny import MODEL_SIZES
from pd_runtime.model.tiny_lora import write_lora
from pd_runtime.platform import Platform

PRESET = Path(__file__).resolve().parents[2] / "configs" / "local-cpu-two-models.yaml"
CPU = Platform(name="cpu", gpu_count=0, cpu_cores=(0, 1))


def preset_data() -> dict[str, Any]:
    return yaml.safe_load(PRESET.read_text())


def test_the_preset_plans_one_pool_per_model(tmp_path: Path) -> None:
    config = load_config(DeploymentConfig, PRESET)
    plan = plan_deployment(config, tmp_path, CPU)
    names = [p.name for p in plan.parts]
    assert names == [
        "prefill-0", "decode-0", "b-prefill-0", "b-decode-0", "sidecar-0", "b-sidecar-0",
        "coordinator",
    ]  # fmt: skip
    coordinator = plan.coordinator
    assert coordinator.models == [] and coordinator.endpoints == []
    pools = {p.model: p for p in coordinator.pools}
    assert list(pools) == ["tiny-qwen3", "tiny-qwen3-b"]
    a, b = pools["tiny-qwen3"], pools["tiny-qwen3-b"]
    assert [(e.name, e.role, e.adapters) for e in a.endpoints] == [
        ("prefill-0", "prefill", ["tiny-lora"]),
        ("decode-0", "decode", ["tiny-lora"]),
    ]
    assert [(e.name, e.url, e.adapters) for e in b.endpoints] == [
        ("b-prefill-0", "http://127.0.0.1:8110", []),
        ("b-decode-0", "http://127.0.0.1:8310", []),
    ]
    # Each pool's kv-aware scheduler keys prompts with its own model's tokenizer.
    assert a.scheduler is not None and b.scheduler is not None
    assert a.scheduler.params["tokenizer"].endswith("tiny-qwen3")
    assert b.scheduler.params["tokenizer"].endswith("tiny-qwen3-b")
    assert coordinator.served_names == ["tiny-qwen3", "tiny-lora", "tiny-qwen3-b"]
    assert set(coordinator.aliases) == {"chat-default", "chat-canary"}
    # Each sidecar knows its own model's prefill worker only (the other model's would compute
    # the prompt with other weights).
    for sidecar, own in (("sidecar-0", "127.0.0.1:8100"), ("b-sidecar-0", "127.0.0.1:8110")):
        argv = next(p for p in plan.parts if p.name == sidecar).argv
        prefillers = [argv[i + 1] for i, a in enumerate(argv) if a == "--prefiller"]
        assert prefillers == [own], (sidecar, prefillers)
    # The adapter's flags on its model's workers only; KV-event topics name each worker's model.
    by_name = {p.name: " ".join(p.argv) for p in plan.parts}
    for name in ("prefill-0", "decode-0"):
        assert "--enable-lora --max-lora-rank 8 --lora-modules tiny-lora=" in by_name[name]
    assert "--enable-lora" not in by_name["b-decode-0"]
    assert "@tiny-qwen3-b" in by_name["b-decode-0"]
    # The coordinator config round-trips (the launcher writes it as YAML, the coordinator reads).
    again = type(coordinator).model_validate(json.loads(coordinator.model_dump_json()))
    assert again == coordinator


def test_cores_are_dealt_across_every_model(tmp_path: Path) -> None:
    plan = plan_deployment(load_config(DeploymentConfig, PRESET), tmp_path, CPU)
    where = {p.name: p.placement for p in plan.by_kind("worker")}
    assert where == {
        "prefill-0": "cpu core 0",
        "decode-0": "cpu core 1",
        "b-prefill-0": "cpu core 0",
        "b-decode-0": "cpu core 1",
    }


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["pools"][0]["decode"].update(port=8200), "pools[0].decode.port: port 8200"),
        (
            lambda d: d["pools"][0]["model"].update(served_name="tiny-lora"),
            "names served twice (models or adapters) ['tiny-lora']",
        ),
        (
            lambda d: d["coordinator"]["aliases"].update(x="nope"),
            "coordinator.aliases.x",
        ),
        (lambda d: d["pools"][0]["decode"].update(replicas=0), "pools[0].decode.replicas"),
        (lambda d: d["pools"][0].update(name="B_"), "pools.0.name"),
    ],
)
def test_bad_multi_model_configs_name_the_field(mutate: Any, needle: str) -> None:
    data = preset_data()
    mutate(data)
    with pytest.raises(ValidationError) as info:
        DeploymentConfig.model_validate(data)
    assert needle in str(info.value)


def test_single_model_configs_keep_the_coordinator_shape(tmp_path: Path) -> None:
    data = preset_data()
    del data["pools"], data["coordinator"]["aliases"]
    data["model"].pop("adapters")
    plan = plan_deployment(DeploymentConfig.model_validate(data), tmp_path, CPU)
    assert plan.coordinator.pools == []
    assert plan.coordinator.models == ["tiny-qwen3"]
    assert [e.name for e in plan.coordinator.endpoints] == ["prefill-0", "decode-0"]


def test_generated_lora_adapter_matches_the_tiny_model(tmp_path: Path) -> None:
    from safetensors import safe_open

    out = write_lora(tmp_path / "lora", "tiny", rank=4, seed=3)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    size = MODEL_SIZES["tiny"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    assert len(keys) == size.num_layers * 2 * 2
    assert tuple(a.shape) == (4, size.hidden_size)
    assert tuple(b.shape) == (size.num_kv_heads * size.head_dim, 4)
    assert b.abs().sum() > 0  # not peft's zero init: the adapter changes the output
    before = (out / "adapter_model.safetensors").stat().st_mtime_ns
    write_lora(tmp_path / "lora", "tiny", rank=4, seed=3)  # idempotent
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == before
