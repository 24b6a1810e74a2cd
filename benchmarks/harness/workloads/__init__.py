"""One module per workload; registered by name in ``benchmarks.harness.workload.WORKLOADS``."""
