"""The kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

``TRITON_INTERPRET`` is read when triton is first imported, so it is set here, before any test
module imports ``pd_kernels``. A checkout that was not ``pip install -e``'d (or whose editable
install points at another worktree) has no ``pd_kernels`` mapping: it is loaded from this
checkout's ``kernels/`` folder, as the package-dir in pyproject.toml maps it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

_KERNELS = Path(__file__).resolve().parents[3] / "kernels"


def _load_from_checkout() -> None:
    spec = importlib.util.spec_from_file_location(
        "pd_kernels", _KERNELS / "__init__.py", submodule_search_locations=[str(_KERNELS)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pd_kernels"] = module
    spec.loader.exec_module(module)


_found = importlib.util.find_spec("pd_kernels")
if _found is None or Path(_found.origin or "").parent != _KERNELS:
    _load_from_checkout()
