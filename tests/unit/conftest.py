from __future__ import annotations

import pytest

from pd_runtime.kv_events import index as index_module
from pd_runtime.kv_events import keys as keys_module
from pd_runtime.kv_events.native import native


@pytest.fixture(params=["native", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the compiled keying and walk, and again on the Python loops."""
    if request.param == "native" and native is None:
        pytest.skip("extension not built")
    if request.param == "python":
        monkeypatch.setattr(index_module, "native", None)
        monkeypatch.setattr(keys_module, "native", None)
    return str(request.param)
