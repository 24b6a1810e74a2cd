"""The compiled hot loops (``_native.c``) against their Python references, on random inputs.

``leading_blocks`` must return the very dict of ``leading_blocks_py`` (order included: the
decision line lists endpoints in it), and both keying functions the very keys of
``chain_keys_py``: a different key would silently split the index (events keyed one way,
requests the other). Edge values cover CPython's int hash (the modulus 2**61 - 1, negatives,
-1 -> -2) and every msgpack int width.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import msgspec
import pytest

from pd_runtime.kv_events.index import claim_spans, leading_blocks, leading_blocks_py
from pd_runtime.kv_events.keys import chain_keys_py
from pd_runtime.kv_events.native import IMPLEMENTATION, NOT_NATIVE_BECAUSE, native

encode = msgspec.msgpack.encode
EDGE_INTS = [
    -(2**63), -(2**61) + 1, -(2**61) - 1, -33, -32, -2, -1, 0, 1, 127, 128, 255, 256,
    65_535, 65_536, 2**31, 2**32 - 1, 2**32, 2**61 - 2, 2**61 - 1, 2**61, 2**62, 2**63 - 1,
]  # fmt: skip


def test_the_extension_is_built_and_in_use() -> None:
    """``pip install -e .`` compiles it (a C compiler is on every machine we run on); without it
    everything still works, at the Python loops' speed, which this test would hide. With
    ``PD_RUNTIME_NATIVE=0`` the Python loops must run, and say why."""
    if os.environ.get("PD_RUNTIME_NATIVE") == "0":
        assert (IMPLEMENTATION, NOT_NATIVE_BECAUSE) == ("python", "PD_RUNTIME_NATIVE=0")
    else:
        assert IMPLEMENTATION == "native", f"the C extension is not in use: {NOT_NATIVE_BECAUSE}"


#: Why a comparison with the compiled module cannot run (it then skips, while
#: test_the_extension_is_built_and_in_use fails unless PD_RUNTIME_NATIVE=0 asked for this).
NO_NATIVE = f"the C extension is not in use: {NOT_NATIVE_BECAUSE}"
needs_native = pytest.mark.skipif(native is None, reason=NO_NATIVE)


def random_tokens(rng: random.Random, n: int) -> list[int]:
    kind = rng.random()
    if kind < 0.5:
        return [rng.randrange(200_000) for _ in range(n)]
    if kind < 0.8:
        return [rng.randrange(-(2**63), 2**63) for _ in range(n)]
    return [rng.choice(EDGE_INTS) for _ in range(n)]


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_keys_equal_the_python_keys(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        bs = rng.choice([1, 2, 3, 16, 32])
        tokens = random_tokens(rng, rng.randint(0, 100))
        parent = rng.choice([0, -1, -2, rng.randrange(-(2**63), 2**63)])
        expected = chain_keys_py(parent, tokens, bs)
        assert native.chain_keys_ints(parent, tokens, bs) == expected
        assert native.chain_keys_ints(parent, tuple(tokens), bs) == expected
        raw = msgspec.Raw(encode(tokens))
        assert native.chain_keys_msgpack(parent, raw, bs, -1) == expected
        assert native.chain_keys_msgpack(parent, raw, bs, len(tokens) // bs) == (
            expected if len(tokens) % bs == 0 else None
        )


@needs_native
def test_keying_edge_cases_fall_back_rather_than_guess() -> None:
    big = [2**64 - 1, 2**63, 2**63 + 5, 3]  # msgpack uint64 beyond int64: hashed like Python
    assert native.chain_keys_msgpack(0, encode(big), 2, 2) == chain_keys_py(0, big, 2)
    assert native.chain_keys_ints(0, big, 2) is None  # a Python int beyond int64: Python's turn
    assert native.chain_keys_ints(0, [1, True], 1) is None  # not exactly int
    assert native.chain_keys_ints(0, range(8), 2) is None  # not a list or tuple
    long = list(range(70_000))  # array32 header
    assert native.chain_keys_msgpack(0, encode(long), 16, -1) == chain_keys_py(0, long, 16)
    for bad in (
        encode([1, 2.0]),  # a float
        encode([1, "2"]),
        encode([1, 2]) + b"\x00",  # trailing bytes
        encode([1, 2])[:-1],  # truncated
        b"\xdd\xff\xff\xff\xff\x01",  # a header longer than the bytes
        encode({"a": 1}),
        b"",
        encode([1, 2, 3, None]),  # a bad value after the last full block still counts
    ):
        assert native.chain_keys_msgpack(0, bad, 2, -1) is None, bad
    assert native.chain_keys_msgpack(0, encode([1, 2, 3, 4]), 2, 3) is None  # count mismatch
    with pytest.raises(ValueError, match="block_size"):
        native.chain_keys_ints(0, [1], 0)


def random_walk_case(rng: random.Random) -> tuple[list[int], dict[int, int], dict[int, str], list]:
    n_endpoints = rng.choice([1, 2, 8, 63, 64, 65, 68, 130, 300])  # one to five mask words
    bits = rng.sample(range(n_endpoints), rng.randint(1, n_endpoints))  # bits are reused: gaps
    endpoint_of_bit = {1 << b: f"e{b}" for b in bits}
    keys = [rng.randrange(-(2**63), 2**63) for _ in range(rng.randint(0, 40))]
    masks = {}
    for i, key in enumerate(keys):
        if rng.random() < 0.9:  # holders thin out along the prompt, as prefixes do
            mask = sum(1 << b for b in bits if rng.random() < 1 - i / 30)
            if mask:
                masks[key] = mask
    spans = [
        (s := rng.randint(0, len(keys) + 2), s + rng.randint(-2, 20), 1 << rng.choice(bits))
        for _ in range(rng.randint(0, 6))
    ]  # empty and reversed spans, spans past the end, overlapping spans of one bit
    return keys, masks, endpoint_of_bit, spans


@dataclass
class Claim:
    keys: list[int]
    bit: int


def random_claims(rng: random.Random, keys: list[int], bits: list[int]) -> dict[int, list[Claim]]:
    """Claims as the pending overlay makes them: a run of chained keys that agrees with the
    prompt from its head for a while and then parts (or runs past the prompt's end)."""
    claims: dict[int, list[Claim]] = {}
    for _ in range(rng.randint(0, 6) if keys else 0):
        start = rng.randrange(len(keys))
        shared = rng.randint(1, len(keys) - start)
        run = keys[start : start + shared] + [rng.getrandbits(63) for _ in range(rng.randint(0, 5))]
        claims.setdefault(keys[start], []).append(Claim(run, 1 << rng.choice(bits)))
    return claims


@needs_native
@pytest.mark.parametrize("seed", range(4))
def test_walk_equals_the_python_walk_order_included(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(2_000):
        keys, masks, endpoint_of_bit, spans = random_walk_case(rng)
        bits = [b.bit_length() - 1 for b in endpoint_of_bit]
        claims = random_claims(rng, keys, bits)
        for case_spans, case_claims in (
            (None, None),
            (spans, None),
            (None, claims),
            (spans, claims),
        ):
            all_spans = [*(case_spans or ()), *claim_spans(keys, case_claims or {})]
            expected = leading_blocks_py(keys, masks, endpoint_of_bit, spans=all_spans)
            got = native.leading_blocks(keys, masks, endpoint_of_bit, case_spans, case_claims)
            assert list(got.items()) == list(expected.items()), (keys, masks, spans, claims)


@needs_native
def test_walk_hands_what_it_cannot_do_to_python() -> None:
    many = {1 << b: f"e{b}" for b in range(1025)}  # beyond 1,024 endpoints
    assert native.leading_blocks([1], {1: 1}, many, None, None) is NotImplemented
    two = {1: "a", 2: "b"}
    assert (
        native.leading_blocks([1], {1: 1 << 64}, two, None, None) is NotImplemented
    )  # a stray bit
    assert native.leading_blocks([1], {}, two, [(0, 1, 1 << 64)], None) is NotImplemented
    assert native.leading_blocks([1], {}, two, [(0, 1, 3)], None) is NotImplemented  # not one bit
    assert native.leading_blocks([1], {1: -1}, two, None, None) is NotImplemented
    assert native.leading_blocks([1], {}, {3: "a"}, None, None) is NotImplemented
    assert native.leading_blocks(iter([1]), {}, two, None, None) is NotImplemented
    assert native.leading_blocks([1], {}, two, None, {1: [Claim([1], 3)]}) is NotImplemented
    assert native.leading_blocks([1], {}, two, None, {1: [object()]}) is NotImplemented
    assert native.leading_blocks([1], {}, two, None, {1: (Claim([1], 1),)}) is NotImplemented
    with pytest.raises(KeyError):  # a bit nobody owns: the Python version raises the same
        native.leading_blocks([1, 2], {1: 3, 2: 1}, {1: "a", 4: "c"}, None, None)
    assert native.leading_blocks([1, "x"], {1: 1}, two, None, None) is NotImplemented
    assert native.leading_blocks([1], {1: 1}, {1: b"a"}, None, None) is NotImplemented

    class Meddling:  # reading its bit runs Python code that empties the prompt's list
        def __init__(self, prompt: list[int]) -> None:
            self.prompt, self.keys = prompt, [1, 2]

        @property
        def bit(self) -> int:
            self.prompt.clear()
            return 1

    prompt = [1, 2, 3]  # walked on a copy: no read of freed memory, the answer of the original
    assert native.leading_blocks(prompt, {3: 1}, two, None, {1: [Meddling(prompt)]}) == {"a": 3}
    # ... and leading_blocks itself still answers those, and an overlay.
    keys = [10, 11, 12]
    endpoint_of_bit = {1 << b: f"e{b}" for b in range(1100)}
    masks = {10: (1 << 1099) | 1, 11: 1 << 1099}
    assert leading_blocks(keys, masks, endpoint_of_bit) == {"e0": 1, "e1099": 2}
    assert leading_blocks(keys, {10: 1}, {1: "a"}, overlay={11: 1}) == {"a": 2}
    claims = {11: [Claim([11, 12], 2)]}  # with an overlay the claims are worked out in Python
    expected = {"e0": 1, "e1": 3}
    assert (
        leading_blocks(keys, {10: 3}, {1: "e0", 2: "e1"}, overlay={11: 0}, claims=claims)
        == expected
    )


@needs_native
def test_insert_stops_at_each_block_that_is_not_a_plain_new_one() -> None:
    """``insert_new`` stores new engine hashes and hands back a known hash and a key the
    endpoint already holds under another hash (``PrefixIndex._add`` does those, in order)."""
    tier: dict[bytes | int, int] = {b"known": 7}
    held = {7: 0b01, 8: 0b10, 9: 0b01}  # key 9 held by this endpoint (bit 0b01) already
    hashes: list[bytes | int] = [b"a", b"b", b"known", b"c", b"d"]
    keys = [1, 8, 7, 9, 2]
    assert native.insert_new(tier, held, hashes, keys, 0b01, 0) == 2  # stops at the known hash
    assert tier == {b"known": 7, b"a": 1, b"b": 8} and held[1] == 0b01 and held[8] == 0b11
    assert native.insert_new(tier, held, hashes, keys, 0b01, 3) == 3  # key 9: a duplicate
    assert native.insert_new(tier, held, hashes, keys, 0b01, 4) == 5
    assert tier[b"d"] == 2 and held[2] == 0b01 and b"c" not in tier
    wide = 1 << 70  # masks beyond one word
    assert native.insert_new(tier, held, [b"e"], [8], wide, 0) == 1 and held[8] == wide | 0b11
    assert native.insert_new(tier, held, ["str hash"], [3], 1, 0) == 0  # _add's turn
    with pytest.raises(ValueError, match="one key per hash"):
        native.insert_new(tier, held, [b"f"], [], 1, 0)


def test_a_module_from_another_version_or_a_disabled_one_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An editable install not rebuilt after a pull keeps an old ``_native`` whose functions may
    take other arguments: the Python loops run instead, and the reason is given."""
    import sys
    import types

    from pd_runtime import kv_events
    from pd_runtime.kv_events import native as native_module

    monkeypatch.delenv("PD_RUNTIME_NATIVE", raising=False)  # else that reason comes first
    stale = types.ModuleType("pd_runtime.kv_events._native")
    stale.INTERFACE_VERSION = 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pd_runtime.kv_events._native", stale)
    monkeypatch.setattr(kv_events, "_native", stale, raising=False)
    module, why = native_module._load()
    assert module is None and "another version" in why
    monkeypatch.setenv("PD_RUNTIME_NATIVE", "0")
    assert native_module._load() == (None, "PD_RUNTIME_NATIVE=0")
