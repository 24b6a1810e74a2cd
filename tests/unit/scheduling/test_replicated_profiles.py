"""Coordinator replicas split a burst of one new prefix: one home with the replicated profiles.

Each replica is its own scheduler (no shared state, as ``coordinator.replicas`` runs them); its
pending overlay holds only its own claims. Measured at scale by benchmarks/bench_replica_scatter.py.
"""

from __future__ import annotations

from pd_runtime.config.coordinator import EndpointConfig
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import REPLICATED_PROFILES, KVAwareScheduler

BS = 4
DECODE = [
    EndpointConfig(
        name=f"decode-{i}", role="decode", address=f"10.0.0.{i}:8200", url=f"http://10.0.0.{i}:8300"
    )
    for i in range(1, 7)
]


def homes(replicas: int, profiles_for: int, prefix: int) -> set[str]:
    group = [
        KVAwareScheduler(DECODE, block_size=BS, seed=prefix * 10 + r, replicas=profiles_for)
        for r in range(replicas)
    ]
    tokens = [prefix * 1000 + t for t in range(32)]
    request = SchedulingRequest(
        "r",
        "m",
        "/v1/completions",
        {"prompt": "x", "max_tokens": 8},
        token_ids=tokens,
        block_keys=PrefixIndex.block_keys(tokens, BS),
    )
    return {group[i % replicas].schedule(request).decode.name for i in range(6)}


def test_default_profiles_let_each_replica_give_a_new_prefix_its_own_home() -> None:
    assert all(len(homes(1, 1, p)) == 1 for p in range(20))  # one process: the overlay holds it
    assert sum(len(homes(2, 1, p)) for p in range(20)) > 20  # two: scattered


def test_replicated_profiles_agree_on_one_home_and_still_spread_prefixes() -> None:
    chosen = [homes(3, 3, p) for p in range(30)]
    assert all(len(h) == 1 for h in chosen)
    assert len(set().union(*chosen)) >= 4  # different prefixes, different homes


def test_replicated_profiles_keep_the_defaults_but_cold_spreading_and_random_ties() -> None:
    scheduler = KVAwareScheduler(DECODE, block_size=BS, replicas=2)
    decode = scheduler.decode_profile.describe()
    assert "cold-spreader" not in {s["type"] for s in decode["scorers"]}
    assert decode["picker"] == {"type": "max-score", "tie_break": "prefix"}
    assert REPLICATED_PROFILES["prefill"].picker.params == {"tie_break": "prefix"}
    # A profile given in the config is kept as written, replicas or not.
    custom = {"decode": {"scorers": [{"type": "in-flight-load"}]}}
    own = KVAwareScheduler(DECODE, block_size=BS, replicas=2, profiles=custom)
    assert own.decode_profile.describe()["picker"]["tie_break"] == "random"
