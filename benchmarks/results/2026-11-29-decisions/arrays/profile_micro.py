"""The decode (64 endpoints) and prefill (4) profiles alone, in a warm loop on random states: the
median thread CPU time of ``SchedulingProfile.run`` over 3,500 runs. Run it once per version:

    git archive fca567b pd_runtime | tar -x -C /tmp/oldtree
    PYTHONPATH=/tmp/oldtree python benchmarks/results/2026-11-29-decisions/arrays/profile_micro.py
    PYTHONPATH=$PWD python benchmarks/results/2026-11-29-decisions/arrays/profile_micro.py
"""

from __future__ import annotations

import random
import statistics
import time

import pd_runtime
from pd_runtime.config.endpoint import EndpointConfig
from pd_runtime.kv_events.index import PrefixIndex
from pd_runtime.scheduling.base import SchedulingRequest
from pd_runtime.scheduling.kv_aware import DEFAULT_PROFILES
from pd_runtime.scheduling.plugins import EndpointState, RequestContext
from pd_runtime.scheduling.profile import SchedulingProfile

rng = random.Random(0)


def states(n: int, role: str) -> list[EndpointState]:
    out = []
    for i in range(n):
        host = f"10.0.0.{i}"
        config = EndpointConfig(
            name=f"{role}-{i}", role=role, address=f"{host}:8200", url=f"http://{host}:9000"
        )
        s = EndpointState(config)
        s.waiting = float(rng.choice((0, 0, 0, 1, 2, 3)))
        s.running = 8.0
        s.kv_usage = rng.uniform(0.2, 0.85)
        s.in_flight_requests = rng.randint(0, 4)
        s.in_flight_tokens = rng.randint(0, 8000)
        out.append(s)
    return out


def main() -> None:
    print(pd_runtime.__file__)
    decode, prefill = states(64, "decode"), states(4, "prefill")
    decode_profile = SchedulingProfile("decode", DEFAULT_PROFILES["decode"])
    prefill_profile = SchedulingProfile("prefill", DEFAULT_PROFILES["prefill"])
    tokens = list(range(2600))
    keys = PrefixIndex.block_keys(tokens, 16)
    request = SchedulingRequest("r", "m", "/v1/chat/completions", {}, token_ids=tokens)
    times: dict[str, list[int]] = {"decode": [], "prefill": []}
    for _ in range(4000):
        held = rng.sample(decode, rng.choice((0, 1, 3, 8)))
        ctx = RequestContext(
            request=request,
            token_ids=tokens,
            block_size=16,
            block_keys=keys,
            cached_blocks={s.address: rng.randint(1, 160) for s in held},
            rng=rng,
        )
        moved = rng.choice(decode)  # one booking or release between decisions
        moved.in_flight_requests = rng.randint(0, 4)
        moved.in_flight_tokens = rng.randint(0, 8000)
        t0 = time.thread_time_ns()
        decode_profile.run(ctx, decode)
        t1 = time.thread_time_ns()
        prefill_profile.run(ctx, prefill)
        t2 = time.thread_time_ns()
        times["decode"].append(t1 - t0)
        times["prefill"].append(t2 - t1)
    for name, ns in times.items():
        print(f"{name} profile.run p50 {statistics.median(ns[500:]) / 1e3:.1f} us")


if __name__ == "__main__":
    main()
