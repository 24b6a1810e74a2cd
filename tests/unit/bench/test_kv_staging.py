"""benchmarks/bench_kv_staging.py: its descriptor arithmetic, and a tiny live run in which every
way puts the prefill's bytes into the decode cache (two NIXL processes)."""

from __future__ import annotations

import numpy as np
from bench_kv_staging import descriptors, load_pd_kernels, run  # benchmarks/ (see conftest.py)


def test_per_block_descriptors_cover_one_head_range_per_layer_kv_and_block() -> None:
    k = load_pd_kernels()
    layout = k.KVLayout(num_blocks=10, block_size=4, num_heads=4, head_dim=8, order="HND")
    d = descriptors(1000, layout, layers=2, ids=np.array([7, 2]), head_lo=2, heads=2)
    blk = 4 * 4 * 8 * 2  # bytes of one (layer, K/V) block
    assert len(d) == 2 * 2 * 2 and set(d[:, 1].tolist()) == {2 * 4 * 8 * 2}
    # layer 1, V, block 2, heads 2-3
    assert int(d[-1, 0]) == 1000 + (2 + 1) * 10 * blk + 2 * blk + 2 * 4 * 8 * 2


def test_every_way_moves_the_right_bytes() -> None:
    rng = np.random.default_rng(0)
    cfg = {
        "layers": 2, "heads": 4, "head_dim": 8, "block_size": 4, "readers": 2, "pool": 12,
        "tls": "tcp,sm,self", "delay_us": 1000, "min_reps": 1, "max_reps": 1,
        "min_time_s": 0.0, "seed": 0, "reps": 2, "chunk_kib": 1,
        "src_ids": rng.choice(12, 5, replace=False).tolist(),
        "dst_ids": rng.choice(12, 5, replace=False).tolist(),
    }  # fmt: skip
    rows = run(cfg, timeout_s=60)
    assert [r["descriptors"] for r in rows] == [2 * 2 * 5, 1, 3]  # 2.5 KiB packed: 3 pieces
    assert all(r["verified"] for r in rows), rows
