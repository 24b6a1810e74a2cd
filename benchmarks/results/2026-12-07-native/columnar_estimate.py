"""What the default decode profile would cost on columnar endpoint state (an estimate for the
next step, not product code): the same filters and scorers as numpy passes over arrays that
would be kept up to date where the signals are written, for 64 endpoints, warm, with the
prefix-cache counts arriving as an array by endpoint slot (what a walk could fill directly).

Usage: python benchmarks/results/2026-12-07-native/columnar_estimate.py
"""

from __future__ import annotations

import time

import numpy as np

from pd_runtime.common.stats import percentile

N = 64
rng = np.random.default_rng(0)
healthy = np.ones(N, bool)
in_flight = rng.integers(0, 10, N).astype(np.float64)
in_flight_tokens = rng.integers(0, 40_000, N).astype(np.float64)
waiting = rng.choice([0.0, 0.0, 0.0, 1.0, 2.0, 3.0], N)
kv_usage = rng.uniform(0.2, 0.85, N)
cached = rng.integers(0, 160, N).astype(np.float64)  # leading blocks held, by slot
recent_homes = rng.integers(0, 5, N).astype(np.float64)  # cold-spreader's counts
weights = np.array([3, 1, 1, 1, 1, 1], np.float64) / 8


def minmax_inverted(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return np.ones_like(x) if hi == lo else (hi - x) / (hi - lo)


def decide(blocks: int, session_slot: int) -> int:
    ok = healthy & (in_flight < 8) & (waiting <= 4) & (kv_usage <= 0.9)  # healthy, not-saturated
    idx = np.flatnonzero(ok) if ok.any() else np.arange(N)  # fail open
    scores = np.empty((6, idx.size))
    scores[0] = cached[idx] / blocks  # prefix-cache
    scores[1] = 0.5 * minmax_inverted(in_flight[idx]) + 0.5 * minmax_inverted(
        in_flight_tokens[idx]
    )  # in-flight-load
    scores[2] = minmax_inverted(waiting[idx])  # queue-depth
    scores[3] = 1.0 - kv_usage[idx]  # kv-cache-utilization
    scores[4] = idx == session_slot  # session-affinity
    scores[5] = minmax_inverted(recent_homes[idx])  # cold-spreader
    total = weights @ scores
    best = np.flatnonzero(total >= total.max() - 1e-9)
    return int(idx[best[0]])


times = []
for i in range(20_000):
    t = time.thread_time_ns()
    decide(160, i % N)
    times.append(time.thread_time_ns() - t)
print(
    f"columnar decode profile, {N} endpoints, warm: p50 {percentile(times, 50) / 1e3:.1f} µs, "
    f"p99 {percentile(times, 99) / 1e3:.1f} µs"
)
