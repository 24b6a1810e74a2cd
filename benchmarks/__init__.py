"""Benchmarks: the serving harness (``benchmarks.harness``, run as ``pd-runtime bench``), the
scenario comparison, and the component benchmarks (standalone scripts beside this file)."""
