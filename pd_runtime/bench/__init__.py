"""The benchmark harness, run as ``pd-runtime bench`` (see docs/benchmarks.md).

    cli        the ``pd-runtime bench`` parser and run (imported lazily by ``pd_runtime.cli``)
    client     one streamed request, timed token by token
    runner     open-loop (Poisson) and closed-loop drivers
    workload   the workload ABC and its name registry; workloads/ holds one module per workload
    textgen    seeded prompt text of a given token length
    metrics    percentiles, throughput and goodput from per-request records
    report     run JSON, summary rows, the Markdown table
    scenarios  the scenario comparison (fronts on one set of real workers); configs/ its default
    machine    what every result records about the machine it ran on
    plots      PNG charts (matplotlib, the ``bench`` extra)

No serving process imports this package. The one-off component benchmarks (``benchmarks/*.py`` in
the repository) are scripts outside the wheel that import their shared code from here.
"""

from __future__ import annotations

__all__: list[str] = []
