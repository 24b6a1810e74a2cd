"""The import contract in pyproject.toml ([tool.importlinter]) holds, and it would catch a cycle.

The second test copies the package, hides a cycle in it the way cycles used to be hidden (an import
inside a function, config -> scheduling), and checks that the same contract fails on the copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports reads ./pyproject.toml and finds the root package from the working directory.
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_the_package_keeps_its_import_contracts() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_cycle_hidden_in_a_function_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "pd_runtime", tmp_path / "pd_runtime")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert lint_imports(tmp_path).returncode == 0  # the copy itself is clean
    (tmp_path / "pd_runtime" / "config" / "sneaky.py").write_text(
        "def policies() -> list[str]:\n"
        "    from pd_runtime.scheduling.registry import SCHEDULERS\n\n"
        "    return SCHEDULERS.names()\n"
    )
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "pd_runtime.config is not allowed to import pd_runtime.scheduling" in result.stdout
    assert "pd_runtime.config.sneaky -> pd_runtime.scheduling.registry" in result.stdout


def test_every_top_level_module_has_a_layer() -> None:
    # A package left out of the layers contract is not checked for cycles: place each new one.
    with (ROOT / "pyproject.toml").open("rb") as f:
        contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    placed = {name.strip() for line in layers for name in line.split("|")}
    package = ROOT / "pd_runtime"
    modules = {
        f"pd_runtime.{path.stem}"
        for path in package.iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }
    assert modules - placed == set(), "add these to [tool.importlinter] layers"
