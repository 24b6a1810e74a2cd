"""KV-transfer bandwidth with NIXL between two processes on this machine, against plain copies.

Two processes per UCX transport variant (``UCX_TLS``: ``tcp`` alone, and ``tcp,sm,self``, what
pd-runtime sets on a node without RDMA, where UCX reads the peer's memory with cma, i.e.
``process_vm_readv``, and keeps TCP for its active messages; ``sm`` or ``sm,self`` alone fail in
NIXL: its UCX endpoints ask for peer-failure handling, which no shared-memory transport offers):

* the *target* owns the remote buffer (a POSIX shared-memory segment the parent filled with a
  pattern: every 8-byte word holds its index) and registers it with its NIXL agent;
* the *initiator* registers a private buffer, loads the target's agent metadata (sent over a
  pipe: ``get_agent_metadata`` / ``add_remote_agent``) and runs ``initialize_xfer`` + ``transfer``
  + ``check_xfer_state`` (busy polled) READs (what vLLM's NixlConnector does: the decode side pulls)
  and WRITEs, then checks that the bytes arrived (``verified``).

Both agents get the UCX progress thread's poll timeout from :mod:`pd_runtime.worker.vllm_plugin`
(``install_progress_delay``, ``--progress-delay-us``, 1000 µs as on our CPU workers): with NIXL's
default of 0 the thread spins a whole core, which on 2 cores would eat the benchmark itself.

Layouts, each from 64 KiB to 256 MiB in all:

* ``bulk``: one descriptor for the whole region;
* ``block-4KiB``: one descriptor per KV block of one layer's K (or V) of tiny-qwen3
  (16 tokens x 2 KV heads x head_dim 64 x 2 bytes), as vLLM registers KV per layer and block;
* ``block-32KiB``: the same for a Llama-3-8B-like layer (16 tokens x 8 KV heads x 128 x 2 bytes).

Block descriptors land on distinct, shuffled slots on both sides (seeded), as KV blocks are
scattered in the cache, so NIXL cannot merge neighbours into one large descriptor.

Baselines (same bytes, same layouts): ``memcpy`` in one process (``np.copyto`` for bulk,
``np.take`` gather of the same shuffled slots for blocks) and ``shm copy``: a second process
copying out of the shared-memory segment the first one filled.

Reported per (method, layout, size): median GB/s (10^9 bytes/s) over repetitions (at least
``--min-reps``, at most ``--max-reps``, until ``--min-time-s``), the best, descriptors per second
and the one-off preparation time (descriptor lists + ``initialize_xfer``).

Writes ``nixl.json``, ``nixl.md`` and ``nixl-<layout>.png`` to ``--out``.

    python benchmarks/bench_nixl.py --out benchmarks/results/DATE-components
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["LAYOUTS", "fill_pattern", "nixl_pair", "run_pair", "slots_for"]

KIB, MIB = 2**10, 2**20
LAYOUTS = {"bulk": 0, "block-4KiB": 4 * KIB, "block-32KiB": 32 * KIB}
SIZES = [64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB]


def fill_pattern(buf: np.ndarray) -> None:
    """Every 8-byte word holds its own index: any misplaced block shows."""
    words = buf[: len(buf) // 8 * 8].view(np.uint64)
    words[:] = np.arange(len(words), dtype=np.uint64)


def slots_for(
    layout: str, size: int, capacity: int, rng: np.random.Generator
) -> tuple[int, np.ndarray, np.ndarray]:
    """(descriptor bytes, local slots, remote slots): distinct shuffled slots on each side."""
    desc = LAYOUTS[layout] or size
    n = size // desc
    slots = capacity // desc
    if n == 1:
        return desc, np.zeros(1, np.int64), np.zeros(1, np.int64)
    return desc, rng.choice(slots, n, replace=False), rng.choice(slots, n, replace=False)


def _descs(base: int, desc: int, slots: np.ndarray) -> np.ndarray:
    out = np.empty((len(slots), 3), dtype=np.uint64)
    out[:, 0] = base + slots.astype(np.uint64) * desc
    out[:, 1] = desc
    out[:, 2] = 0
    return out


def _agent(name: str, tls: str, delay_us: int):  # type: ignore[no-untyped-def]
    """A NIXL agent with the UCX backend, its progress thread given ``delay_us`` as our vLLM
    plugin gives it (the env var must be set before the backend creates its UCX context)."""
    os.environ["UCX_TLS"] = tls
    import nixl._api as api

    from pd_runtime.worker.vllm_plugin import install_progress_delay

    if delay_us >= 0:
        install_progress_delay(api, delay_us)
    return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))


def _target(conn: Connection, shm_name: str, tls: str, delay_us: int) -> None:
    shm = SharedMemory(name=shm_name)
    try:
        buf = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
        agent = _agent("target", tls, delay_us)
        agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
        conn.send((agent.get_agent_metadata(), buf.ctypes.data))
        conn.recv()  # "done": keep the memory registered until the initiator finishes
        del buf
    finally:
        shm.close()


def _timed(fn: Any, min_reps: int, max_reps: int, min_time_s: float) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (
        len(times) < max_reps and time.perf_counter() - start < min_time_s
    ):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _row(method: str, layout: str, desc: int, size: int, times: list[float], **extra: Any) -> dict:
    med = statistics.median(times)
    n = size // desc
    return {
        "method": method,
        "layout": layout,
        "desc_bytes": desc,
        "size_bytes": size,
        "descs": n,
        "reps": len(times),
        "median_ms": round(med * 1000, 4),
        "gbps": round(size / med / 1e9, 3),
        "best_gbps": round(size / min(times) / 1e9, 3),
        "descs_per_s": round(n / med),
        **extra,
    }


def _initiator(conn: Connection, out: Connection, shm_name: str, cfg: dict[str, Any]) -> None:
    """Measure NIXL READ/WRITE (and, if asked, the shm-copy baseline); send rows to ``out``."""
    shm = SharedMemory(name=shm_name)
    rows: list[dict[str, Any]] = []
    error = None
    try:
        remote_view = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
        cap = shm.size
        local = np.zeros(cap, dtype=np.uint8)
        agent = _agent("initiator", cfg["tls"], cfg["delay_us"])
        agent.register_memory([(local.ctypes.data, cap, 0, "")], "DRAM")
        meta, raddr = conn.recv()
        remote = agent.add_remote_agent(meta)
        rng = np.random.default_rng(cfg["seed"])
        for layout in cfg["layouts"]:
            for size in cfg["sizes"]:
                desc, lslots, rslots = slots_for(layout, size, cap, rng)
                slots = cap // desc
                l2d = local[: slots * desc].reshape(slots, desc)
                r2d = remote_view[: slots * desc].reshape(slots, desc)
                for op in cfg["ops"]:
                    t = time.perf_counter()
                    lx = agent.get_xfer_descs(_descs(local.ctypes.data, desc, lslots), "DRAM")
                    rx = agent.get_xfer_descs(_descs(raddr, desc, rslots), "DRAM")
                    handle = agent.initialize_xfer(op, lx, rx, remote)
                    prep_ms = (time.perf_counter() - t) * 1000
                    # Make the destination differ from the source, so "verified" means moved.
                    if op == "READ":
                        l2d[lslots] = 0
                    else:
                        l2d[lslots] = r2d[rslots] ^ 0x5A

                    def once(h: Any = handle) -> None:
                        state = agent.transfer(h)
                        while state == "PROC":
                            state = agent.check_xfer_state(h)
                        if state != "DONE":
                            raise RuntimeError(f"NIXL transfer ended in state {state}")

                    times = _timed(once, cfg["min_reps"], cfg["max_reps"], cfg["min_time_s"])
                    ok = bool(np.array_equal(l2d[lslots], r2d[rslots]))
                    agent.release_xfer_handle(handle)
                    rows.append(
                        _row(
                            f"nixl {op} {cfg['tls']}",
                            layout,
                            desc,
                            size,
                            times,
                            prep_ms=round(prep_ms, 3),
                            verified=ok,
                        )
                    )
                    print(
                        f"[nixl] {rows[-1]['method']:<24} {layout:<12} {size / MIB:8.3f} MiB "
                        f"{rows[-1]['gbps']:8.3f} GB/s  {rows[-1]['descs_per_s']:>10,} desc/s "
                        f"prep {prep_ms:7.2f} ms  verified={ok}",
                        flush=True,
                    )
                if cfg["shm_copy"]:
                    rows.append(
                        _copy_row(
                            "shm copy (2 processes)", layout, desc, size, r2d, l2d, rslots, cfg
                        )
                    )
        conn.send("done")
        del remote_view, l2d, r2d
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        out.send({"rows": rows, "error": error})
        shm.close()


def _copy_row(
    method: str,
    layout: str,
    desc: int,
    size: int,
    src2d: np.ndarray,
    dst2d: np.ndarray,
    rslots: np.ndarray,
    cfg: dict[str, Any],
) -> dict[str, Any]:
    n = len(rslots)
    dst = dst2d[:n]
    if n == 1:
        src = src2d[int(rslots[0])]

        def once() -> None:
            np.copyto(dst[0], src)
    else:

        def once() -> None:
            np.take(src2d, rslots, axis=0, out=dst)

    times = _timed(once, cfg["min_reps"], cfg["max_reps"], cfg["min_time_s"])
    ok = bool(np.array_equal(dst, src2d[rslots]))
    row = _row(method, layout, desc, size, times, prep_ms=0.0, verified=ok)
    print(
        f"[nixl] {method:<24} {layout:<12} {size / MIB:8.3f} MiB {row['gbps']:8.3f} GB/s",
        flush=True,
    )
    return row


def nixl_pair(
    tls: str,
    capacity: int,
    *,
    layouts: list[str],
    sizes: list[int],
    ops: list[str],
    delay_us: int = 1000,
    min_reps: int = 3,
    max_reps: int = 200,
    min_time_s: float = 0.3,
    shm_copy: bool = False,
    seed: int = 0,
    timeout_s: float = 300.0,
) -> list[dict[str, Any]]:
    """Start a target and an initiator process over ``UCX_TLS=tls``; return the initiator's rows."""
    ctx = mp.get_context("spawn")
    shm = SharedMemory(create=True, size=capacity)
    try:
        fill_pattern(np.ndarray((capacity,), dtype=np.uint8, buffer=shm.buf))
        t_conn, i_conn = ctx.Pipe()
        res_recv, res_send = ctx.Pipe(duplex=False)
        cfg = {
            "tls": tls,
            "delay_us": delay_us,
            "layouts": layouts,
            "sizes": sizes,
            "ops": ops,
            "min_reps": min_reps,
            "max_reps": max_reps,
            "min_time_s": min_time_s,
            "shm_copy": shm_copy,
            "seed": seed,
        }
        procs = [
            ctx.Process(target=_target, args=(t_conn, shm.name, tls, delay_us), daemon=True),
            ctx.Process(target=_initiator, args=(i_conn, res_send, shm.name, cfg), daemon=True),
        ]
        got = run_pair(procs, res_recv, timeout_s, f"NIXL pair over UCX_TLS={tls}")
        if got["error"]:
            print(f"[nixl] UCX_TLS={tls} failed: {got['error']}", flush=True)
            got["rows"].append({"method": f"nixl {tls}", "error": got["error"], "verified": False})
        return list(got["rows"])
    finally:
        shm.close()
        shm.unlink()


def run_pair(procs: list[Any], results: Connection, timeout_s: float, what: str) -> dict[str, Any]:
    """Start ``procs``, wait for the one message on ``results`` and return it; none left alive."""
    try:
        for p in procs:
            p.start()
        if not results.poll(timeout_s):
            raise TimeoutError(f"{what} gave no result in {timeout_s:.0f}s")
        got: dict[str, Any] = results.recv()
        for p in procs:
            p.join(30)
        return got
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def memcpy_rows(capacity: int, layouts: list[str], sizes: list[int], args: Any) -> list[dict]:
    """The same bytes and slots copied inside one process."""
    src = np.empty(capacity, dtype=np.uint8)
    fill_pattern(src)
    dst = np.zeros(capacity, dtype=np.uint8)
    rng = np.random.default_rng(args.seed)
    cfg = {"min_reps": args.min_reps, "max_reps": args.max_reps, "min_time_s": args.min_time_s}
    rows = []
    for layout in layouts:
        for size in sizes:
            desc, _, rslots = slots_for(layout, size, capacity, rng)
            slots = capacity // desc
            rows.append(
                _copy_row(
                    "memcpy (1 process)",
                    layout,
                    desc,
                    size,
                    src[: slots * desc].reshape(slots, desc),
                    dst[: slots * desc].reshape(slots, desc),
                    rslots,
                    cfg,
                )
            )
    return rows


def machine() -> dict[str, Any]:
    from bench_proxy import machine as proxy_machine

    m = proxy_machine()
    m["ucx"] = "bundled with nixl-cu12 (libs in nixl_cu12.libs)"
    return m


def table(rows: list[dict[str, Any]], layouts: list[str]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    for layout in layouts:
        sub = [r for r in rows if r["layout"] == layout]
        if not sub:
            continue
        sizes = sorted({r["size_bytes"] for r in sub})
        desc = LAYOUTS[layout]
        what = "one descriptor" if not desc else f"{desc // KIB} KiB descriptors"
        lines += [
            f"### {layout} ({what}): GB/s (median); descriptors/s in brackets for NIXL",
            "",
            "| method | " + " | ".join(_size(s) for s in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for m in methods:
            cells = []
            for s in sizes:
                r = next((r for r in sub if r["method"] == m and r["size_bytes"] == s), None)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{r['gbps']:.2f}"
                if m.startswith("nixl") and desc:
                    cell += f" ({r['descs_per_s'] / 1000:,.0f}k/s)"
                if not r["verified"]:
                    cell += " UNVERIFIED"
                cells.append(cell)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _size(b: int) -> str:
    return f"{b // MIB} MiB" if b >= MIB else f"{b // KIB} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tls", nargs="+", default=["tcp", "tcp,sm,self"], help="UCX_TLS variants")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--sizes-kib", type=int, nargs="+", default=[s // KIB for s in SIZES])
    ap.add_argument("--ops", nargs="+", default=["READ", "WRITE"], choices=["READ", "WRITE"])
    ap.add_argument(
        "--progress-delay-us", type=int, default=1000, help="-1: NIXL's default (0, spins)"
    )
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=200)
    ap.add_argument("--min-time-s", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sizes = [k * KIB for k in args.sizes_kib]
    capacity = max(sizes)
    t0 = time.perf_counter()
    rows = memcpy_rows(capacity, args.layouts, sizes, args)
    for i, tls in enumerate(args.tls):
        rows += nixl_pair(
            tls,
            capacity,
            layouts=args.layouts,
            sizes=sizes,
            ops=args.ops,
            delay_us=args.progress_delay_us,
            min_reps=args.min_reps,
            max_reps=args.max_reps,
            min_time_s=args.min_time_s,
            shm_copy=(i == 0),
            seed=args.seed,
        )
    md = table(rows, args.layouts)
    print("\n" + md)
    print(f"total {time.perf_counter() - t0:.0f}s")
    if args.out:
        write(args, rows, md)
    return 0 if all(r["verified"] for r in rows) else 1


def write(args: argparse.Namespace, rows: list[dict[str, Any]], md: str) -> None:
    from pd_runtime.bench.plots import bar_chart

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    note = (
        f"{os.cpu_count()} cores shared by both processes (and other work on our shared "
        f"machine); UCX progress thread poll timeout {args.progress_delay_us} us on both agents"
    )
    payload = {
        "machine": machine(),
        "note": note,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
    }
    (out / "nixl.json").write_text(json.dumps(payload, indent=2) + "\n")
    head = (
        "NIXL KV-transfer bandwidth between two processes on one machine (host memory, UCX "
        f"bundled with nixl-cu12), against plain copies of the same bytes. Note: {note}.\n"
    )
    (out / "nixl.md").write_text(head + "\n" + md)
    for layout in args.layouts:
        sub = [r for r in rows if r["layout"] == layout]
        sizes = sorted({r["size_bytes"] for r in sub})
        methods = list(dict.fromkeys(r["method"] for r in sub))
        series = {
            m: [
                next((r["gbps"] for r in sub if r["method"] == m and r["size_bytes"] == s), 0.0)
                for s in sizes
            ]
            for m in methods
        }
        bar_chart(
            out / f"nixl-{layout}.png",
            f"Transfer bandwidth, {layout} descriptors (GB/s, median)",
            [_size(s) for s in sizes],
            series,
            ylabel="GB/s (log scale)",
            log=True,
            size=(1400, 620),
        )


if __name__ == "__main__":
    raise SystemExit(main())
