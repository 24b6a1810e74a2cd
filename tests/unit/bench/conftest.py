"""The one-off benchmark scripts (``benchmarks/*.py``) are not a package: they run as
``python benchmarks/bench_x.py`` and import one another by module name, from their own folder on
``sys.path``. The tests import them the same way."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[3] / "benchmarks"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
