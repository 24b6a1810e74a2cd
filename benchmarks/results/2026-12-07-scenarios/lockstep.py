"""How many requests each request found on the busy decode worker when it started, per front:
the concurrency the worker actually served (the reading of this directory's README).

A closed loop of 4 puts 4 requests on the worker only if none is parked elsewhere: a request
answered in over ``SLOW_S`` (one sent to the slow decode worker) holds a client for that long.

    python benchmarks/results/2026-12-07-scenarios/lockstep.py DIR/records WORKLOAD
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SLOW_S = 5.0


def main(records: Path, workload: str) -> None:
    for front_dir in sorted(p for p in records.iterdir() if p.is_dir()):
        for path in sorted(front_dir.glob(f"{workload}*.json")):
            rows = [r for r in json.loads(path.read_text())["records"] if not r.get("error")]
            fast = [r for r in rows if r["e2e_s"] < SLOW_S]
            found = [
                sum(1 for o in fast if o["start_s"] <= r["start_s"] < o["start_s"] + o["e2e_s"])
                for r in fast
            ]
            ttft = statistics.median(r["ttft_s"] for r in fast) * 1e3
            print(
                f"{front_dir.name:16} {path.stem:18} fast {len(fast):3} / {len(rows):3}  "
                f"requests on the worker at a start: mean {statistics.mean(found):.2f}  "
                f"TTFT p50 {ttft:4.0f} ms  E2E p50 "
                f"{statistics.median(r['e2e_s'] for r in fast) * 1e3:4.0f} ms"
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "random")
