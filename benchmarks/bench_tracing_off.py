"""What tracing costs a request when it is off (no OTLP endpoint): the calls the coordinator makes.

With tracing off, ``pd_runtime.common.tracing.Tracing`` has no tracer and every method returns at
its first line. This times, per request, what the coordinator's generation path does with it: the
``enabled`` checks, the ``prepare``, ``schedule`` and ``attempt`` spans (a shared no-op context
manager), ``inject`` and ``trace_id``; and, for scale, an empty call. Usage:

    python benchmarks/bench_tracing_off.py [--n 1000000]
"""

from __future__ import annotations

import argparse
import sys
import timeit

from pd_runtime.common.tracing import Tracing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    n = parser.parse_args().n
    tracing = Tracing()
    headers: dict[str, str] = {}

    def per_request() -> None:
        if tracing.enabled:  # generate: the root span
            return
        with tracing.span("coordinator.prepare"):
            pass
        with tracing.span("coordinator.schedule"):
            if tracing.enabled:
                return
        with tracing.span("coordinator.attempt", None, client=True):
            tracing.inject(headers)
        tracing.trace_id()

    def empty() -> None:
        pass

    off = timeit.timeit(per_request, number=n) / n * 1e9
    base = timeit.timeit(empty, number=n) / n * 1e9
    print(f"tracing off: {off:.0f} ns per request (an empty call: {base:.0f} ns)")
    assert "opentelemetry.sdk" not in sys.modules, "the SDK was imported with tracing off"
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
