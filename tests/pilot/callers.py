"""A stand-in for the kernel's attestation of the pilot socket's peer, for tests of the API.

The real attestor (``pilot.attest``: SO_PEERPIDFD or SO_PEERCRED, the PID's cgroup, the
engine's view of which proxy container that is) runs for real in tests/pilot/test_attest.py
(a real Unix socket, real processes) and on the real engine in tests/e2e. Tests of what the
API does with an attested caller say who that caller is instead, with a ``Callers``.
"""

from __future__ import annotations

from aiohttp import web

from composemesh.model.mesh import MeshState
from composemesh.pilot.attest import Caller, Unknown

STRANGER = "f" * 64  # the container id of a container that is no proxy of the project


class Callers:
    """Says the caller is the proxy of ``node`` (the default), the host, or a stranger."""

    def __init__(self, node: str | None = None) -> None:
        self.role = "proxy" if node else "host"
        self.node = node
        self.calls = 0

    def proxy(self, node: str) -> Callers:
        self.role, self.node = "proxy", node
        return self

    def host(self) -> Callers:
        self.role, self.node = "host", None
        return self

    def pilot(self) -> Callers:
        self.role, self.node = "pilot", None
        return self

    def stranger(self) -> Callers:
        self.role, self.node = "stranger", None
        return self

    def __call__(self, request: web.Request, state: MeshState) -> Caller | Unknown:
        self.calls += 1
        if self.role in ("host", "pilot"):
            return Caller(self.role, 4242)  # type: ignore[arg-type]
        if self.role == "stranger":
            return Unknown(f"container {STRANGER[:12]} is no proxy of project "
                           f"{state.project!r} that the pilot knows", retry=True)
        workload = state.workload_by_node(self.node or "")
        if workload is None:
            return Unknown(f"the proxy of {self.node} is not known", retry=True)
        return Caller("proxy", 4242, workload.proxy_container_id or "c" * 64, workload)
