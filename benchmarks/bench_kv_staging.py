"""Per-block NIXL descriptors vs one packed staging buffer, for a heterogeneous-TP request.

The request: prefill TP1 holds all ``--heads`` KV heads (HND cache, blocks of ``--block-size``
tokens, ``--layers`` layers, bf16); a decode rank of TP ``--readers`` holds ``heads / readers``.
Decode rank 0 pulls its head range of the request's ``--blocks`` blocks (random, unordered block
ids on both sides) from the prefill process, two ways, moving the same bytes:

* ``per-block``: what vLLM's NixlConnector does for heterogeneous TP: one descriptor per
  (layer, K/V, block, head range), ``layers * 2 * blocks`` of them, straight into the cache;
* ``staging``: the prefill side runs ``pd_kernels.kv_pack`` (``splits=readers``) into a
  registered staging buffer, the decode side READs its region with one descriptor and runs
  ``kv_unpack`` into its cache. Pack and unpack are timed apart (CPU, torch reference);
* ``staging, N KiB descriptors``: the same region cut into ``--chunk-kib`` pieces (UCX copies
  a cache-sized piece faster than one huge one on this machine; see ``bench_nixl.py``'s bulk rows).

The two ways' transfers alternate (``--reps`` each), so the shared machine's noise falls on both;
median and best are reported. Two processes, one NIXL agent each, UCX over ``tcp,sm,self`` as in ``bench_nixl.py`` (whose
agent set-up, progress-thread delay and timing loop this reuses). The prefill cache lives in a
shared-memory segment the parent fills with random bits, so the decode process can check that
both ways put the same bytes into its cache (``verified``).

    python benchmarks/bench_kv_staging.py --out benchmarks/results/DATE-kernels
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import statistics
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_nixl import _agent, _timed, machine, run_pair  # noqa: E402

__all__ = ["descriptors", "load_pd_kernels"]


def load_pd_kernels() -> Any:
    """``pd_kernels`` from this checkout's ``kernels/`` (pyproject's package-dir), installed or not."""
    if "pd_kernels" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "pd_kernels",
            REPO / "kernels/__init__.py",
            submodule_search_locations=[str(REPO / "kernels")],
        )
        assert spec is not None and spec.loader is not None
        sys.modules["pd_kernels"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["pd_kernels"]


def _layouts(cfg: dict[str, Any]) -> tuple[Any, Any]:
    k = load_pd_kernels()
    prefill = k.KVLayout(cfg["pool"], cfg["block_size"], cfg["heads"], cfg["head_dim"], "HND")
    decode = k.KVLayout(
        cfg["pool"], cfg["block_size"], cfg["heads"] // cfg["readers"], cfg["head_dim"], "HND"
    )
    return prefill, decode


def _cache_views(buf: Any, layout: Any, layers: int) -> list[Any]:
    """Per-layer bf16 cache tensors over one flat uint8 buffer (numpy or torch)."""
    import torch

    flat = torch.as_tensor(buf) if isinstance(buf, np.ndarray) else buf
    per = flat.numel() // layers
    return [
        flat[i * per : (i + 1) * per].view(torch.bfloat16).view(layout.shape) for i in range(layers)
    ]


def descriptors(
    base: int, layout: Any, layers: int, ids: np.ndarray, head_lo: int, heads: int
) -> np.ndarray:
    """(addr, len, dev) per (layer, K/V, block, head range) of an HND bf16 cache at ``base``."""
    run = heads * layout.block_size * layout.head_dim * 2
    head_off = head_lo * layout.block_size * layout.head_dim * 2
    blk = layout.block_numel * 2
    kv = layout.num_blocks * blk
    lay = 2 * kv
    offs = (
        np.arange(layers, dtype=np.uint64)[:, None, None] * lay
        + np.arange(2, dtype=np.uint64)[None, :, None] * kv
        + ids.astype(np.uint64)[None, None, :] * blk
    ).reshape(-1)
    out = np.zeros((len(offs), 3), dtype=np.uint64)
    out[:, 0] = base + offs + head_off
    out[:, 1] = run
    return out


def _chunks(local: int, remote: int, nbytes: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(local, remote) descriptors covering ``nbytes`` from each base in ``chunk``-byte pieces."""
    offs = np.arange(0, nbytes, chunk, dtype=np.uint64)
    lens = np.minimum(chunk, nbytes - offs)
    return tuple(  # type: ignore[return-value]
        np.stack([base + offs, lens, np.zeros_like(offs)], axis=1) for base in (local, remote)
    )


def _prefill(conn: Connection, shm_name: str, cfg: dict[str, Any]) -> None:
    """The target: registers its cache and a staging buffer, packs on request, times the pack."""
    import torch

    k = load_pd_kernels()
    torch.set_num_threads(1)
    shm = SharedMemory(name=shm_name)
    try:
        cache_np = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
        prefill, _ = _layouts(cfg)
        caches = _cache_views(cache_np, prefill, cfg["layers"])
        src_ids = torch.as_tensor(cfg["src_ids"])
        staging = torch.empty(
            k.packed_shape(cfg["layers"], len(src_ids), prefill, cfg["readers"]),
            dtype=torch.bfloat16,
        )
        agent = _agent("prefill", cfg["tls"], cfg["delay_us"])
        agent.register_memory(
            [
                (cache_np.ctypes.data, cache_np.nbytes, 0, ""),
                (staging.data_ptr(), staging.nbytes, 0, ""),
            ],
            "DRAM",
        )
        pack = _timed(
            lambda: k.kv_pack(caches, prefill, src_ids, cfg["readers"], out=staging),
            cfg["min_reps"], cfg["max_reps"], cfg["min_time_s"],
        )  # fmt: skip
        conn.send((agent.get_agent_metadata(), cache_np.ctypes.data, staging.data_ptr(), pack))
        conn.recv()  # "done"
        caches.clear()  # the tensors export the segment's buffer: drop them before close()
        del cache_np
    finally:
        shm.close()


def _decode(conn: Connection, out: Connection, shm_name: str, cfg: dict[str, Any]) -> None:
    """The initiator: READs its head range both ways, unpacks, checks its cache, sends rows."""
    import torch

    k = load_pd_kernels()
    torch.set_num_threads(1)
    shm = SharedMemory(name=shm_name)
    rows: list[dict[str, Any]] = []
    error = None
    try:
        prefill, decode = _layouts(cfg)
        layers, readers = cfg["layers"], cfg["readers"]
        hs = decode.num_heads
        cache = torch.zeros(
            layers * 2 * decode.num_blocks * decode.block_numel, dtype=torch.bfloat16
        )
        caches = _cache_views(cache.view(torch.uint8), decode, layers)
        n = len(cfg["src_ids"])
        region = k.packed_shape(layers, n, prefill, readers)[1:]
        staging = torch.empty(region, dtype=torch.bfloat16)
        agent = _agent("decode", cfg["tls"], cfg["delay_us"])
        agent.register_memory(
            [(cache.data_ptr(), cache.nbytes, 0, ""), (staging.data_ptr(), staging.nbytes, 0, "")],
            "DRAM",
        )
        meta, r_cache, r_staging, pack_times = conn.recv()
        remote = agent.add_remote_agent(meta)
        src_ids, dst_ids = np.asarray(cfg["src_ids"]), np.asarray(cfg["dst_ids"])
        want = [
            prefill.canonical(c)[:, src_ids, :, :hs] for c in _cache_views(
                np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf), prefill, layers
            )
        ]  # fmt: skip
        nbytes = staging.nbytes
        ways = {
            "per-block": (
                descriptors(cache.data_ptr(), decode, layers, dst_ids, 0, hs),
                descriptors(r_cache, prefill, layers, src_ids, 0, hs),
            ),
            "staging": _chunks(staging.data_ptr(), r_staging, nbytes, nbytes),  # reader 0's
            f"staging, {cfg['chunk_kib']} KiB descriptors": _chunks(
                staging.data_ptr(), r_staging, nbytes, cfg["chunk_kib"] * 1024
            ),
        }
        dst_t = torch.as_tensor(dst_ids)
        unpack = _timed(
            lambda: k.kv_unpack([staging], caches, decode, dst_t),
            cfg["min_reps"], cfg["max_reps"], cfg["min_time_s"],
        )  # fmt: skip
        handles, prep_ms = {}, {}
        for way, (ldesc, rdesc) in ways.items():
            assert int(ldesc[:, 1].sum()) == nbytes == int(rdesc[:, 1].sum())
            t = time.perf_counter()
            lx, rx = agent.get_xfer_descs(ldesc, "DRAM"), agent.get_xfer_descs(rdesc, "DRAM")
            handles[way] = agent.initialize_xfer("READ", lx, rx, remote)
            prep_ms[way] = (time.perf_counter() - t) * 1000

        def once(way: str) -> float:
            t = time.perf_counter()
            state = agent.transfer(handles[way])
            while state == "PROC":
                state = agent.check_xfer_state(handles[way])
            if state != "DONE":
                raise RuntimeError(f"NIXL transfer ended in state {state}")
            return time.perf_counter() - t

        verified = {}
        for way in ways:  # each way alone into a zeroed cache, then the check
            for c in caches:
                c.zero_()
            once(way)
            if way.startswith("staging"):
                k.kv_unpack([staging], caches, decode, dst_t)
            got = [decode.canonical(c)[:, dst_ids] for c in caches]
            verified[way] = all(
                torch.equal(k.as_bits(g), k.as_bits(w)) for g, w in zip(got, want, strict=True)
            )
        # The two ways alternate, rep after rep: the shared machine's noise hits both alike.
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(cfg["reps"]):
            for way in ways:
                times[way].append(once(way))
        for way, (ldesc, _) in ways.items():
            agent.release_xfer_handle(handles[way])
            med = statistics.median(times[way])
            row = {
                "way": way,
                "descriptors": len(ldesc),
                "bytes": nbytes,
                "reps": len(times[way]),
                "transfer_ms": round(med * 1000, 3),
                "transfer_best_ms": round(min(times[way]) * 1000, 3),
                "gbps": round(nbytes / med / 1e9, 3),
                "prep_ms": round(prep_ms[way], 3),
                "verified": verified[way],
            }
            if way.startswith("staging"):
                row["pack_ms"] = round(statistics.median(pack_times) * 1000, 3)
                row["unpack_ms"] = round(statistics.median(unpack) * 1000, 3)
            rows.append(row)
            print(f"[kv-staging] {row}", flush=True)
        conn.send("done")
        del want
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        out.send({"rows": rows, "error": error})
        shm.close()


def run(cfg: dict[str, Any], timeout_s: float = 600.0) -> list[dict[str, Any]]:
    prefill, _ = _layouts(cfg)
    size = cfg["layers"] * 2 * prefill.num_blocks * prefill.block_numel * 2
    ctx = mp.get_context("spawn")
    shm = SharedMemory(create=True, size=size)
    try:
        rng = np.random.default_rng(cfg["seed"])
        np.ndarray((size,), dtype=np.uint8, buffer=shm.buf)[:] = rng.integers(
            0, 256, size, np.uint8
        )
        p_conn, d_conn = ctx.Pipe()
        res_recv, res_send = ctx.Pipe(duplex=False)
        procs = [
            ctx.Process(target=_prefill, args=(p_conn, shm.name, cfg), daemon=True),
            ctx.Process(target=_decode, args=(d_conn, res_send, shm.name, cfg), daemon=True),
        ]
        got = run_pair(procs, res_recv, timeout_s, "the prefill/decode pair")
        if got["error"]:
            raise RuntimeError(got["error"])
        return list(got["rows"])
    finally:
        shm.close()
        shm.unlink()


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| way | descriptors | MiB | transfer ms (median / best) | GB/s | pack ms | unpack ms | prep ms | verified |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['way']} | {r['descriptors']:,} | {r['bytes'] / 2**20:.1f} | "
            f"{r['transfer_ms']:.2f} / {r['transfer_best_ms']:.2f} | {r['gbps']:.2f} | "
            f"{r.get('pack_ms', '-')} | {r.get('unpack_ms', '-')} | {r['prep_ms']:.1f} | {r['verified']} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8, help="KV heads on the prefill rank (TP1)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--readers", type=int, default=2, help="decode TP: splits of the heads")
    ap.add_argument("--blocks", type=int, default=64, help="the request's blocks (1024 tokens)")
    ap.add_argument("--pool", type=int, default=160, help="blocks per layer in each cache")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="the chunked staging way")
    ap.add_argument("--tls", default="tcp,sm,self")
    ap.add_argument("--progress-delay-us", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=40, help="transfers per way, alternating")
    ap.add_argument("--min-reps", type=int, default=5, help="pack/unpack timing")
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--min-time-s", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    cfg = {
        "layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
        "block_size": args.block_size, "readers": args.readers, "pool": args.pool,
        "tls": args.tls, "delay_us": args.progress_delay_us, "min_reps": args.min_reps,
        "max_reps": args.max_reps, "min_time_s": args.min_time_s, "seed": args.seed,
        "reps": args.reps, "chunk_kib": args.chunk_kib,
        "src_ids": rng.choice(args.pool, args.blocks, replace=False).tolist(),
        "dst_ids": rng.choice(args.pool, args.blocks, replace=False).tolist(),
    }  # fmt: skip
    rows = run(cfg)
    md = table(rows)
    per = rows[0]
    summary = "\n".join(
        f"{st['way']}: descriptors {per['descriptors'] / st['descriptors']:,.0f}x fewer, "
        f"transfer {per['transfer_ms'] / st['transfer_ms']:.2f}x faster (median; best "
        f"{per['transfer_best_ms'] / st['transfer_best_ms']:.2f}x); pack + transfer + unpack "
        f"{st['pack_ms'] + st['transfer_ms'] + st['unpack_ms']:.2f} ms vs per-block "
        f"{per['transfer_ms']:.2f} ms"
        for st in rows[1:]
    )
    print("\n" + md + "\n\n" + summary)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": machine(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows,
            "summary": summary,
        }
        (args.out / "kv_staging.json").write_text(json.dumps(payload, indent=2) + "\n")
        (args.out / "kv_staging.md").write_text(md + "\n\n" + summary + "\n")
    return 0 if all(r["verified"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
