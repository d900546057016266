"""Benchmarks for monarch-kernels: ``python -m bench`` (op sweep CLI); see bench/RESULTS.md."""
