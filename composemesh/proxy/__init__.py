"""The data plane: the sidecar proxy beside each app and the holder of its network namespace.

Entry points (kept import-light here; the CLI imports the module it needs):
``netns.run_netns_holder()``, ``server.run_proxy()``; the container healthcheck is
``composemesh.healthcheck``.
"""
