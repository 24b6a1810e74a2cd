"""Which implementation runs the prefix index's hot loops: the compiled one or the Python one.

``_native`` (``_native.c``, built by ``pip install``) keys, stores and walks blocks ~2.5-3x
faster than the Python loops in :mod:`.keys` and :mod:`.index`
(``benchmarks/results/2026-12-07-native``). Those stay the reference (the compiled functions
must give the same results: ``tests/unit/kv_events/test_native.py``) and what runs where the
extension is absent: a source install without a C compiler (the build is optional), another
interpreter, or ``PD_RUNTIME_NATIVE=0`` (to compare the two, or to rule the extension out).

The keys are CPython's tuple hash reproduced in C; a short self-check against ``hash`` at import
turns the extension off if this interpreter hashes differently, rather than keying requests and
events apart. A module built from another version of ``_native.c`` (an editable install not
rebuilt after a pull) is not used either: its functions may take other arguments.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["IMPLEMENTATION", "NOT_NATIVE_BECAUSE", "native"]

#: ``INTERFACE_VERSION`` of the ``_native.c`` this Python code calls.
_INTERFACE_VERSION = 1


def _self_check(module: ModuleType) -> bool:
    tokens = [0, 1, 2**31, 2**61 - 1, 2**61, 12345, 2**63 - 1, -1]
    expected, key = [], -(2**63)
    for i in range(0, len(tokens), 2):
        key = hash((key, hash(tuple(tokens[i : i + 2]))))
        expected.append(key)
    return bool(module.chain_keys_ints(-(2**63), tokens, 2) == expected)


def _load() -> tuple[ModuleType | None, str]:
    """The module, or None and why not."""
    if os.environ.get("PD_RUNTIME_NATIVE", "1") == "0":
        return None, "PD_RUNTIME_NATIVE=0"
    try:
        from pd_runtime.kv_events import _native
    except ImportError:
        return None, "not built (no C compiler at install time?)"
    if getattr(_native, "INTERFACE_VERSION", None) != _INTERFACE_VERSION:
        return None, "built from another version of _native.c: reinstall (pip install -e .)"
    if not _self_check(_native):
        return None, "its keys differ from this interpreter's hash()"
    return _native, ""


native, _why = _load()
#: "native" or "python": said in the kv-aware scheduler's start-up line.
IMPLEMENTATION = "native" if native is not None else "python"
#: Why the Python loops run ("" when they do not).
NOT_NATIVE_BECAUSE = _why
