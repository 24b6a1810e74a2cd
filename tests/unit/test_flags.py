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
