"""Servers the benchmark compares against: a no-op, a naive server, LitServe, BentoML."""
