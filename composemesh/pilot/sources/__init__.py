"""Where the pilot learns about workloads: one package per source, each watch + pure convert."""
