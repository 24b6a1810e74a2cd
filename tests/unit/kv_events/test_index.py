"""PrefixIndex: chaining, removal, clears, orphans, tiers, seeds, and random-operation integrity."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pd_runtime.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    PrefixIndex,
    chain_keys,
)
from pd_runtime.kv_events.events import encode_token_ids

BS = 4
PROMPT = list(range(100, 124))  # 6 full blocks of 4


def ehash(seed: int, prefix: tuple[int, ...]) -> bytes:
    """An engine's block hash: depends on the engine's seed, like vLLM's NONE_HASH chain."""
    return hashlib.sha256(repr((seed, prefix)).encode()).digest()


def stored(
    seed: int, tokens: list[int], start: int, end: int, medium: str | None = "GPU", **kw: object
) -> BlockStored:
    """BlockStored for blocks [start, end) of tokens, as engine ``seed`` would publish it."""
    hashes = [ehash(seed, tuple(tokens[: (i + 1) * BS])) for i in range(start, end)]
    parent = ehash(seed, tuple(tokens[: start * BS])) if start else None
    return BlockStored(
        block_hashes=hashes,  # type: ignore[arg-type]
        parent_block_hash=parent,
        token_ids=encode_token_ids(tokens[start * BS : end * BS]),
        block_size=BS,
        medium=medium,
        **kw,  # type: ignore[arg-type]
    )


def removed(seed: int, tokens: list[int], i: int, medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved(block_hashes=[ehash(seed, tuple(tokens[: (i + 1) * BS]))], medium=medium)


@pytest.fixture
def ix() -> PrefixIndex:
    return PrefixIndex()


def keys(tokens: list[int] = PROMPT) -> list[int]:
    return PrefixIndex.block_keys(tokens, BS)


def test_block_keys_are_chained_full_blocks_and_deterministic() -> None:
    k = keys([*PROMPT, 1, 2])  # the partial block is ignored
    assert len(k) == 6 and len(set(k)) == 6
    assert k == keys(PROMPT)
    assert chain_keys(k[1], PROMPT[8:], BS) == k[2:]  # chaining from a parent key
    other = keys([999, *PROMPT[1:]])
    assert all(a != b for a, b in zip(k, other, strict=True))  # a change propagates down


def test_stored_in_order_and_chained_match(ix: PrefixIndex) -> None:
    ix.apply("a", stored(1, PROMPT, 0, 2))
    ix.apply("a", stored(1, PROMPT, 2, 4))
    assert ix.match(keys()) == {"a": 4}
    assert ix.match(keys()[:3]) == {"a": 3}
    assert ix.match(keys([7] * 24)) == {}
    assert ix.size() == 4 and ix.endpoint_counts() == {"a": {"GPU": 4}}
    ix.check_integrity()


def test_removal_stops_match_at_first_miss(ix: PrefixIndex) -> None:
    ix.apply("a", stored(1, PROMPT, 0, 5))
    ix.apply("a", removed(1, PROMPT, 2))  # vLLM may evict a middle block
    assert ix.match(keys()) == {"a": 2}
    ix.apply("a", removed(1, PROMPT, 2))
    assert ix.stats.unknown_removals == 1
    ix.check_integrity()


def test_all_blocks_cleared_and_remove_endpoint(ix: PrefixIndex) -> None:
    ix.apply("a", stored(1, PROMPT, 0, 3))
    ix.apply("a", stored(1, PROMPT, 0, 3, medium="CPU"))
    ix.apply("b", stored(2, PROMPT, 0, 3))
    ix.apply("a", AllBlocksCleared())
    assert ix.match(keys()) == {"b": 3}
    assert "a" in ix.endpoints()
    ix.remove_endpoint("b")
    assert ix.match(keys()) == {} and ix.size() == 0 and ix.endpoints() == ["a"]
    ix.remove_endpoint("nobody")
    ix.check_integrity()


def test_unknown_parent_is_dropped_and_so_are_its_children(ix: PrefixIndex) -> None:
    ix.apply("a", stored(1, PROMPT, 2, 4))  # missed the store of blocks 0-1
    ix.apply("a", stored(1, PROMPT, 4, 5))
    assert ix.stats.orphan_blocks == 3 and ix.size() == 0
    ix.apply("a", stored(1, PROMPT, 0, 2))  # the engine stores the chain again
    ix.apply("a", stored(1, PROMPT, 2, 6))
    assert ix.match(keys()) == {"a": 6}
    ix.check_integrity()


def test_two_endpoints_sharing_a_prefix_with_different_seeds(ix: PrefixIndex) -> None:
    fork = PROMPT[:8] + [5] * 16
    ix.apply("a", stored(1, PROMPT, 0, 6))
    ix.apply("b", stored(2, fork, 0, 6))  # other seed: other engine hashes, same keys
    assert ix.match(keys()) == {"a": 6, "b": 2}
    assert ix.match(keys(fork)) == {"a": 2, "b": 6}
    assert ix.size() == 10  # the shared 2 blocks are one entry
    int_hashes = stored(3, PROMPT, 0, 6)
    int_hashes.block_hashes = [int.from_bytes(h[:8], "big") for h in int_hashes.block_hashes]  # type: ignore[arg-type]
    ix.apply("c", int_hashes)  # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1
    assert ix.match(keys())["c"] == 6
    ix.check_integrity()


def test_tiers_media_filter_and_placeholders(ix: PrefixIndex) -> None:
    ix.apply("a", stored(1, PROMPT, 0, 4))
    ix.apply("a", stored(1, PROMPT, 0, 2, medium="CPU"))
    ix.apply("a", removed(1, PROMPT, 1))  # GPU copy of block 1 gone; CPU copy stays
    assert ix.match(keys()) == {"a": 4}  # any tier: 0 GPU+CPU, 1 CPU, 2-3 GPU
    assert ix.match(keys(), media=["GPU"]) == {"a": 1}
    assert ix.match(keys(), media=["CPU"]) == {"a": 2}
    h2 = ehash(1, tuple(PROMPT[:12]))  # offloading placeholder: a hash, no tokens
    ix.apply("a", BlockStored(block_hashes=[h2, b"?"], block_size=0, medium="CPU"))
    assert ix.match(keys(), media=["CPU"]) == {"a": 3}  # block 2 keyed via its GPU entry
    assert ix.stats.unkeyable_blocks == 1 and ix.endpoint_counts()["a"]["CPU"] == 3
    assert ix.match(keys(), media=["STORAGE"]) == {}
    ix.check_integrity()


def test_duplicates_other_groups_and_extra_keys(ix: PrefixIndex) -> None:
    ix.apply("a", stored(1, PROMPT, 0, 2))
    ix.apply("a", stored(1, PROMPT, 0, 2))  # vLLM re-emits reused blocks
    assert ix.stats.duplicate_stores == 2 and ix.size() == 2
    ix.apply("a", stored(1, PROMPT, 0, 6, group_idx=1))
    assert ix.stats.ignored_other_group == 6 and ix.match(keys()) == {"a": 2}
    lora = stored(9, PROMPT, 0, 2, extra_keys=[("my-lora",), ("my-lora",)])
    ix.apply("b", lora)
    assert "b" not in ix.match(keys())  # a LoRA block never matches a base-model request
    extras = [("my-lora",)] * 6
    assert ix.match(PrefixIndex.block_keys(PROMPT, BS, extras)) == {"b": 2}
    ix.check_integrity()


def test_apply_rejects_non_events(ix: PrefixIndex) -> None:
    with pytest.raises(TypeError):
        ix.apply("a", object())  # type: ignore[arg-type]


# ---- random operation sequences against a naive model -----------------------------------------

PROMPTS = [PROMPT, PROMPT[:8] + [1] * 16, [3] * 24]
ENDPOINTS = ["a", "b", "c"]
MEDIA = ["GPU", "CPU"]
SEEDS = {"a": 1, "b": 2, "c": 3}

op = st.one_of(
    st.tuples(
        st.just("store"),
        st.sampled_from(ENDPOINTS),
        st.sampled_from(MEDIA),
        st.integers(0, 2),
        st.integers(0, 5),
        st.integers(1, 3),
    ),
    st.tuples(
        st.just("remove"),
        st.sampled_from(ENDPOINTS),
        st.sampled_from(MEDIA),
        st.integers(0, 2),
        st.integers(0, 5),
    ),
    st.tuples(st.just("clear"), st.sampled_from(ENDPOINTS)),
    st.tuples(st.just("drop"), st.sampled_from(ENDPOINTS)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_random_operations_keep_integrity_and_match_a_model(ops: list[tuple]) -> None:
    ix = PrefixIndex()
    model: dict[str, dict[str, set[tuple[int, ...]]]] = {}  # endpoint -> medium -> prefixes
    for o in ops:
        ep = o[1]
        tiers = model.setdefault(ep, {m: set() for m in MEDIA})
        if o[0] == "store":
            _, _, medium, p, start, n = o
            end = min(start + n, 6)
            toks = PROMPTS[p]
            ix.apply(ep, stored(SEEDS[ep], toks, start, end, medium=medium))
            parent = tuple(toks[: start * BS])
            if start == 0 or any(parent in s for s in tiers.values()):
                tiers[medium].update(tuple(toks[: (i + 1) * BS]) for i in range(start, end))
        elif o[0] == "remove":
            _, _, medium, p, i = o
            ix.apply(ep, removed(SEEDS[ep], PROMPTS[p], i, medium=medium))
            tiers[medium].discard(tuple(PROMPTS[p][: (i + 1) * BS]))
        elif o[0] == "clear":
            ix.apply(ep, AllBlocksCleared())
            for s in tiers.values():
                s.clear()
        else:
            ix.remove_endpoint(ep)
            del model[ep]
        ix.check_integrity()
    for toks in PROMPTS:
        want = {}
        for ep, tiers in model.items():
            n = 0
            while n < 6 and any(tuple(toks[: (n + 1) * BS]) in s for s in tiers.values()):
                n += 1
            if n:
                want[ep] = n
        assert ix.match(keys(toks)) == want


# ---- keys: determinism, edge cases ------------------------------------------------------------

KEY_SCRIPT = (
    "from pd_runtime.kv_events import chain_keys;"
    "print(chain_keys(0, list(range(100, 124)), 4));"
    "print(chain_keys(7, list(range(100, 124)), 4, [('lora-a', b'x', 3)] * 6))"
)


def test_keys_are_the_same_in_processes_with_other_hash_seeds() -> None:
    """Keys must not depend on the per-process salt of ``str``/``bytes`` hashes (PYTHONHASHSEED),
    extras included: a restarted coordinator keys the same prompt the same way."""
    outs = {
        subprocess.run(
            [sys.executable, "-c", KEY_SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(outs) == 1
    plain, extra = (ast.literal_eval(line) for line in outs.pop().splitlines())
    assert plain == keys() and extra == chain_keys(7, PROMPT, BS, [("lora-a", b"x", 3)] * 6)


def test_key_edge_cases() -> None:
    assert chain_keys(0, [1, 2, 3], BS) == []  # no full block
    with pytest.raises(ValueError):
        chain_keys(0, PROMPT, 0)
    k = keys()
    assert chain_keys(0, PROMPT, BS, [None] * 6) == k  # None extras = no extras
    assert chain_keys(0, PROMPT, BS, [("a",)])[1:] != k[1:]  # an extra changes its descendants
    assert chain_keys(0, PROMPT, BS, [None, ("a",)])[0] == k[0]
    assert chain_keys(0, PROMPT, 8) != k[:3]  # the block size is part of the key
    assert chain_keys(1, PROMPT, BS)[0] != k[0]  # so is the parent


def test_one_event_storing_the_same_engine_hash_twice(ix: PrefixIndex) -> None:
    """Not something vLLM sends, but the per-block fast path must keep the maps consistent."""
    h = ehash(1, (1,))
    ix.apply(
        "a", BlockStored(block_hashes=[h, h], token_ids=encode_token_ids(PROMPT[:8]), block_size=BS)
    )
    assert ix.endpoint_counts() == {"a": {"GPU": 1}} and ix.size() == 1
    ix.check_integrity()
