"""Where the harness lives: ``pd-runtime bench`` reaches it, the serving processes never load it,
and its default scenario config ships inside the package."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pd_runtime.bench.scenarios import DEFAULT_CONFIG
from pd_runtime.cli import main

__all__: list[str] = []


def test_serving_modules_do_not_import_the_harness() -> None:
    code = (
        "import sys, pd_runtime.cli, pd_runtime.coordinator.app, pd_runtime.sidecar.app\n"
        "print(sorted(m for m in sys.modules if m.startswith('pd_runtime.bench')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "scenarios", "--help"]])
def test_cli_hands_bench_to_the_harness(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert "pd-runtime bench" in capsys.readouterr().out


def test_default_scenario_config_is_package_data() -> None:
    cfg = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert cfg["name"] == "scenarios" and cfg["fronts"] and cfg["deployment"]
