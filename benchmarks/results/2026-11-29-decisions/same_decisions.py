"""Decisions of two pd_runtime versions on the same state, compared record for record.

Usage (ROOT: the pd_runtime tree to import; WORKLOAD: a pickle written by
``bench_scheduler.py --workload PATH``)::

    git archive 7a71885 pd_runtime | tar -x -C /tmp/base
    ROOT=/tmp/base PYTHONPATH=. python benchmarks/results/2026-11-29-decisions/same_decisions.py \
        base.pkl WORKLOAD
    ROOT=$PWD PYTHONPATH=. python benchmarks/results/2026-11-29-decisions/same_decisions.py \
        cur.pkl WORKLOAD

then compare the two pickles (lists of records). 8 and 64 decode endpoints (+4 prefill), 100 k /
300 k indexed entries, 300 warm-up decisions, then 500 decisions of the measured workload each,
with sessions, health flips and scrape changes mixed in. A record is (decode, prefill, scores,
breakdown, full breakdown, reason, cached tokens, prompt tokens).
"""

from __future__ import annotations

import os
import pickle
import random
import sys
from pathlib import Path

ROOT = os.environ.get("ROOT", str(Path(__file__).resolve().parents[3]))
sys.path[:0] = [ROOT, str(Path(__file__).resolve().parents[2])]

import bench_scheduler as bench  # noqa: E402

import pd_runtime  # noqa: E402
from pd_runtime.scheduling.base import SchedulingRequest  # noqa: E402
from pd_runtime.scheduling.kv_aware import KVAwareScheduler  # noqa: E402


def main() -> None:
    assert pd_runtime.__file__.startswith(ROOT), pd_runtime.__file__
    sys.modules["__main__"].Workload = bench.Workload  # type: ignore[attr-defined]
    sys.modules["__main__"].Prompt = bench.Prompt  # type: ignore[attr-defined]
    wl = pickle.loads(Path(sys.argv[2]).read_bytes())
    out = []
    for n, entries in ((8, 100_000), (64, 300_000)):
        rng = random.Random(n)
        sched = KVAwareScheduler(bench.endpoints(n, bench.PREFILL), block_size=bench.BS, seed=0)
        bench.fill(sched, wl, entries, rng)
        for s in sched.states.values():
            s.waiting = float(rng.choice((0, 0, 0, 1, 2, 3)))
            s.running = float(rng.randint(4, 48))
            s.kv_usage = rng.uniform(0.2, 0.85)
            s.scraped_at = 0.0
        driver = bench.Driver(sched, 4.0 * n, 2 * n)
        for i in range(300):
            driver.tick()
            req = bench.request(-i, None, bench.warmup_tokens(wl, rng))
            driver.done(req, sched.schedule(req))
        for i, p in enumerate(wl.requests[:500]):
            req = bench.request(i, p, p.tokens)
            driver.tick()
            if i % 7 == 0:
                headers = {"x-session-id": f"s{i % 5}"}
                req = SchedulingRequest(
                    req.request_id, req.model, req.path, req.body, headers,
                    token_ids=req.token_ids, block_keys=req.block_keys,
                )  # fmt: skip
            if i % 50 == 3:
                for s in list(sched.states.values())[::9]:
                    s.healthy = not s.healthy
            if i % 31 == 5:
                for s in list(sched.states.values())[::5]:
                    s.waiting = float(rng.choice((0, 1, 5)))
                    s.kv_usage = rng.uniform(0.2, 0.95)
            r = sched.schedule(req)
            driver.done(req, r)
            out.append(
                (
                    r.decode.address,
                    r.prefill.address if r.prefill else None,
                    r.scores,
                    r.breakdown,
                    r.full_breakdown() if r.full_breakdown else None,
                    r.reason,
                    r.cached_tokens,
                    r.prompt_tokens,
                )
            )
    Path(sys.argv[1]).write_bytes(pickle.dumps(out))
    print(len(out), "decisions")


if __name__ == "__main__":
    main()
