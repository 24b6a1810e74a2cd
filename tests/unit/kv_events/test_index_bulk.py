"""The C-level BlockStored path gives the index the per-block loop gives (randomized)."""

from __future__ import annotations

import random

import pytest

from pd_runtime.kv_events.events import AllBlocksCleared, BlockRemoved, BlockStored
from pd_runtime.kv_events.index import PrefixIndex

BS = 4


def events(rng: random.Random) -> list[tuple[str, BlockStored | BlockRemoved | AllBlocksCleared]]:
    """Chains sharing prefixes on several endpoints and tiers, with re-stores, repeated hashes,
    removals, clears, orphans and placeholders."""
    prefixes = [[rng.randrange(50) for _ in range(BS * 6)] for _ in range(4)]
    out: list[tuple[str, BlockStored | BlockRemoved | AllBlocksCleared]] = []
    for _ in range(300):
        endpoint = rng.choice(("a", "b", "c"))
        medium = rng.choice(("GPU", "GPU", "CPU", None))
        op = rng.random()
        if op < 0.7:
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(BS * 2)]
            start = rng.randrange(0, 6)
            n = rng.randint(1, 4)
            salt = rng.choice((b"", b"", endpoint.encode()))  # engine hashes: per endpoint seed
            hashes: list[bytes | int] = [
                salt + bytes(tokens[: (i + 1) * BS]) for i in range(start, start + n)
            ]
            if rng.random() < 0.05:
                hashes[-1] = hashes[0]  # a hash repeated in one event
            parent = salt + bytes(tokens[: start * BS]) if start else None
            if rng.random() < 0.05:
                parent = b"unknown"
            body = tokens[start * BS : (start + n) * BS]
            if rng.random() < 0.05:
                body = []  # placeholder
            out.append(
                (
                    endpoint,
                    BlockStored(
                        block_hashes=hashes,
                        parent_block_hash=parent,
                        token_ids=body,
                        block_size=BS if body else 0,
                        medium=medium,
                    ),
                )
            )
        elif op < 0.95:
            tokens = rng.choice(prefixes)
            i = rng.randrange(1, 7)
            h = rng.choice((b"", endpoint.encode())) + bytes(tokens[: i * BS])
            out.append((endpoint, BlockRemoved(block_hashes=[h], medium=medium)))
        else:
            out.append((endpoint, AllBlocksCleared()))
    return out


@pytest.mark.parametrize("seed", range(25))
def test_bulk_store_matches_per_block_loop(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = events(random.Random(seed))
    fast = PrefixIndex()
    for endpoint, ev in stream:
        fast.apply(endpoint, ev)
    monkeypatch.setattr(PrefixIndex, "bulk", False)
    slow = PrefixIndex()
    for endpoint, ev in stream:
        slow.apply(endpoint, ev)
    fast.check_integrity()
    slow.check_integrity()
    assert fast._holders == slow._holders
    assert fast._any == slow._any
    assert fast._endpoints == slow._endpoints
    assert fast._dupes == slow._dupes
    assert fast.stats == slow.stats
