"""Benchmarks: figures as ratios against baselines run in the same command (README.md)."""
