"""`python -m pd_runtime` is the same as the `pd-runtime` console script."""

from __future__ import annotations

from pd_runtime.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
