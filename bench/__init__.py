"""Benchmarks: training, start-up, statistics overhead, and serving (run.py, parts in serving/)."""
