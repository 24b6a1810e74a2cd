"""PrefixIndex against a straightforward reference on random event streams, through the wire.

The index keeps per-tier endpoint bitmasks, shares one dict between a single tier and the any-tier
masks, and keys blocks from ``token_ids`` left as msgpack by ``decode_batch``. The reference below
does none of that: it keeps only ``endpoint -> medium -> {engine hash: key}`` (keys from
``chain_keys_py`` on the token lists as generated: the Python keying, never the compiled one the
index may use, so a keying fault cannot hide in both) and answers every query by scanning it. Every
event goes through msgpack and ``decode_batch`` before reaching the index, and after each one
the index must give the reference's answers: ``match`` for any tier and per tier set, ``size``,
``endpoint_counts`` and every counter of ``stats``.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

import msgspec
import pytest

from pd_runtime.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    IndexStats,
    KVEventBatch,
    PrefixIndex,
    decode_batch,
)
from pd_runtime.kv_events.keys import chain_keys_py

Hash = bytes | int
ENDPOINTS = ["a", "b", "c", "d"]
MEDIA: list[str | None] = ["GPU", None, "CPU", "DISK"]  # None: vLLM's default, read as GPU
QUERIES = [None, ["GPU"], ["CPU"], ["GPU", "CPU"], ["CPU", "DISK"], ["GPU", "CPU", "DISK"]]
BLOCK_SIZES = [4, 4, 4, 2]  # mostly one size; a hash re-stored at another size gets a new key
BASE = [random.Random(7).randrange(50_000) for _ in range(48)]
PROMPTS = [
    BASE,
    BASE[:16] + [1] * 32,
    BASE[:8] + [2] * 40,
    [3] * 48,
    [40_000 + i for i in range(48)],
]
EXTRAS: list[list[Any] | None] = [None, [["lora-x"]] * 12, [None, ["mm", 3]] * 6]


class Reference:
    """The index's rules, applied the slow and obvious way (see the module docstring)."""

    def __init__(self) -> None:
        self.tiers: dict[str, dict[str, dict[Hash, int]]] = {}
        self.stats = IndexStats()

    def lookup(self, ep: str, h: Hash) -> int | None:
        for tier in self.tiers.get(ep, {}).values():
            if h in tier:
                return tier[h]
        return None

    def store(
        self,
        ep: str,
        hashes: list[Hash],
        parent: Hash | None,
        tokens: list[int],
        bs: int,
        medium: str | None,
        extra: list[Any] | None,
        group: int | None,
    ) -> None:
        if group not in (None, 0):
            self.stats.ignored_other_group += len(hashes)
            return
        tier = self.tiers.setdefault(ep, {}).setdefault(medium or "GPU", {})
        if bs <= 0 or len(tokens) != len(hashes) * bs:
            pairs = []
            for h in hashes:
                key = self.lookup(ep, h)
                if key is None:
                    self.stats.unkeyable_blocks += 1
                else:
                    pairs.append((h, key))
        else:
            parent_key = 0 if parent is None else self.lookup(ep, parent)
            if parent_key is None:
                self.stats.orphan_blocks += len(hashes)
                return
            extras = [tuple(x) if x is not None else None for x in extra] if extra else None
            pairs = list(zip(hashes, chain_keys_py(parent_key, tokens, bs, extras), strict=True))
        for h, key in pairs:
            if tier.get(h) == key:
                self.stats.duplicate_stores += 1
            else:
                tier[h] = key
                self.stats.stored += 1

    def remove(self, ep: str, hashes: list[Hash], medium: str | None, group: int | None) -> None:
        if group not in (None, 0):
            self.stats.ignored_other_group += len(hashes)
            return
        tier = self.tiers.setdefault(ep, {}).setdefault(medium or "GPU", {})
        for h in hashes:
            if tier.pop(h, None) is None:
                self.stats.unknown_removals += 1
            else:
                self.stats.removed += 1

    def clear(self, ep: str) -> None:
        self.stats.clears += 1
        self.tiers[ep] = {}

    def match(self, keys: list[int], media: list[str] | None) -> dict[str, int]:
        held = {
            ep: [set(t.values()) for m, t in tiers.items() if media is None or m in media]
            for ep, tiers in self.tiers.items()
        }
        result = {}
        for ep, sets in held.items():
            n = 0
            while n < len(keys) and any(keys[n] in s for s in sets):
                n += 1
            if n:
                result[ep] = n
        return result

    def size(self) -> int:
        return len({k for tiers in self.tiers.values() for t in tiers.values() for k in t.values()})

    def endpoint_counts(self) -> dict[str, dict[str, int]]:
        return {ep: {m: len(t) for m, t in tiers.items()} for ep, tiers in self.tiers.items()}


def engine_hash(rng: random.Random, ep: str, tokens: list[int], n: int) -> Hash:
    """The engine's hash of the first ``n`` tokens: per endpoint, sometimes an int (vLLM's
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), and sometimes a second hash for the same tokens
    (a re-computed block) so that two engine hashes map to one key (the index's duplicates)."""
    return plain_hash(ep, tokens, n, variant=rng.random() < 0.1)


def plain_hash(ep: str, tokens: list[int], n: int, variant: bool = False) -> Hash:
    digest = hash((ep, tuple(tokens[:n]), variant)) & (2**64 - 1)
    return digest if ep in ("c", "d") else digest.to_bytes(8, "big") + b"h" * 24


def random_event(
    rng: random.Random, ref: Reference, ep: str
) -> tuple[BlockStored | BlockRemoved | AllBlocksCleared, tuple[Any, ...]]:
    """One event and the reference's view of it (the token list as generated)."""
    op = rng.random()
    medium = rng.choice(MEDIA) if rng.random() < 0.3 else "GPU"
    group = rng.choice([None, None, None, 0, 0, 1])
    tokens = rng.choice(PROMPTS)
    bs = rng.choice(BLOCK_SIZES)
    blocks = len(tokens) // bs
    if op < 0.6:  # a store: usually extending (or re-storing) what the endpoint holds
        known = 0
        while known < blocks and ref.lookup(ep, plain_hash(ep, tokens, (known + 1) * bs)):
            known += 1
        start = rng.randint(0, known) if rng.random() < 0.9 else rng.randrange(blocks)
        end = min(blocks, start + rng.randint(1, 6))
        hashes = [engine_hash(rng, ep, tokens, (i + 1) * bs) for i in range(start, end)]
        if start == 0:
            parent = None
        elif rng.random() < 0.95:
            parent = engine_hash(rng, ep, tokens, start * bs)
        else:
            parent = rng.randrange(2**60)  # a parent this endpoint never stored
        span = tokens[start * bs : end * bs]
        if rng.random() < 0.05:
            span = span[:-1]  # length does not match: handled like a placeholder
        extra = rng.choice(EXTRAS)
        extra = extra[start:end] if extra else None
        if rng.random() < 0.1:  # an offloading connector's placeholder: hashes only
            span, bs, parent, extra = [], 0, None, None
        if rng.random() < 0.05:
            hashes = hashes + hashes[:1]  # the same engine hash twice in one event
            span = span + span[:bs] if bs else span
        lora = rng.choice([None, 3])
        event = BlockStored(
            block_hashes=hashes,  # type: ignore[arg-type]
            parent_block_hash=parent,
            token_ids=span,  # type: ignore[arg-type]  # a list: encoded below
            block_size=bs,
            lora_id=lora,
            lora_name="adapter" if lora else None,
            medium=medium,
            extra_keys=extra,  # type: ignore[arg-type]
            group_idx=group,
        )
        return event, ("store", ep, hashes, parent, span, bs, medium, extra, group)
    if op < 0.93:  # removals of held and of unknown hashes
        held = [h for t in ref.tiers.get(ep, {}).values() for h in t]
        hashes = rng.sample(held, min(len(held), rng.randint(1, 4))) if held else []
        if rng.random() < 0.3 or not hashes:
            hashes.append(rng.randrange(2**60) if rng.random() < 0.5 else b"gone" * 8)
        event = BlockRemoved(block_hashes=hashes, medium=medium, group_idx=group)
        return event, ("remove", ep, hashes, medium, group)
    if op < 0.98:
        return AllBlocksCleared(), ("clear", ep)
    return AllBlocksCleared(), ("drop", ep)  # the endpoint removed (not an event: manager)


def check(ix: PrefixIndex, ref: Reference) -> None:
    ix.check_integrity()
    assert asdict(ix.stats) == asdict(ref.stats)
    assert ix.size() == ref.size()
    assert ix.endpoint_counts() == ref.endpoint_counts()
    for tokens in PROMPTS:
        for bs in sorted(set(BLOCK_SIZES)):
            for extra in EXTRAS:
                extras = [tuple(x) if x is not None else None for x in extra] if extra else None
                keys = chain_keys_py(0, tokens, bs, extras)
                for media in QUERIES:
                    assert ix.match(keys, media=media) == ref.match(keys, media), (bs, media)


@pytest.mark.parametrize("seed", range(40))
def test_index_matches_the_reference_on_random_streams(seed: int, implementation: str) -> None:
    """On the compiled keying and walk and on the Python loops (``implementation``)."""
    rng = random.Random(seed)
    ix, ref = PrefixIndex(), Reference()
    encoder = msgspec.msgpack.Encoder()
    for step in range(250):
        ep = rng.choice(ENDPOINTS)
        event, view = random_event(rng, ref, ep)
        if view[0] == "drop":
            ix.remove_endpoint(ep)
            ref.tiers.pop(ep, None)
        else:
            batch = KVEventBatch(ts=0.0, events=[event])
            (decoded,) = decode_batch(encoder.encode(batch)).events
            ix.apply(ep, decoded)
            if view[0] == "store":
                ref.store(*view[1:])
            elif view[0] == "remove":
                ref.remove(*view[1:])
            else:
                ref.clear(ep)
        if step % 10 == 9:
            check(ix, ref)
    check(ix, ref)


def test_undecodable_token_ids_are_counted_not_raised(implementation: str) -> None:
    """``decode_batch`` leaves ``token_ids`` as msgpack: a value that is not an array of ints
    reaches the index, which drops the blocks (as unkeyable) instead of raising."""
    payload = msgspec.msgpack.encode(
        KVEventBatch(
            ts=0.0,
            events=[
                BlockStored(block_hashes=[b"x", b"y"], token_ids=["no"] * 8, block_size=4),  # type: ignore[list-item]
                BlockStored(
                    block_hashes=[b"z"],
                    token_ids=PROMPTS[0][:4],  # type: ignore[arg-type]
                    block_size=4,
                ),
            ],
        )
    )
    ix = PrefixIndex()
    ix.apply_batch("a", decode_batch(payload).events)
    assert ix.stats.unkeyable_blocks == 2 and ix.stats.stored == 1
    assert ix.match(chain_keys_py(0, PROMPTS[0][:4], 4)) == {"a": 1}
