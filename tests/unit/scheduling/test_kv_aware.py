"""KVAwareScheduler end to end on synthetic vLLM KV events: scores, P/D decisions, the pending
overlay, stick-then-spill, booking and release, session affinity, health, introspection."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import pytest

from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.errors import ConfigError, NoEndpointError
from pd_runtime.kv_events.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    encode_token_ids,
)
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest, SchedulingResult
from pd_runtime.scheduling.kv_aware import KVAwareScheduler
from pd_runtime.scheduling.pending import PendingPrefixes
from pd_runtime.scheduling.registry import SCHEDULERS

BS = 4
THRESHOLD = 8
D0, D1, P0 = "127.0.0.1:8200", "127.0.0.1:8201", "127.0.0.1:8100"
PROMPT = list(range(1000, 1020))  # 20 tokens: 5 full blocks of 4
DECODE_SCORERS = {
    "prefix-cache",
    "in-flight-load",
    "queue-depth",
    "kv-cache-utilization",
    "session-affinity",
    "cold-spreader",
}


def endpoints(prefill: bool = True) -> list[EndpointConfig]:
    out = [
        EndpointConfig(name="decode-0", role="decode", address=D0, url="http://127.0.0.1:8300"),
        EndpointConfig(name="decode-1", role="decode", address=D1, url="http://127.0.0.1:8301"),
    ]
    if prefill:
        out.append(EndpointConfig(name="prefill-0", role="prefill", address=P0, url=f"http://{P0}"))
    return out


def make(prefill: bool = True, **params: Any) -> KVAwareScheduler:
    defaults: dict[str, Any] = {
        "tokenizer": None,
        "block_size": BS,
        "pd_threshold_tokens": THRESHOLD,
        "seed": 0,
    }
    return KVAwareScheduler(endpoints(prefill), **{**defaults, **params})


def request(
    tokens: list[int] | None = PROMPT,
    *,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    rid: str = "r",
) -> SchedulingRequest:
    """What ``prepare`` yields with a tokenizer: the prompt's token ids and block keys."""
    return SchedulingRequest(
        rid,
        "m",
        "/v1/completions",
        body if body is not None else {"prompt": "x", "max_tokens": 10},
        headers=headers or {},
        token_ids=tokens,
        block_keys=PrefixIndex.block_keys(tokens, BS) if tokens is not None else None,
    )


def ehash(engine: str, prefix: list[int]) -> int:
    """An engine's (seeded) hash of the block ending a prefix; differs between engines."""
    return int.from_bytes(hashlib.sha256(repr((engine, prefix)).encode()).digest()[:8], "big")


def store(s: KVAwareScheduler, address: str, tokens: list[int], start: int, end: int) -> None:
    """``address`` publishes BlockStored for blocks [start, end) of ``tokens``."""
    s.index.apply(
        address,
        BlockStored(
            block_hashes=[ehash(address, tokens[: (i + 1) * BS]) for i in range(start, end)],
            parent_block_hash=ehash(address, tokens[: start * BS]) if start else None,
            token_ids=encode_token_ids(tokens[start * BS : end * BS]),
            block_size=BS,
        ),
    )


def remove(s: KVAwareScheduler, address: str, tokens: list[int], *blocks: int) -> None:
    hashes: list[bytes | int] = [ehash(address, tokens[: (i + 1) * BS]) for i in blocks]
    s.index.apply(address, BlockRemoved(block_hashes=hashes))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---- scores and the P/D decision ----------------------------------------------------------


def test_nothing_cached_scores_none_and_disaggregates() -> None:
    s = make()
    result = s.schedule(request())
    assert result.scores is None
    assert result.decode.address in {D0, D1}
    assert result.prefill is not None and result.prefill.address == P0
    assert result.disaggregated
    assert result.reason == "uncached-above-threshold"
    assert result.prompt_tokens == 20
    assert result.cached_tokens == 0


@pytest.mark.parametrize(
    ("blocks", "fraction", "disaggregated", "cached_tokens"),
    [
        (1, 0.2, True, 4),  # 16 uncached
        (3, 0.6, True, 12),  # 8 uncached: exactly the threshold
        (4, 0.8, False, 16),  # 4 uncached: below
        (5, 1.0, False, 20),
    ],
)
def test_blocks_stored_on_decode_1_attract_the_request(
    blocks: int, fraction: float, disaggregated: bool, cached_tokens: int
) -> None:
    s = make()
    store(s, D1, PROMPT, 0, blocks)
    result = s.schedule(request())
    assert result.scores == {D1: fraction}
    assert result.decode.address == D1
    assert result.disaggregated is disaggregated
    assert (result.prefill.address if result.prefill else None) == (P0 if disaggregated else None)
    assert result.reason == (
        "uncached-above-threshold" if disaggregated else "uncached-below-threshold"
    )
    assert result.prompt_tokens == 20
    assert result.cached_tokens == cached_tokens


def test_stores_in_several_events_chain_and_a_trailing_partial_block_is_uncached() -> None:
    s = make()
    tokens = [*PROMPT, 1, 2, 3]  # 23 tokens: 5 blocks + 3
    store(s, D0, tokens, 0, 2)
    store(s, D0, tokens, 2, 5)  # child event, parent = block 1's engine hash
    result = s.schedule(request(tokens))
    assert result.scores == {D0: 1.0}
    assert result.decode.address == D0
    assert (result.prompt_tokens, result.cached_tokens) == (23, 20)
    assert result.reason == "uncached-below-threshold"


def test_scores_report_every_holder_and_the_longest_wins() -> None:
    s = make(pending_ttl_s=0)
    store(s, D0, PROMPT, 0, 2)
    store(s, D1, PROMPT, 0, 5)
    result = s.schedule(request())
    assert result.scores == {D0: 0.4, D1: 1.0}
    assert result.decode.address == D1


def test_block_removed_takes_the_claim_away() -> None:
    s = make(pending_ttl_s=0)  # no overlay: only the index speaks
    store(s, D1, PROMPT, 0, 5)
    first = s.schedule(request())
    assert first.scores == {D1: 1.0}
    s.release(request(), first)

    remove(s, D1, PROMPT, 2)  # a hole in the middle: only the leading run counts
    assert s.schedule(request()).scores == {D1: 0.4}
    remove(s, D1, PROMPT, 0)
    result = s.schedule(request())
    assert result.scores is None
    assert result.reason == "uncached-above-threshold"


def test_all_blocks_cleared_takes_every_claim_of_that_endpoint_away() -> None:
    s = make(pending_ttl_s=0)
    store(s, D0, PROMPT, 0, 5)
    store(s, D1, PROMPT, 0, 2)
    s.index.apply(D0, AllBlocksCleared())
    result = s.schedule(request())
    assert result.scores == {D1: 0.4}
    assert result.decode.address == D1


def test_pending_claims_extend_the_indexed_prefix_and_removals_win_at_once() -> None:
    s = make(pending_ttl_s=5.0)
    clock = Clock()
    s.pending = PendingPrefixes(5.0, clock=clock, bit_of=s.index.endpoint_bit)
    store(s, D1, PROMPT, 0, 2)
    s.release(request(), s.schedule(request()))  # routed to D1: claims blocks 2..4 for 5 s
    # D1 claims only the tail, blocks 2..4: blocks 0..1 are the index's.
    assert s.pending.claimed(D1) == 3
    clock.now = 4.9
    # D1: indexed 0..1 + claimed 2..4; the prefiller that computed the prompt claims it all.
    assert s.schedule(request()).scores == {D1: 1.0, P0: 1.0}
    # The engine evicts the indexed head: the claimed tail no longer hangs from the root, so
    # nothing is claimed any more (no routing to a cache that lost the prompt's start).
    remove(s, D1, PROMPT, 0, 1)
    assert D1 not in (s.schedule(request()).scores or {})


def test_pending_overlay_keeps_a_burst_of_a_new_prompt_together() -> None:
    s = make()  # pending_ttl_s default: 10 s
    first = s.schedule(request(rid="1"))
    assert first.scores is None
    second = s.schedule(request(rid="2"))  # no events yet, first still in flight
    assert second.decode.address == first.decode.address
    assert second.scores == {first.decode.address: 1.0, P0: 1.0}
    assert not second.disaggregated  # the decode endpoint is expected to hold it all
    # The prefill endpoint computed the blocks too: it is claimed as well; the other decode
    # endpoint is not.
    assert s.pending.match(request().block_keys or []) == {first.decode.address: 5, P0: 5}


def test_without_the_overlay_a_burst_scatters() -> None:
    s = make(pending_ttl_s=0)
    first = s.schedule(request(rid="1"))
    second = s.schedule(request(rid="2"))
    assert second.scores is None
    assert second.decode.address != first.decode.address  # in-flight load and cold spreading


def test_stick_then_spill_then_return() -> None:
    s = make(pending_ttl_s=0)
    store(s, D0, PROMPT, 0, 5)
    held: list[tuple[SchedulingRequest, SchedulingResult]] = []
    for i in range(8):  # not-saturated's max_in_flight is 8
        req = request(rid=str(i))
        result = s.schedule(req)
        assert result.decode.address == D0, i
        assert not result.disaggregated
        held.append((req, result))
    assert s.states[D0].in_flight_requests == 8
    assert s.states[D1].in_flight_requests == 0

    spill = s.schedule(request(rid="spill"))
    assert spill.decode.address == D1
    assert spill.disaggregated  # D1 holds nothing: the prompt is computed by the prefiller
    assert spill.scores == {D0: 1.0}

    s.release(*held.pop())  # D0 has room again: back to the holder
    back = s.schedule(request(rid="back"))
    assert back.decode.address == D0
    assert s.states[D0].in_flight_requests == 8


def test_book_and_release_in_flight_counts() -> None:
    s = make()
    d0, d1, p0 = s.states[D0], s.states[D1], s.states[P0]
    req = request(body={"prompt": "x", "max_tokens": 10})
    result = s.schedule(req)
    assert result.disaggregated
    decode = s.states[result.decode.address]
    assert (decode.in_flight_requests, decode.in_flight_tokens) == (1, 30)  # 20 prompt + 10
    assert (p0.in_flight_requests, p0.in_flight_tokens) == (1, 20)  # the prompt only
    s.release(req, result)
    for st in (d0, d1, p0):
        assert (st.in_flight_requests, st.in_flight_tokens) == (0, 0)
    s.release(req, result)  # a second release of the same request does nothing
    for st in (d0, d1, p0):
        assert (st.in_flight_requests, st.in_flight_tokens) == (0, 0)
    assert s._booked == {}


def test_direct_requests_book_nothing_on_the_prefiller() -> None:
    s = make()
    store(s, D0, PROMPT, 0, 5)
    req = request()
    result = s.schedule(req)
    assert not result.disaggregated
    assert s.states[P0].in_flight_requests == 0
    assert s.states[D0].in_flight_requests == 1
    s.release(req, result)
    assert s.states[D0].in_flight_requests == 0
    assert s.states[D0].in_flight_tokens == 0


@pytest.mark.parametrize(
    ("body", "new_tokens"),
    [
        ({"max_completion_tokens": 7, "max_tokens": 99}, 7),
        ({"max_tokens": 99}, 99),
        ({}, 256),  # default_max_tokens
        ({"max_tokens": -1}, 256),
        ({"max_tokens": "lots"}, 256),
    ],
)
def test_booked_tokens_are_prompt_plus_max_new_tokens(
    body: dict[str, Any], new_tokens: int
) -> None:
    s = make(prefill=False)
    result = s.schedule(request(body=body))
    assert s.states[result.decode.address].in_flight_tokens == 20 + new_tokens


def test_release_of_an_unscheduled_request_is_ignored() -> None:
    s = make()
    booked = request(rid="a")  # kept alive, as the coordinator does until it releases
    result = s.schedule(booked)
    s.release(request(rid="b"), result)  # a different request object
    assert s.states[result.decode.address].in_flight_requests == 1
    s.release(booked, result)
    assert s.states[result.decode.address].in_flight_requests == 0


# ---- session affinity, health, no prefiller -----------------------------------------------


def test_session_header_keeps_a_session_on_one_decode_endpoint() -> None:
    # Untokenized prompts: only the session can keep a conversation together. Each turn is
    # released before the next (a chat's turns are sequential): with unequal in-flight counts,
    # in-flight-load (weight 1, min-max) cancels session-affinity (weight 1) exactly.
    s = make()
    homes: dict[str, set[str]] = {}
    for turn in range(10):
        for session in ("alice", "bob", "carol", "dave"):
            req = request(None, headers={"x-session-id": session}, rid=f"{session}{turn}")
            result = s.schedule(req)
            homes.setdefault(session, set()).add(result.decode.address)
            assert result.breakdown is not None
            if turn:
                assert result.breakdown["session-affinity"][result.decode.address] == 1.0
            s.release(req, result)
    assert all(len(h) == 1 for h in homes.values()), homes
    assert set().union(*homes.values()) == {D0, D1}  # new sessions still spread


def test_session_header_name_is_configurable() -> None:
    s = make(session_header="x-user")
    req = request(None, headers={"x-user": "u1"})
    first = s.schedule(req)
    s.release(req, first)
    for _ in range(10):
        result = s.schedule(req)
        assert result.decode.address == first.decode.address
        s.release(req, result)
    ignored = request(None, headers={"x-session-id": "u1"})
    assert s.context(ignored).session is None


def test_unhealthy_decode_endpoint_is_never_chosen_even_when_it_holds_the_prompt() -> None:
    s = make()
    store(s, D0, PROMPT, 0, 5)
    s.states[D0].healthy = False
    for i in range(30):
        result = s.schedule(request(rid=str(i)))
        assert result.decode.address == D1
        # From the second request on, D1 and the prefiller hold it too (pending overlay).
        assert result.scores == ({D0: 1.0, D1: 1.0, P0: 1.0} if i else {D0: 1.0})


def test_unhealthy_prefill_endpoint_is_never_chosen() -> None:
    eps = [
        *endpoints(),
        EndpointConfig(
            name="prefill-1", role="prefill", address="127.0.0.1:8101", url="http://x:1"
        ),
    ]
    s = KVAwareScheduler(eps, block_size=BS, pd_threshold_tokens=THRESHOLD, seed=0)
    s.states[P0].healthy = False
    prompts = [list(range(n * 100, n * 100 + 20)) for n in range(20)]
    chosen = {s.schedule(request(p)).prefill.address for p in prompts}  # type: ignore[union-attr]
    assert chosen == {"127.0.0.1:8101"}


def test_no_healthy_prefill_endpoint_falls_back_to_serving_on_decode_alone() -> None:
    s = make()
    s.states[P0].healthy = False
    result = s.schedule(request())
    assert result.prefill is None
    assert result.reason == "no-prefill-available"
    assert s.states[P0].in_flight_requests == 0
    assert s.states[result.decode.address].in_flight_requests == 1


def test_no_healthy_decode_endpoint_is_no_endpoint() -> None:
    s = make()
    s.states[D0].healthy = s.states[D1].healthy = False
    with pytest.raises(NoEndpointError, match="decode"):
        s.schedule(request())
    assert all(st.in_flight_requests == 0 for st in s.states.values())


def test_without_prefill_endpoints_everything_is_direct() -> None:
    s = make(prefill=False)
    result = s.schedule(request())
    assert not result.disaggregated
    assert result.reason == "no-prefill-endpoint"
    assert result.prefill is None
    assert result.breakdown is not None and set(result.breakdown["total"]) == {D0, D1}


def test_untokenized_request_is_routed_on_load_and_disaggregated() -> None:
    s = make()
    result = s.schedule(request(None))
    assert result.scores is None
    assert result.prompt_tokens is None and result.cached_tokens is None
    assert result.reason == "prompt-not-tokenized"
    assert result.disaggregated
    assert s.states[result.decode.address].in_flight_tokens == 10  # max_tokens only
    assert len(s.pending) == 0  # no keys, nothing claimed


# ---- breakdown and introspection ----------------------------------------------------------


def test_breakdown_has_every_scorer_and_total() -> None:
    s = make(pending_ttl_s=0)
    direct_req = request()
    store(s, D0, PROMPT, 0, 5)
    direct = s.schedule(direct_req)
    assert direct.breakdown is not None
    assert set(direct.breakdown) == DECODE_SCORERS | {"total"}
    for values in direct.breakdown.values():
        assert set(values) == {D0, D1}
    assert direct.breakdown["prefix-cache"] == {D0: 1.0, D1: 0.0}
    assert direct.breakdown["total"][D0] > direct.breakdown["total"][D1]

    s.index.apply(D0, AllBlocksCleared())
    split = s.schedule(request(rid="2"))
    assert split.disaggregated and split.breakdown is not None
    assert set(split.breakdown) == DECODE_SCORERS | {"total"}
    assert set(split.breakdown["total"]) == {D0, D1, P0}
    for name in ("prefix-cache", "in-flight-load", "queue-depth"):  # the prefill profile's
        assert P0 in split.breakdown[name]
    assert P0 not in split.breakdown["session-affinity"]


def test_debug_state_is_json_and_shows_indexed_blocks() -> None:
    s = make()
    store(s, D1, PROMPT, 0, 3)
    s.schedule(request())
    state = json.loads(json.dumps(s.debug_state()))
    assert state["policy"] == "kv-aware"
    by_address = {e["address"]: e for e in state["endpoints"]}
    assert set(by_address) == {D0, D1, P0}
    assert by_address[D1]["indexed_blocks"] == {"GPU": 3}
    assert by_address[D0]["indexed_blocks"] == {}
    assert by_address[D1]["name"] == "decode-1" and by_address[P0]["role"] == "prefill"
    assert by_address[D1]["in_flight_requests"] == 1
    assert by_address[D1]["subscriber"] is None and by_address[D1]["kv_events"] is None
    assert state["index"]["keys"] == 3
    assert state["index"]["stats"]["stored"] == 3
    assert state["pending_keys"] == 5
    assert state["block_size"] == BS and state["pd_threshold_tokens"] == THRESHOLD
    assert state["tokenizer"] == {"name": None, "loaded": False}
    assert [f["type"] for f in state["profiles"]["decode"]["filters"]] == [
        "healthy",
        "not-saturated",
    ]
    assert {sc["type"] for sc in state["profiles"]["decode"]["scorers"]} == DECODE_SCORERS


def test_explain_reports_index_and_pending_without_booking() -> None:
    s = make()
    store(s, D0, PROMPT, 0, 2)
    s.schedule(request(rid="1"))
    before = {a: st.in_flight_requests for a, st in s.states.items()}
    explained = s.explain(request(rid="2"))
    assert explained["prompt_tokens"] == 20 and explained["blocks"] == 5
    assert explained["indexed"] == {D0: 2}
    assert explained["expected"][D0] == 5  # indexed 0..1 and the routed request's claim 2..4
    assert {a: st.in_flight_requests for a, st in s.states.items()} == before


# ---- construction ----------------------------------------------------------------------------


def test_registered_as_kv_aware() -> None:
    s = SCHEDULERS.create("kv-aware", endpoints(), block_size=BS)
    assert isinstance(s, KVAwareScheduler)
    assert [st.address for st in s.decode_states] == [D0, D1]
    assert [st.address for st in s.prefill_states] == [P0]


async def test_prepare_without_tokenizer_returns_the_request_unchanged() -> None:
    s = make()
    req = SchedulingRequest("r", "m", "/v1/completions", {"prompt": "hello"})
    assert await s.prepare(req) is req


def test_same_seed_same_decisions() -> None:
    def run() -> list[str]:
        s = make(pending_ttl_s=0)
        prompts = [list(range(n * 100, n * 100 + 20)) for n in range(30)]
        return [s.schedule(request(p)).decode.address for p in prompts]

    first = run()
    assert first == run()
    assert Counter(first)[D0] > 5 and Counter(first)[D1] > 5  # cold prompts spread


def test_custom_profile_replaces_only_that_role() -> None:
    s = make(
        profiles={
            "decode": {
                "filters": [{"type": "healthy"}],
                "scorers": [{"type": "prefix-cache", "weight": 1}],
                "picker": {"type": "max-score"},
            }
        }
    )
    assert [sc["type"] for sc in s.decode_profile.describe()["scorers"]] == ["prefix-cache"]
    assert [f.name for f in s.decode_profile.filters] == ["healthy"]
    assert [sc.name for sc, _ in s.prefill_profile.scorers] == [
        "prefix-cache",
        "in-flight-load",
        "queue-depth",
    ]
    # Without not-saturated, the holder keeps every request of the prefix.
    store(s, D0, PROMPT, 0, 5)
    for i in range(12):
        assert s.schedule(request(rid=str(i))).decode.address == D0


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (
            {"profiles": {"encode": {}}},
            r"scheduler\.params\.profiles: unknown profiles \['encode'\]",
        ),
        ({"block_size": 0}, r"(?s)scheduler\.params: .*block_size"),
        ({"pd_threshold_tokens": -1}, r"(?s)scheduler\.params: .*pd_threshold_tokens"),
        ({"pending_ttl_s": -1}, r"(?s)scheduler\.params: .*pending_ttl_s"),
        ({"blocksize": 16}, r"(?s)scheduler\.params: .*blocksize"),
        (
            {"profiles": {"decode": {"scorers": [{"type": "nope"}]}}},
            r"scheduler\.params\.profiles\.decode\.scorers: unknown scorer 'nope'",
        ),
        (
            {"profiles": {"prefill": {"filters": [{"type": "healthy", "strict": True}]}}},
            r"scheduler\.params\.profiles\.prefill\.filters: .*strict",
        ),
        (
            {"profiles": {"decode": {"scorer": []}}},
            r"(?s)scheduler\.params: .*scorer",
        ),
    ],
)
def test_bad_params_are_config_errors(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(**params)
