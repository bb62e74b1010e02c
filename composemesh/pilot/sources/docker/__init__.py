"""The Docker engine as a source of workloads: watched by events, converted by pure functions."""
