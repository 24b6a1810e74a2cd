"""``pd-runtime plan`` and the presets: what is printed is what ``up`` would start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from pd_runtime.cli import main
from pd_runtime.config.coordinator import SchedulerConfig
from pd_runtime.errors import ConfigError
from pd_runtime.launcher.prepare import prepare_deployment
from pd_runtime.launcher.supervisor import _child_setup
from pd_runtime.placement import MachineDescription
from pd_runtime.scheduling.kv_aware import KVAwareParams
from pd_runtime.scheduling.profile import SchedulingProfile
from tests.unit.placement.helpers import CONFIGS, MACHINES, machine, preset

PRESETS = {  # preset -> (its target machine, a machine too small for it)
    "local-cpu": ("cpu-only", None),
    "l40s-qwen3-0.6b": ("l40sx2", "one-l40s"),
    "h200-llama3-70b": ("h200x8-2numa-4ib", "l40sx2"),
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_for_the_h200_preset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(
        capsys,
        "plan",
        "--config",
        str(CONFIGS / "h200-llama3-70b.yaml"),
        "--machine",
        str(MACHINES / "h200x8-2numa-4ib.yaml"),
        "--format",
        "json",
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert code == 0
    plan = json.loads(out)
    parts = {p["name"]: p for p in plan["parts"]}
    assert list(parts) == ["prefill-0", "decode-0", "sidecar-0", "coordinator"]
    decode = parts["decode-0"]
    assert (decode["role"], decode["gpus"], decode["numa_node"]) == ("decode", [4, 5, 6, 7], 1)
    assert decode["cpu_cores"] == "56-111,168-223"
    assert (decode["port"], decode["side_channel_port"]) == (8200, "5610")
    assert decode["ucx_net_devices"] == "mlx5_2:1,mlx5_3:1" and decode["transport"] == "rdma"
    assert decode["command"].startswith("CUDA_VISIBLE_DEVICES=4,5,6,7 ")
    assert "--tensor-parallel-size 4" in decode["command"]
    assert "--model meta-llama/Llama-3.3-70B-Instruct" in decode["command"]
    assert parts["sidecar-0"]["role"] == "sidecar" and parts["sidecar-0"]["port"] == 8300
    assert plan["machine"]["hostname"] == "h200-node" and plan["gateway"] == "http://127.0.0.1:8000"
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_plan_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "plan",
        "--config",
        str(CONFIGS / "l40s-qwen3-0.6b.yaml"),
        "--machine",
        str(MACHINES / "l40sx2.yaml"),
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("machine: l40s-node, 2 x NVIDIA L40S")
    assert lines[1].split() == [
        "PART", "ROLE", "GPUS", "NUMA", "CORES", "PORT", "NIXL", "UCX_TLS", "UCX_NET_DEVICES"
    ]  # fmt: skip
    assert lines[2].split() == [
        "prefill-0", "prefill", "0", "0", "0-31", "8100", "5600", "tcp,sm,self,cuda_copy,cuda_ipc", "-"
    ]  # fmt: skip
    assert "decode-0: no active InfiniBand/RoCE port: TCP" in out
    assert any(line.startswith("  [decode-0] CUDA_VISIBLE_DEVICES=1 ") for line in lines)


def test_plan_refuses_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys,
        "plan",
        "--config",
        str(CONFIGS / "h200-llama3-70b.yaml"),
        "--machine",
        str(MACHINES / "l40sx2.yaml"),
    )
    assert code == 2 and "need 8 GPUs, this machine has 2" in err


def test_describe_machine_prints_what_machine_loads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "plan", "--describe-machine")
    assert code == 0
    (tmp_path / "here.yaml").write_text(out)
    code, out, _ = run(
        capsys,
        "plan",
        "--config",
        str(CONFIGS / "local-cpu.yaml"),
        "--machine",
        str(tmp_path / "here.yaml"),
    )
    assert code == 0 and "prefill-0" in out


# -- presets ---------------------------------------------------------------------------------------


def _too_small(name: str) -> MachineDescription:
    if name == "one-l40s":
        l40s = machine("l40sx2")
        return l40s.model_copy(update={"gpus": l40s.gpus[:1]})
    return machine(name)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_plans_on_its_machine_and_not_on_a_smaller_one(name: str, tmp_path: Path) -> None:
    target, small = PRESETS[name]
    config = preset(name)
    plan = prepare_deployment(config, tmp_path, machine=machine(target), generate_model=False)
    expected = config.prefill.replicas + config.decode.replicas
    assert len(plan.by_kind("worker")) == expected
    gpus = [g for p in plan.by_kind("worker") for g in p.gpus]
    assert len(gpus) == len(set(gpus))  # no GPU given twice
    if small is not None:
        with pytest.raises(ConfigError, match=r"need \d+ GPUs, this machine has [12]$"):
            prepare_deployment(config, tmp_path, machine=_too_small(small), generate_model=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_scheduler_config_is_valid(name: str) -> None:
    scheduler: SchedulerConfig = preset(name).coordinator.scheduler
    params = KVAwareParams.model_validate(scheduler.params)
    for role, profile in params.profiles.items():
        built = SchedulingProfile(role, profile)  # builds every plugin with its parameters
        assert len(built.filters) == len(profile.filters) >= 1


@pytest.mark.parametrize("name", ["l40s-qwen3-0.6b", "h200-llama3-70b"])
def test_gpu_presets_lift_the_cpu_saturation_limits(name: str) -> None:
    params = KVAwareParams.model_validate(preset(name).coordinator.scheduler.params)
    [limits] = [f for f in params.profiles["decode"].filters if f.type == "not-saturated"]
    assert limits.params["max_in_flight"] > 8 * 10 and limits.params["max_waiting"] > 4


def test_the_launcher_pins_gpu_workers_to_their_cores() -> None:
    core = max(os.sched_getaffinity(0))
    probe = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
        preexec_fn=partial(_child_setup, None, (core,)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == f"[{core}]"


def test_the_table_in_the_docs_is_what_plan_prints(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "plan",
        "--config",
        str(CONFIGS / "h200-llama3-70b.yaml"),
        "--machine",
        str(MACHINES / "h200x8-2numa-4ib.yaml"),
    )
    assert code == 0
    doc = (CONFIGS.parent / "docs" / "deploy-gpu.md").read_text()
    shown = "\n".join(out.splitlines()[:6])
    assert f"```\n{shown}\n```" in doc
