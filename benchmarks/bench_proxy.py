"""Latency that our coordinator and sidecar add over talking to the worker directly, beside
vLLM's Rust router (``vllm-router``), all in front of the same fast stand-in OpenAI server.

The worker is :mod:`benchmarks.standin_openai` (a stand-in, not vLLM: no engine time, so the
proxies' own cost is not hidden). One stand-in process listens on a "decode" port and a "prefill"
port. Every proxy runs as a real process, started the way a deployment starts it:

    direct                 client -> stand-in
    sidecar                client -> sidecar -> stand-in                  (no prefiller: direct mode)
    sidecar P/D            client -> sidecar -> stand-in prefill (max_tokens 1, JSON)
                                             -> stand-in decode (with kv_transfer_params)
    coord rr               client -> coordinator (round-robin) -> stand-in
    coord kv-aware         client -> coordinator (kv-aware: tokenizes with tiny-qwen3) -> stand-in
    coord rr -> sidecar    client -> coordinator (round-robin) -> sidecar -> stand-in
    coord kv-aware, 2 replicas
                           client -> one of two coordinator processes (kv-aware) sharing one port
                                     (``coordinator.replicas: 2``, SO_REUSEPORT) -> stand-in
    coord rr, direct_to_worker
                           client -> coordinator (round-robin, ``direct_to_worker``: the same
                                     endpoint as above, its sidecar skipped) -> stand-in
    coord kv P/D chain     client -> coordinator (kv-aware, a prefill endpoint, every prompt cold
                                     so every request is disaggregated) -> sidecar P/D -> stand-in
    router rr              client -> vllm-router --policy round_robin -> stand-in
    router cache_aware     client -> vllm-router --policy cache_aware -> stand-in
    router P/D             client -> vllm-router --vllm-pd-disaggregation (nixl) -> stand-in x2

Each request is a streamed ``/v1/completions`` with a distinct seeded ~120-word prompt and
``max_tokens`` 16. TTFT is the time to the first SSE chunk carrying a token; end-to-end (E2E) is
the time to the end of the stream. Closed loop at each concurrency (1 and 64 by default) with a
fixed request count per path, spread over ``--rounds`` rounds in which the paths take turns
(rotated order), so that drift in the machine's load lands on every path alike; each (path,
concurrency) is also bounded in time. Added latency = path minus direct, per percentile, from the
same run. CPU time of every process (psutil) is sampled around each turn, so the CPU cost per
request of each hop is reported too: on a shared machine it is steadier than wall time.

With ``--compare-tree DIR`` (an older checkout, e.g. ``git worktree add DIR HEAD`` made before
a change), our sidecar and coordinators also run from DIR (``PYTHONPATH`` and working
directory), as paths named ``NAME (old)`` taking turns with the others in the same rounds: before
and after in one run. (Until 2026-12-07 they ran in this checkout's directory, where
``python -m pd_runtime`` imports this tree: the "(old)" paths of earlier runs ran the new code.)
The proxies' CPU per request is also kept per round, and each of our paths is divided by its
``(old)`` version and by vllm-router's hop (P/D mode for P/D paths) round by round: the paired
ratios' median and range are steadier than ratios of totals on a shared machine.

Writes ``proxy.json``, ``proxy.md``, ``proxy-c1.png``, ``proxy-c64.png`` and ``proxy-ratios-cN.png``
to ``--out``.

    python benchmarks/bench_proxy.py --out benchmarks/results/DATE-components
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a script run from a checkout: that checkout's pd_runtime
    sys.path.insert(0, str(REPO))

from pd_runtime.bench.machine import describe_machine  # noqa: E402
from pd_runtime.common.sse import DONE, SSEDecoder  # noqa: E402
from pd_runtime.common.stats import percentile  # noqa: E402

__all__ = ["Sample", "added_latency", "one_request", "summarize"]

PY = sys.executable
MODEL = "standin"
PREFILLER_HEADER = "x-prefiller-host-port"

# ---- arithmetic (unit-tested) -------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    ok: bool
    ttft_s: float | None
    e2e_s: float
    tokens: int


def summarize(samples: Sequence[Sample], wall_s: float) -> dict[str, Any]:
    """p50/p99 of TTFT and E2E in ms over the successful samples, errors, requests/s."""
    ok = [s for s in samples if s.ok and s.ttft_s is not None]
    out: dict[str, Any] = {"requests": len(samples), "errors": len(samples) - len(ok)}
    for key, vals in (("ttft", [s.ttft_s for s in ok]), ("e2e", [s.e2e_s for s in ok])):
        for q in (50, 99):
            out[f"{key}_p{q}_ms"] = (
                round(percentile(vals, q) * 1000, 3) if vals else None  # type: ignore[arg-type]
            )
    out["throughput_rps"] = round(len(samples) / wall_s, 1) if wall_s > 0 else None
    return out


def added_latency(path: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    """Path minus direct per metric (ms) and path / direct (ratio), same percentiles."""
    out: dict[str, Any] = {}
    for key in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms"):
        a, b = path.get(key), direct.get(key)
        out[f"added_{key}"] = round(a - b, 3) if a is not None and b is not None else None
        out[f"ratio_{key.removesuffix('_ms')}"] = round(a / b, 2) if a and b else None
    return out


# ---- load ---------------------------------------------------------------------------------------


async def one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> Sample:
    """POST a streamed completion; TTFT at the first SSE event that carries a token."""
    started = time.perf_counter()
    ttft = None
    tokens = 0
    done = False
    try:
        async with session.post(url, data=body, headers=headers) as r:
            ok = r.status == 200
            sse = SSEDecoder()
            async for piece in r.content.iter_any():
                for data in sse.feed(piece):
                    if data == DONE:
                        done = True
                        continue
                    if '"error"' in data:
                        ok = False
                    tokens += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
    except (TimeoutError, aiohttp.ClientError):
        ok = False
    return Sample(ok and done and tokens > 0, ttft, time.perf_counter() - started, tokens)


_TEXT = """the of and a to in is that for it as with was on be by this are from or at an which
have model cache request block prefix engine token server memory river machine program number
people water morning garden question answer kernel latency router decode prefill transfer"""
WORDS = _TEXT.split()


def make_bodies(n: int, seed: int, words: int, max_tokens: int) -> list[bytes]:
    """Distinct seeded prompts: every prompt starts differently (no shared prefix)."""
    rng = random.Random(seed)
    return [
        json.dumps(
            {
                "model": MODEL,
                "prompt": f"Request {seed}-{i}: " + " ".join(rng.choices(WORDS, k=words)),
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            }
        ).encode()
        for i in range(n)
    ]


async def closed_loop(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    bodies: list[bytes],
    concurrency: int,
    deadline: float,
) -> tuple[list[Sample], float]:
    samples: list[Sample] = []
    it = iter(bodies)

    async def worker() -> None:
        for body in it:
            if time.monotonic() > deadline:
                return
            samples.append(await one_request(session, url, body, headers))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


# ---- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    health_url: str
    popen: subprocess.Popen[bytes] | None = None
    ps: psutil.Process | None = None
    env: dict[str, str] = field(default_factory=dict)  # e.g. PYTHONPATH of an older tree
    # Where it runs: for an older tree, that tree (``python -m`` puts the working directory
    # first on sys.path, ahead of PYTHONPATH: from this checkout it would import this tree).
    cwd: str | None = None

    def start(self, log_dir: Path) -> None:
        # A process left over from an earlier run on the same port would answer the health check
        # and the requests while this one fails to bind: its CPU would not be measured.
        address = urlsplit(self.health_url)
        with socket.socket() as probe:
            if probe.connect_ex((address.hostname or "127.0.0.1", address.port or 80)) == 0:
                raise RuntimeError(
                    f"{self.name}: port {address.port} is already in use (a process left over "
                    "from an earlier run?)"
                )
        log = open(log_dir / f"{self.name}.log", "wb")  # noqa: SIM115 (kept open for the child)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.popen = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        self.ps = psutil.Process(self.popen.pid)

    def cpu_s(self) -> float:
        assert self.ps is not None
        t = self.ps.cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


async def wait_healthy(session: aiohttp.ClientSession, proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.popen is not None
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}; see its log")
        try:
            async with session.get(proc.health_url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{proc.name} not healthy after {timeout_s:.0f}s")


@dataclass
class PathSpec:
    name: str
    url: str
    hops: str
    procs: list[str]  # processes whose CPU time the path's requests use
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})


def coordinator_yaml(
    port: int,
    policy: str,
    endpoints: list[dict[str, str]],
    model: Path,
    extra: dict[str, Any] | None = None,
) -> str:
    params: dict[str, Any] = {}
    if policy == "kv-aware":
        params = {"tokenizer": str(model), "block_size": 32, "pd_threshold_tokens": 16}
    return json.dumps(  # JSON is YAML
        {
            "host": "127.0.0.1",
            "port": port,
            "models": [MODEL],
            "endpoints": endpoints,
            "scheduler": {"policy": policy, "params": params},
            **(extra or {}),
        },
        indent=2,
    )


def ours(
    args: argparse.Namespace,
    run_dir: Path,
    *,
    offset: int = 0,
    tag: str = "",
    env: dict[str, str] | None = None,
) -> tuple[list[Proc], list[PathSpec]]:
    """Our sidecar and coordinators, and the paths through them, for one source tree: this one,
    or (``--compare-tree``) an older checkout, ports shifted by ``offset`` and names tagged."""
    b = args.base_port + offset
    host = "127.0.0.1"
    decode, prefill = f"{host}:{args.base_port + 1}", f"{host}:{args.base_port + 2}"
    sidecar = f"http://{host}:{b + 11}"
    model = Path(args.model).resolve()
    env = env or {}
    procs = [
        Proc(
            f"sidecar{tag}",
            [
                PY,
                "-m",
                "pd_runtime",
                "sidecar",
                "--port",
                str(b + 11),
                *("--decode-url", f"http://{decode}", "--prefiller", prefill),
                *("--log-level", args.log_level),
            ],
            f"{sidecar}/health",
            env=env,
        ),
    ]
    d_standin = {"name": "decode-0", "role": "decode", "address": decode, "url": f"http://{decode}"}
    d_sidecar = {**d_standin, "url": sidecar}
    p_standin = {
        "name": "prefill-0",
        "role": "prefill",
        "address": prefill,
        "url": f"http://{prefill}",
    }
    coords: dict[str, tuple[int, str, list[dict[str, str]], dict[str, Any]]] = {
        "coord-rr": (b + 21, "round-robin", [d_standin], {}),
        "coord-kv": (b + 22, "kv-aware", [d_standin], {}),
        "coord-rr-sidecar": (b + 23, "round-robin", [d_sidecar], {}),
        "coord-kv-pd": (b + 24, "kv-aware", [d_sidecar, p_standin], {}),
    }
    replicas: dict[str, int] = {}  # coordinator name -> its own port (shared port in coords)
    if not tag:  # an older tree may not know the settings
        direct = {"direct_to_worker": True}
        coords["coord-rr-direct"] = (b + 25, "round-robin", [d_sidecar], direct)
        shared = {"reuse_port": True}
        for k in range(2):  # two replicas of coord kv-aware on one port
            coords[f"coord-kv-r{k}"] = (b + 28, "kv-aware", [d_standin], shared)
            replicas[f"coord-kv-r{k}"] = b + 26 + k
    for name, (port, policy, endpoints, extra) in coords.items():
        cfg = run_dir / f"{name}{tag}.yaml"
        cfg.write_text(coordinator_yaml(port, policy, endpoints, model, extra))
        own = replicas.get(name)
        procs.append(
            Proc(
                f"{name}{tag}",
                [
                    PY,
                    "-m",
                    "pd_runtime",
                    "coordinator",
                    "--config",
                    str(cfg),
                    "--log-level",
                    args.log_level,
                    *(("--replica-port", str(own)) if own else ()),
                ],
                f"http://{host}:{own or port}/health",
                env=env,
            )
        )
    gen = "/v1/completions"
    paths = [
        PathSpec(
            f"sidecar{tag}",
            f"{sidecar}{gen}",
            "-> sidecar -> stand-in",
            [f"sidecar{tag}", "standin"],
        ),
        PathSpec(
            f"sidecar P/D{tag}",
            f"{sidecar}{gen}",
            "-> sidecar -> stand-in prefill, then stand-in decode",
            [f"sidecar{tag}", "standin"],
            {"content-type": "application/json", PREFILLER_HEADER: prefill},
        ),
        PathSpec(
            f"coord rr{tag}",
            f"http://{host}:{b + 21}{gen}",
            "-> coordinator (round-robin) -> stand-in",
            [f"coord-rr{tag}", "standin"],
        ),
        PathSpec(
            f"coord kv-aware{tag}",
            f"http://{host}:{b + 22}{gen}",
            "-> coordinator (kv-aware) -> stand-in",
            [f"coord-kv{tag}", "standin"],
        ),
        PathSpec(
            "coord kv-aware, 2 replicas",
            f"http://{host}:{b + 28}{gen}",
            "-> one of 2 coordinator processes on one port (kv-aware, SO_REUSEPORT) -> stand-in",
            ["coord-kv-r0", "coord-kv-r1", "standin"],
        ),
        PathSpec(
            f"coord rr -> sidecar{tag}",
            f"http://{host}:{b + 23}{gen}",
            "-> coordinator (rr) -> sidecar -> stand-in",
            [f"coord-rr-sidecar{tag}", f"sidecar{tag}", "standin"],
        ),
        PathSpec(
            "coord rr, direct_to_worker",
            f"http://{host}:{b + 25}{gen}",
            "-> coordinator (rr, direct_to_worker: the sidecar skipped) -> stand-in",
            ["coord-rr-direct", "sidecar", "standin"],
        ),
        PathSpec(
            f"coord kv P/D chain{tag}",
            f"http://{host}:{b + 24}{gen}",
            "-> coordinator (kv-aware, P/D) -> sidecar -> stand-in prefill + decode",
            [f"coord-kv-pd{tag}", f"sidecar{tag}", "standin"],
        ),
    ]
    if tag:
        paths = [p for p in paths if "direct_to_worker" not in p.name and "replicas" not in p.name]
    return procs, paths


def topology(args: argparse.Namespace, run_dir: Path) -> tuple[list[Proc], list[PathSpec]]:
    b = args.base_port
    host = "127.0.0.1"
    decode, prefill = f"{host}:{b + 1}", f"{host}:{b + 2}"
    procs = [
        Proc(
            "standin",
            [
                PY,
                str(REPO / "benchmarks" / "standin_openai.py"),
                *("--port", str(b + 1)),
                *(
                    "--port",
                    str(b + 2),
                    "--ttft-ms",
                    str(args.ttft_ms),
                    "--itl-ms",
                    str(args.itl_ms),
                ),
            ],
            f"http://{decode}/health",
        ),
    ]
    router = [args.router, "--host", host, "--log-level", args.router_log_level]
    routers = {
        "router-rr": (b + 31, ["--worker-urls", f"http://{decode}", "--policy", "round_robin"]),
        "router-cache": (b + 32, ["--worker-urls", f"http://{decode}", "--policy", "cache_aware"]),
        "router-pd": (
            b + 33,
            [
                "--vllm-pd-disaggregation",
                "--prefill",
                f"http://{prefill}",
                "--decode",
                f"http://{decode}",
                "--kv-connector",
                "nixl",
                "--policy",
                "round_robin",
            ],
        ),
    }
    if not args.no_router:
        for i, (name, (port, extra)) in enumerate(routers.items()):
            procs.append(
                Proc(
                    name,
                    [
                        *router,
                        "--port",
                        str(port),
                        "--prometheus-host",
                        host,
                        "--prometheus-port",
                        str(b + 41 + i),
                        *extra,
                    ],
                    f"http://{host}:{port}/health",
                )
            )
    gen = "/v1/completions"
    paths = [
        PathSpec("direct", f"http://{decode}{gen}", "client -> stand-in", ["standin"]),
    ]
    mine, my_paths = ours(args, run_dir)
    procs += mine
    paths += my_paths
    if args.compare_tree:
        old = str(Path(args.compare_tree).resolve())
        theirs, their_paths = ours(
            args, run_dir, offset=args.compare_offset, tag=" (old)", env={"PYTHONPATH": old}
        )
        for proc in theirs:
            proc.cwd = old
        procs += theirs
        paths += their_paths
    if not args.no_router:
        paths += [
            PathSpec(
                "router rr",
                f"http://{host}:{b + 31}{gen}",
                "-> vllm-router round_robin -> stand-in",
                ["router-rr", "standin"],
            ),
            PathSpec(
                "router cache_aware",
                f"http://{host}:{b + 32}{gen}",
                "-> vllm-router cache_aware -> stand-in",
                ["router-cache", "standin"],
            ),
            PathSpec(
                "router P/D",
                f"http://{host}:{b + 33}{gen}",
                "-> vllm-router P/D (nixl) -> stand-in prefill + decode",
                ["router-pd", "standin"],
            ),
        ]
    if args.paths:
        wanted = set(args.paths)
        paths = [p for p in paths if p.name in wanted or p.name.removesuffix(" (old)") in wanted]
    return procs, paths


# ---- the run ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, procs: list[Proc], paths: list[PathSpec]) -> dict[str, Any]:
    by_name = {p.name: p for p in procs}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s)
    results: dict[str, dict[str, Any]] = {p.name: {"hops": p.hops} for p in paths}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for proc in procs:
            await wait_healthy(session, proc, 60)
        print(f"[proxy] {len(procs)} processes healthy", flush=True)
        for conc, total in zip(args.concurrency, args.requests, strict=True):
            per_round = max(1, total // args.rounds)
            cells: dict[str, dict[str, Any]] = {
                p.name: {"samples": [], "wall_s": 0.0, "cpu_s": {}, "calls": {}, "rounds": []}
                for p in paths
            }
            budget = args.max_seconds / args.rounds
            for r in range(args.rounds):
                order = paths[r % len(paths) :] + paths[: r % len(paths)]
                for path in order:
                    seed = args.seed * 1_000_003 + conc * 1009 + r * 31 + paths.index(path)
                    if r == 0:  # warm-up: connections, caches, JIT-less but lazy imports
                        warm = make_bodies(args.warmup, seed + 7_777, args.prompt_words, 16)
                        await closed_loop(
                            session,
                            path.url,
                            path.headers,
                            warm,
                            min(conc, 8),
                            time.monotonic() + 30,
                        )
                    bodies = make_bodies(per_round, seed, args.prompt_words, args.max_tokens)
                    calls0 = await standin_calls(session, args.base_port + 1)
                    cpu0 = {n: by_name[n].cpu_s() for n in by_name}
                    me0 = time.process_time()
                    samples, wall = await closed_loop(
                        session, path.url, path.headers, bodies, conc, time.monotonic() + budget
                    )
                    calls1 = await standin_calls(session, args.base_port + 1)
                    cell = cells[path.name]
                    for k, v in calls1.items():
                        cell["calls"][k] = cell["calls"].get(k, 0) + v - calls0.get(k, 0)
                    cell["samples"] += samples
                    cell["wall_s"] += wall
                    deltas = {n: by_name[n].cpu_s() - cpu0[n] for n in by_name}
                    deltas["load-generator"] = time.process_time() - me0
                    for n, d in deltas.items():
                        cell["cpu_s"][n] = cell["cpu_s"].get(n, 0.0) + d
                    # This round's CPU of the path's proxies per request, for the paired ratios.
                    proxies = sum(deltas[n] for n in path.procs if n != "standin")
                    cell["rounds"].append(round(proxies * 1000 / max(1, len(samples)), 4))
                    bad = sum(not s.ok for s in samples)
                    print(
                        f"[proxy] c={conc} round {r + 1}/{args.rounds} {path.name:<20} "
                        f"{len(samples)} req in {wall:.1f}s ({bad} errors)",
                        flush=True,
                    )
            for path in paths:
                cell = cells[path.name]
                stats = summarize(cell["samples"], cell["wall_s"])
                n = max(1, len(cell["samples"]))
                stats["cpu_ms_per_request"] = {
                    k: round(v * 1000 / n, 3)
                    for k, v in cell["cpu_s"].items()
                    if k in path.procs or k == "load-generator"
                }
                stats["cpu_ms_per_request_elsewhere"] = round(
                    sum(
                        v
                        for k, v in cell["cpu_s"].items()
                        if k not in path.procs and k != "load-generator"
                    )
                    * 1000
                    / n,
                    3,
                )
                stats["standin_calls"] = cell["calls"]
                stats["proxy_cpu_ms_per_round"] = cell["rounds"]
                results[path.name][f"c{conc}"] = stats
            direct = results.get("direct", {}).get(f"c{conc}")
            if direct:
                for path in paths:
                    stats = results[path.name][f"c{conc}"]
                    stats.update(added_latency(stats, direct))
    return results


async def standin_calls(session: aiohttp.ClientSession, port: int) -> dict[str, int]:
    """The stand-in's request counters by role: which hops a path really made (P/D paths must
    show one prefill call per request, on the prefill port, not streamed)."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    calls: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("standin_requests_total{"):
            labels, value = line.split("} ")
            role = "decode" if f'port="{port}"' in labels else "prefill"
            kind = "stream" if 'stream="true"' in labels else "json"
            calls[f"{role}_{kind}"] = int(float(value))
    return calls


def machine() -> dict[str, Any]:
    return describe_machine(extra_versions=("aiohttp", "uvicorn", "fastapi", "httpx"))


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    return (
        f"{v:+.2f}"
        if isinstance(v, float) and v < 0
        else (f"{v:.2f}" if isinstance(v, float) else str(v))
    )


TABLE_COLUMNS = [
    "path", "requests", "errors", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99",
    "added TTFT p50 / p99", "added E2E p50 / p99", "E2E p50 ratio", "req/s",
    "CPU ms/req (proxies)", "prefill calls/req",
]  # fmt: skip


def _section(title: str, columns: Sequence[str]) -> list[str]:
    """A markdown heading and the head of its table."""
    return [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def table(results: dict[str, Any], concurrency: list[int]) -> str:
    lines = []
    for c in concurrency:
        lines += _section(f"Concurrency {c}", TABLE_COLUMNS)
        for name, r in results.items():
            s = r.get(f"c{c}")
            if not s:
                continue
            cpu = ", ".join(
                f"{k} {v:.2f}"
                for k, v in s["cpu_ms_per_request"].items()
                if k not in ("standin", "load-generator")
            )
            added_t = f"{fmt(s.get('added_ttft_p50_ms'))} / {fmt(s.get('added_ttft_p99_ms'))}"
            added_e = f"{fmt(s.get('added_e2e_p50_ms'))} / {fmt(s.get('added_e2e_p99_ms'))}"
            lines.append(
                f"| {name} | {s['requests']} | {s['errors']} | {fmt(s['ttft_p50_ms'])} | "
                f"{fmt(s['ttft_p99_ms'])} | {fmt(s['e2e_p50_ms'])} | {fmt(s['e2e_p99_ms'])} | "
                f"{added_t} | {added_e} | {fmt(s.get('ratio_e2e_p50'))} | "
                f"{fmt(s['throughput_rps'])} | {cpu or '-'} | "
                f"{s['standin_calls'].get('prefill_json', 0) / max(1, s['requests']):.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def reference_of(name: str, names: Sequence[str]) -> list[str]:
    """What a path's CPU is compared with, round by round: its own ``(old)`` version when the run
    has one, and vllm-router's hop of the same kind (its P/D mode for P/D chains, round_robin for
    the rest; the issue's targets are stated against those)."""
    if name.startswith("router "):
        return []
    refs = [f"{name} (old)"] if f"{name} (old)" in names else []
    base = name.removesuffix(" (old)")
    router = "router P/D" if "P/D" in base else "router rr"
    return [*refs, *([router] if router in names else [])]


def paired_ratios(results: dict[str, Any], concurrency: list[int]) -> dict[str, Any]:
    """Per concurrency and (path, reference): the proxies' CPU per request of the path over the
    reference's, in each round (the two took turns in it, so a slow neighbour moves both), and
    the min / median / max over rounds."""
    out: dict[str, Any] = {}
    for c in concurrency:
        key = f"c{c}"
        rounds = {
            n: r[key]["proxy_cpu_ms_per_round"]
            for n, r in results.items()
            if key in r and any(r[key].get("proxy_cpu_ms_per_round", ()))  # direct: no proxy
        }
        cells = {}
        for name, mine in rounds.items():
            for ref in reference_of(name, list(rounds)):
                ratios = [a / b for a, b in zip(mine, rounds[ref], strict=False) if b > 0]
                if ratios:
                    cells[f"{name} / {ref}"] = {
                        "per_round": [round(x, 3) for x in ratios],
                        "min": round(min(ratios), 3),
                        "median": round(percentile(ratios, 50), 3),
                        "max": round(max(ratios), 3),
                    }
        out[key] = cells
    return out


def ratios_table(ratios: dict[str, Any]) -> str:
    lines = []
    for key, cells in ratios.items():
        if not cells:
            continue
        lines += _section(
            f"Proxy CPU per request, paired by round, concurrency {key[1:]}",
            ["path / reference", "median", "min", "max", "per round"],
        )
        for pair, r in cells.items():
            rounds = " ".join(f"{x:.2f}" for x in r["per_round"])
            lines.append(
                f"| {pair} | **{r['median']:.2f}** | {r['min']:.2f} | {r['max']:.2f} | {rounds} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument(
        "--requests", type=int, nargs="+", default=[400, 2000], help="per path, per concurrency"
    )
    ap.add_argument("--rounds", type=int, default=4, help="paths take turns this many times")
    ap.add_argument("--warmup", type=int, default=40, help="requests per path before measuring")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="per (path, concurrency)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prompt-words", type=int, default=120)
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="stand-in's time to first token")
    ap.add_argument("--itl-ms", type=float, default=0.0, help="stand-in's inter-token latency")
    ap.add_argument("--request-timeout-s", type=float, default=60.0)
    ap.add_argument("--base-port", type=int, default=13000)
    ap.add_argument(
        "--model",
        default=str(REPO / ".cache" / "models" / "tiny-qwen3"),
        help="tokenizer for kv-aware",
    )
    ap.add_argument("--router", default=str(Path(PY).parent / "vllm-router"))
    ap.add_argument("--log-level", default="info", help="our sidecar's and coordinators'")
    ap.add_argument("--router-log-level", default="info")
    ap.add_argument("--no-router", action="store_true", help="skip vllm-router paths")
    ap.add_argument("--paths", nargs="*", help="only these paths (names as in the table)")
    ap.add_argument(
        "--compare-tree",
        type=Path,
        default=None,
        help="also run our hops from this older checkout (PYTHONPATH), as 'NAME (old)' paths, "
        "side by side in the same rounds (e.g. a 'git worktree add DIR HEAD' made before a change)",
    )
    ap.add_argument("--compare-offset", type=int, default=100, help="port shift for those hops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-dir", type=Path, default=REPO / "runs" / "bench-proxy")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if len(args.requests) != len(args.concurrency):
        ap.error("--requests needs one count per --concurrency")
    if not Path(args.model).exists():
        from pd_runtime.model.tiny import write_model

        write_model(args.model)
    if not args.no_router and not Path(args.router).exists():
        print(f"[proxy] {args.router} not found (pip install -e '.[bench]'): router paths skipped")
        args.no_router = True
    args.run_dir.mkdir(parents=True, exist_ok=True)
    procs, paths = topology(args, args.run_dir)
    needed = {n for p in paths for n in p.procs}
    procs = [p for p in procs if p.name in needed]
    t0 = time.perf_counter()
    try:
        for proc in procs:
            proc.start(args.run_dir)
        results = asyncio.run(run(args, procs, paths))
    finally:
        for proc in procs:
            proc.stop()
    ratios = paired_ratios(results, args.concurrency)
    md = table(results, args.concurrency) + "\n" + ratios_table(ratios)
    print("\n" + md)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.out:
        write(args, results, ratios, md)
    errors = sum(
        r[f"c{c}"]["errors"] for r in results.values() for c in args.concurrency if f"c{c}" in r
    )
    return 1 if errors else 0


def write(
    args: argparse.Namespace, results: dict[str, Any], ratios: dict[str, Any], md: str
) -> None:
    from pd_runtime.bench.plots import bar_chart

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    note = (
        f"{os.cpu_count()} cores shared by the load generator, every proxy and the stand-in "
        "(and, on our shared machine, other work): at concurrency 64 the numbers measure CPU "
        "contention as much as each hop's own latency"
    )
    payload = {
        "machine": machine(),
        "note": note,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "paired_ratios": ratios,
    }
    (out / "proxy.json").write_text(json.dumps(payload, indent=2) + "\n")
    head = (
        "Proxy overhead against a fast stand-in OpenAI server (no engine): streamed "
        f"/v1/completions, {args.max_tokens} tokens, stand-in TTFT {args.ttft_ms} ms and ITL "
        f"{args.itl_ms} ms. Times in ms. Added = path minus direct in the same run. Note: {note}.\n"
    )
    (out / "proxy.md").write_text(head + "\n" + md)
    for c in args.concurrency:
        rows = {n: r[f"c{c}"] for n, r in results.items() if f"c{c}" in r}
        bar_chart(
            out / f"proxy-c{c}.png",
            f"Latency through each path, concurrency {c} (stand-in server, no engine)",
            list(rows),
            {
                "TTFT p50": [s["ttft_p50_ms"] or 0 for s in rows.values()],
                "TTFT p99": [s["ttft_p99_ms"] or 0 for s in rows.values()],
                "E2E p50": [s["e2e_p50_ms"] or 0 for s in rows.values()],
                "E2E p99": [s["e2e_p99_ms"] or 0 for s in rows.values()],
            },
            ylabel="ms (log scale)",
            log=True,
            size=(1400, 620),
        )
    plot_ratios(out, ratios)


def plot_ratios(out: Path, ratios: dict[str, Any]) -> None:
    """``proxy-ratios-cN.png``: each paired ratio's median, min and max over the rounds, with
    issue 12's 1.5x (a hop over vllm-router's) and 1.0 (no change from the old tree) drawn."""
    from pd_runtime.bench.plots import bar_chart

    for key, cells in ratios.items():
        if not cells:
            continue
        stats = ("median", "min", "max")
        bar_chart(
            out / f"proxy-ratios-{key}.png",
            f"Proxy CPU per request over the reference's, paired by round, concurrency {key[1:]}",
            list(cells),
            {s: [r[s] for r in cells.values()] for s in stats},
            ylabel="ratio",
            targets={"1.5x (issue 12, hop / vllm-router)": 1.5, "1.0": 1.0},
            size=(1400, 620),
        )


if __name__ == "__main__":
    raise SystemExit(main())
