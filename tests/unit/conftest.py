from __future__ import annotations

import pytest

from pd_runtime.kv_events import index as index_module
from pd_runtime.kv_events import keys as keys_module
from pd_runtime.kv_events.native import NOT_NATIVE_BECAUSE, native


@pytest.fixture(params=["native", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the compiled keying and walk, and again on the Python loops."""
    if request.param == "native" and native is None:
        # test_native.py::test_the_extension_is_built_and_in_use fails for this unless
        # PD_RUNTIME_NATIVE=0 asked for it; the "python" run of the test still runs.
        pytest.skip(f"the C extension is not in use: {NOT_NATIVE_BECAUSE}")
    if request.param == "python":
        monkeypatch.setattr(index_module, "native", None)
        monkeypatch.setattr(keys_module, "native", None)
    return str(request.param)
