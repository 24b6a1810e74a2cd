from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_operator_ucx(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's UCX_TLS/UCX_NET_DEVICES win over placement by design; keep the shell's out."""
    for name in ("UCX_TLS", "UCX_NET_DEVICES", "VLLM_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
