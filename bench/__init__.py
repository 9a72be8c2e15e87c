"""Benchmarks: each module runs as `python -m bench.NAME` and prints a table."""
