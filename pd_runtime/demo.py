"""The guided tour ``make demo`` runs once the local deployment is up.

It shows, from the system's own outputs: the models behind the gateway; a ~200-word prompt sent twice;
the coordinator's decision for each (its ``Got pod scores`` log lines); and, from the workers' own
Prometheus metrics, that the prefill worker computed the prompt and the decode workers pulled the
KV blocks over NIXL.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from pd_runtime.common.prom import scrape_metrics
from pd_runtime.launcher.topology import DeploymentPlan

__all__ = ["DEMO_PROMPT", "pod_score_lines", "run_demo"]

DEMO_PROMPT = (
    "Disaggregated serving splits the life of a request in two. The prefill phase reads the whole "
    "prompt at once and computes its key and value cache; it is bound by arithmetic and keeps every "
    "core busy. The decode phase then produces one token at a time from that cache; it is bound by "
    "memory bandwidth and spends most of its time waiting for weights to stream in. When both phases "
    "share one accelerator, a single long prompt can stall every conversation that is in the middle "
    "of decoding, and the tail latency of the whole fleet suffers. Splitting the phases lets each "
    "pool be sized and tuned for its own bottleneck. A prefill worker computes the cache and keeps "
    "its blocks; a decode worker pulls those blocks across the network with a zero-copy transfer "
    "library and continues as if it had computed them itself. A gateway in front decides, for every "
    "request, which decode worker should serve it, whether a separate prefill is worth the transfer, "
    "and which prefill worker should do it. Good decisions depend on knowing which worker already "
    "holds which prefix, how long each queue is, and how full each cache has become. This demo "
    "sends the same prompt twice so that you can watch those decisions being made and the blocks "
    "moving between the workers."
)

BAR = "─" * 78


def _step(n: int, title: str) -> None:
    print(f"\n{BAR}\n[{n}] {title}\n{BAR}", flush=True)


def pod_score_lines(
    log_paths: Path | list[Path], request_ids: list[str]
) -> dict[str, dict[str, object]]:
    """The coordinator's decision record for each of these request ids, parsed from its log (or
    its replicas' logs): the last one logged (a request that failed over logs one per attempt)."""
    found: dict[str, dict[str, object]] = {}
    marker = "Got pod scores "
    for log_path in [log_paths] if isinstance(log_paths, Path) else log_paths:
        for line in log_path.read_text(errors="replace").splitlines():
            if marker in line:
                record = json.loads(line.split(marker, 1)[1])
                if record.get("x-request-id") in request_ids:
                    found[str(record["x-request-id"])] = record
    return found


def _metric(plan: DeploymentPlan, role: str, name: str) -> dict[str, float]:
    """``name`` from each ``role`` endpoint's own /metrics."""
    return {
        e.name: scrape_metrics(e.metrics_url).get(name, 0.0) for e in plan.coordinator.by_role(role)
    }


NIXL_TRANSFERS = "vllm:nixl_xfer_time_seconds_count"
PROMPT_TOKENS = "vllm:prompt_tokens_total"


def run_demo(plan: DeploymentPlan, run_dir: Path) -> int:
    gateway = plan.gateway_url
    model = plan.coordinator.served_names[0]  # with several models: the first
    with httpx.Client(base_url=gateway, timeout=300.0) as client:
        _step(1, f"The gateway {gateway} lists the models it serves (GET /v1/models)")
        models = client.get("/v1/models").json()
        print(json.dumps(models, indent=2))

        transfers_before = _metric(plan, "decode", NIXL_TRANSFERS)
        prefill_before = _metric(plan, "prefill", PROMPT_TOKENS)
        request_ids: list[str] = []
        _step(2, f"Sending a {len(DEMO_PROMPT.split())}-word prompt twice through the gateway")
        for attempt in (1, 2):
            if attempt == 2:
                time.sleep(1.0)  # the first request's KV events reach the coordinator's index
            request_id = f"demo-{int(time.time())}-{attempt}"
            request_ids.append(request_id)
            started = time.perf_counter()
            response = client.post(
                "/v1/completions",
                headers={"x-request-id": request_id},
                json={"model": model, "prompt": DEMO_PROMPT, "max_tokens": 24, "temperature": 0},
            )
            response.raise_for_status()
            body = response.json()
            print(
                f"request {request_id}: {response.status_code} in "
                f"{time.perf_counter() - started:.2f}s, usage {body['usage']}"
            )
            print(
                f"  text (random weights, so gibberish, but deterministic): "
                f"{body['choices'][0]['text']!r}"
            )

        _step(3, "What the coordinator decided (its 'Got pod scores' log lines)")
        records = pod_score_lines(sorted(run_dir.glob("coordinator*.log")), request_ids)
        for request_id in request_ids:
            record = records.get(request_id)
            print(
                f"Got pod scores {json.dumps(record)}" if record else f"{request_id}: no log line"
            )
        print(
            "target = the decode worker chosen; prefill = the prefill worker that computed the "
            "prompt's KV blocks (null: the decode worker serves it alone); scores = share of the "
            "prompt each endpoint already holds, learned from the workers' KV events (null: "
            "none); reason = why the request was or was not disaggregated; breakdown = every "
            "scorer's score for the best-scored endpoints (all of them when the coordinator logs at DEBUG). With the kv-aware policy the second request finds "
            "the prompt cached on the first one's decode worker and goes there directly."
        )

        _step(4, "The KV blocks travelled over NIXL (from the workers' own /metrics)")
        transfers_after = _metric(plan, "decode", NIXL_TRANSFERS)
        prefill_after = _metric(plan, "prefill", PROMPT_TOKENS)
        for name, count in transfers_after.items():
            delta = count - transfers_before.get(name, 0.0)
            print(
                f"{name}: vllm:nixl_xfer_time_seconds_count {transfers_before.get(name, 0):.0f} "
                f"-> {count:.0f}  (+{delta:.0f} NIXL transfers)"
            )
        for name, tokens in prefill_after.items():
            delta = tokens - prefill_before.get(name, 0.0)
            print(
                f"{name}: vllm:prompt_tokens_total +{delta:.0f} (the prefill worker computed "
                f"the prompts)"
            )
        moved = sum(transfers_after.values()) - sum(transfers_before.values())
        print(f"\n{moved:.0f} NIXL transfers for 2 requests. Logs of every part: {run_dir}/")
        _step(5, "Shutting down")
    return 0 if moved >= 1 else 1
