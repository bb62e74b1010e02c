"""The control plane: discovers workloads, builds the mesh state and pushes per-proxy snapshots."""
