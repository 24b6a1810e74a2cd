"""The KV kernels on one GPU (an H200: under 5 minutes), against what they replace.

Synthetic Llama-70B, prefill TP4 shapes: 80 layers x K/V = 160 regions, 2 KV heads per rank,
head_dim 128, blocks of 16 tokens, bf16 (8 KiB per block and region), a pool of 20,000 blocks
per layer (26 GB), a request of 512 random, unordered block ids (640 MiB to move). Compared,
each moving the same bytes into one contiguous buffer and checked bit for bit against the torch
reference in the same run:

* ``kv_pack`` (Triton, one launch for all layers; at the default CTA cap, a quarter of the SMs,
  and uncapped), for the NHD and HND cache layouts, ``splits`` 1 and 2;
* per-region ``torch.index_select`` (160 launches), what a torch implementation does;
* vLLM's ``swap_blocks_batch`` (one 8 KiB copy per block and region, 81,920 of them, one
  ``cuMemcpyBatchAsync``), when vLLM is installed;
* a plain contiguous copy of the same bytes: the bandwidth ceiling (GB/s = 10^9 bytes / s).

Also ``kv_unpack`` (the packed buffer back into a cache with blocks of 32: merge 2 to 1) and
``kv_relayout`` (HND -> NHD in place) on the same request. Prints a table and writes JSON:

    python benchmarks/gpu/bench_kernels.py --out benchmarks/results/DATE-kernels-gpu
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_kv_staging import load_pd_kernels

k = load_pd_kernels()
triton_kv = importlib.import_module("pd_kernels.triton_kv")  # the kernels themselves, capped or not


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds over ``reps`` runs (CUDA events; wall clock on CPU), 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if not torch.cuda.is_available():  # --device cpu: a smoke run of the script itself
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(k.as_bits(a), k.as_bits(b))


def swap_blocks_batch_fn(
    caches: list[torch.Tensor], layout: Any, ids: torch.Tensor, out: torch.Tensor
) -> Callable[[], None] | None:
    """One pointer copy per (layer, K/V, block) into ``out``, as vLLM's offload path issues them."""
    if not out.is_cuda:
        return None
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    blk = layout.block_numel * out.element_size()
    src = torch.cat(
        [
            c.data_ptr() + kv * c.stride(0) * c.element_size() + ids.cpu() * blk
            for c in caches
            for kv in range(2)
        ]
    )
    dst = out.data_ptr() + torch.arange(len(src), dtype=torch.int64) * blk
    sizes = torch.full((len(src),), blk, dtype=torch.int64)
    return lambda: ops.swap_blocks_batch(src, dst, sizes)


def bench_layout(
    order: str, args: argparse.Namespace, ids: torch.Tensor, g: torch.Generator, row: Any
) -> None:
    """Every method on one cache layout (NHD or HND); ``row(name, ms, bytes, verified)``."""
    dev = ids.device
    layout = k.KVLayout(args.pool, args.block_size, args.heads, args.head_dim, order)
    caches = layout.empty(args.layers, torch.bfloat16, args.device)
    for c in caches:
        k.as_bits(c).random_(generator=g)
    want = k.kv_pack(caches, layout, ids, backend="torch")
    nbytes = want.nbytes
    flat = torch.empty_like(want)
    row(f"plain copy ({order})", timed(lambda: flat.copy_(want), args.reps), nbytes, None)
    for splits in (1, 2):
        ref = want if splits == 1 else k.kv_pack(caches, layout, ids, splits, backend="torch")
        for cap, label in ((None, "cap SMs/4"), (1 << 20, "uncapped")):
            out = torch.empty_like(ref)
            fn = partial(triton_kv.kv_pack, caches, layout, ids, splits, out, max_ctas=cap)
            ms = timed(fn, args.reps)
            row(f"kv_pack {order} splits={splits} {label}", ms, nbytes, same(out, ref))
    sel = torch.empty(
        args.layers, 2, args.blocks, *caches[0].shape[2:], dtype=torch.bfloat16, device=dev
    )

    def per_region() -> None:
        for layer, c in enumerate(caches):
            for kv in range(2):
                torch.index_select(c[kv], 0, ids, out=sel[layer, kv])

    ms = timed(per_region, args.reps)
    ok = all(same(caches[i][:, ids], sel[i]) for i in range(0, args.layers, 7))
    row(f"torch index_select x {2 * args.layers} ({order})", ms, nbytes, ok)
    swap = swap_blocks_batch_fn(caches, layout, ids, sel)
    if swap is None:
        print("vllm not installed: swap_blocks_batch skipped", flush=True)
    else:
        sel.zero_()
        ms = timed(swap, args.reps)
        ok = all(same(caches[i][:, ids], sel[i]) for i in range(0, args.layers, 7))
        row(
            f"vllm swap_blocks_batch x {2 * args.layers * args.blocks} ({order})",
            ms,
            nbytes,
            ok,
        )
    if order == "HND":
        dec = k.KVLayout(args.pool // 2, 2 * args.block_size, args.heads, args.head_dim, "NHD")
        dcaches = dec.empty(args.layers, torch.bfloat16, args.device)
        dst_ids = torch.randperm(dec.num_blocks, device=dev, generator=g)[: -(-args.blocks // 2)]
        want_d = [c.clone() for c in dcaches]
        k.kv_unpack([want[0]], want_d, dec, dst_ids, backend="torch")
        ms = timed(lambda: k.kv_unpack([want[0]], dcaches, dec, dst_ids), args.reps)
        ok = all(same(a, b) for a, b in zip(dcaches, want_d, strict=True))
        row("kv_unpack HND->NHD, blocks 16->32", ms, nbytes, ok)
        # checked once against the reference on copies of 4 layers, then timed (each run
        # transposes the blocks again: same work)
        want_r = [c.clone() for c in caches[:4]]
        k.kv_relayout(want_r, layout, ids, "NHD", backend="torch")
        k.kv_relayout(caches, layout, ids, "NHD")
        ok = all(same(a, b) for a, b in zip(caches, want_r, strict=False))
        ms = timed(lambda: k.kv_relayout(caches, layout, ids, "NHD"), args.reps)
        row("kv_relayout HND in place, from NHD", ms, nbytes, ok)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--pool", type=int, default=20_000)
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    dev = torch.device(args.device)
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randperm(args.pool, device=dev, generator=g)[: args.blocks]
    rows: list[dict[str, Any]] = []

    def row(name: str, ms: float, nbytes: int, ok: bool | None) -> None:
        rows.append(
            {
                "method": name,
                "ms": round(ms, 4),
                "gbps": round(nbytes / ms / 1e6, 1),
                "verified": ok,
            }
        )
        print(f"{name:<44} {ms:9.3f} ms {rows[-1]['gbps']:8.1f} GB/s verified={ok}", flush=True)

    for order in ("NHD", "HND"):
        bench_layout(order, args, ids, g, row)  # its 26 GB of caches are freed on return
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke run)"
    print(f"total {time.perf_counter() - t0:.0f}s on {name}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {"device": name, "args": {a: str(v) for a, v in vars(args).items()}, "rows": rows}
        (args.out / "bench_kernels.json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(r["verified"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
