"""Benchmarks against peers, each printing figures and ratios side by side."""
