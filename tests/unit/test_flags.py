"""Flags generated from typed settings: one default per setting, bounds kept, argv round-trips."""

from __future__ import annotations

import argparse

import pytest
from pydantic import BaseModel, Field

from pd_runtime import cli
from pd_runtime.common.flags import add_flags, flag_name, from_args, to_argv
from pd_runtime.config.deployment import SidecarConfig
from pd_runtime.config.sidecar import SidecarTuning
from pd_runtime.sidecar.app import SidecarSettings
from pd_runtime.worker.command import WorkerSpec
from pd_runtime.worker.settings import FLAG_NAMES, WorkerSettings

SIDECAR = ["sidecar", "--port", "1", "--decode-url", "http://127.0.0.1:2"]


class Knobs(BaseModel):
    wait_s: float = Field(default=2.0, gt=0, description="how long")
    tries: int = Field(default=3, ge=1, le=9)
    mode: str = "fast"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, Knobs, choices={"mode": ["fast", "slow"]})
    return p


def test_names_defaults_and_bounds_come_from_the_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert flag_name("wait_s") == "--wait" and flag_name("max_in_flight") == "--max-in-flight"
    assert from_args(parser().parse_args([]), Knobs) == Knobs().model_dump()
    args = parser().parse_args(["--wait", "0.5", "--tries", "9", "--mode", "slow"])
    assert Knobs(**from_args(args, Knobs)) == Knobs(wait_s=0.5, tries=9, mode="slow")
    for bad, message in (
        (["--wait", "0"], "must be > 0, not 0"),
        (["--tries", "10"], "must be <= 9, not 10"),
        (["--tries", "x"], "not a int"),
        (["--mode", "odd"], "invalid choice"),
    ):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)
        assert message in capsys.readouterr().err
    assert "how long (default 2.0)" in parser().format_help()


def test_the_sidecar_command_line_round_trips_its_settings() -> None:
    tuned = SidecarTuning(prefill_timeout_s=60, prefill_deadline_factor=6, drain_delay_s=2)
    args = cli.build_parser().parse_args([*SIDECAR, *to_argv(tuned, SidecarTuning)])
    assert SidecarTuning(**from_args(args, SidecarTuning)) == tuned
    defaults = cli.build_parser().parse_args(SIDECAR)
    assert from_args(defaults, SidecarTuning) == SidecarTuning().model_dump()


def test_one_default_per_setting_for_the_deployment_the_process_and_the_flags() -> None:
    # The deployment's section and the process's settings are the same fields, not copies.
    tuning = SidecarTuning().model_dump()
    process = SidecarSettings(decode_url="http://x:1", allowed_prefillers=frozenset())
    deployment = SidecarConfig(port=8300)
    assert {k: getattr(process, k) for k in tuning} == tuning
    assert {k: getattr(deployment, k) for k in tuning} == tuning


# The worker's flags as the Kubernetes manifests and docs/deploy-gpu.md write them, and the
# WorkerSpec field each one sets.
WORKER_FLAGS = {
    "--role=prefill": ("role", "prefill"),
    "--model=m": ("model", "m"),
    "--served-model-name=s": ("served_model_name", "s"),
    "--host=10.0.0.1": ("host", "10.0.0.1"),
    "--port=8000": ("port", 8000),
    "--side-channel-port=5601": ("side_channel_port", 5601),
    "--kv-events-port=5557": ("kv_events_port", 5557),
    "--kv-events-host=*": ("kv_events_host", "*"),
    "--kv-events-replay-port=5558": ("kv_events_replay_port", 5558),
    "--block-size=64": ("block_size", 64),
    "--max-model-len=1024": ("max_model_len", 1024),
    "--platform=cuda": ("platform", "cuda"),
    "--cpu-cores=0-3": ("cpu_cores", "0-3"),
    "--kv-cache-gib=2": ("kv_cache_gib", 2.0),
    "--gpus=0,1": ("gpu_ids", "0,1"),
    "--tensor-parallel-size=2": ("tensor_parallel_size", 2),
    "--ucx-tls=tcp": ("ucx_tls", "tcp"),
    "--nixl-progress-delay-us=5": ("nixl_progress_delay_us", 5),
    "--ucx-error-handling=none": ("ucx_error_handling", "none"),
    "--kv-lease=20": ("kv_lease_s", 20),
    "--no-enforce-eager": ("enforce_eager", False),
}


def worker_spec(*flags: str) -> WorkerSpec:
    args = cli.build_parser().parse_args(["worker", *flags])
    return WorkerSettings(**from_args(args, WorkerSettings)).to_spec(["--max-num-seqs", "4"])


def test_the_worker_flags_keep_their_names_and_set_the_worker_spec() -> None:
    spec = worker_spec(*WORKER_FLAGS)
    for flag, (field, value) in WORKER_FLAGS.items():
        assert getattr(spec, field) == value, flag
    assert spec.extra_args == ("--max-num-seqs", "4")
    assert (
        worker_spec("--role=decode", "--model=m", "--port=1", "--kv-events-port=0").kv_events_port
        is None
    )


def test_the_worker_settings_are_the_one_default_of_the_worker_flags_and_spec() -> None:
    spec = worker_spec("--role=both", "--model=m", "--port=1", "--platform=cpu")
    defaults = WorkerSpec(
        role="both", model="m", port=1, platform="cpu", extra_args=spec.extra_args
    )
    assert spec == defaults
    # The settings round-trip through the command line the launcher could write.
    settings = WorkerSettings(role="decode", model="m", port=2, gpu_ids="3", enforce_eager=False)
    argv = to_argv(settings, WorkerSettings, names=FLAG_NAMES)
    assert "--gpus" in argv and "--no-enforce-eager" in argv
    args = cli.build_parser().parse_args(["worker", *argv])
    assert WorkerSettings(**from_args(args, WorkerSettings)) == settings


def test_the_worker_requires_role_model_and_port(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["worker", "--model", "m"])
    assert "the following arguments are required: --role, --port" in capsys.readouterr().err
