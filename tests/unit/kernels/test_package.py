"""pd_kernels' public names, its independence from vLLM, and the wheel's package list."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pd_kernels

REPO = Path(__file__).resolve().parents[3]


def test_all_lists_the_public_names() -> None:
    ours = {
        n
        for n, v in vars(pd_kernels).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith("pd_kernels")
    }
    assert ours <= set(pd_kernels.__all__)
    assert all(hasattr(pd_kernels, n) for n in pd_kernels.__all__)


def test_importing_the_kernels_loads_neither_vllm_nor_triton() -> None:
    code = (
        "import sys, importlib.util as u; p = sys.argv[1];"
        "s = u.spec_from_file_location('pd_kernels', p + '/__init__.py',"
        " submodule_search_locations=[p]); m = u.module_from_spec(s);"
        "sys.modules['pd_kernels'] = m; s.loader.exec_module(m);"
        "print(sorted(n for n in ('vllm', 'triton') if n in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "kernels")], capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]", out.stderr


def test_pyproject_lists_every_package() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "pd_runtime").rglob("__init__.py")
    }
    assert listed == found | {"pd_kernels"}
