"""A proxy's outbound HTTP path in a process of its own, for test_hostile's memory figures.

    python -m tests.proxy.hostile_proxy    # prints the port it listens on; serves until killed

As a sidecar runs it (uvloop, the defaults of ProxyLimits): one mesh service "reviews" whose
one endpoint is a small upstream in the same process, answering every request "ok".
"""

from __future__ import annotations

import asyncio
import random
import sys

from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset
from composemesh.model.snapshot import (
    DeclaredProtocols,
    ProxyIdentity,
    ServiceEndpoint,
    Snapshot,
    SnapshotSettings,
)
from composemesh.proxy.http import HttpPath
from composemesh.proxy.router import EMPTY_INBOUND, Router, Routers
from composemesh.proxy.stats import OUTBOUND, ProxyStats, workload_of
from composemesh.proxy.table import table_from_snapshot
from composemesh.proxy.tcp import Forwarder

UPSTREAM = "127.0.0.2"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(OK)


async def main() -> None:
    loop = asyncio.get_running_loop()
    upstream = await loop.create_server(Answer, UPSTREAM, 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    routing = ServiceRouting("reviews", (HttpRoute("default", (), (WeightedSubset("v1", 1),)),))
    identity = ProxyIdentity("shop-web-netns-1", "shop", "web", "web", "v1")
    snapshot = Snapshot("1", identity, settings=SnapshotSettings(
        services={"reviews": (ServiceEndpoint("shop-reviews-netns-1", "v1", UPSTREAM),)},
        routing={"reviews": routing},
        protocols={"reviews": DeclaredProtocols("http")},
    ))
    stats = ProxyStats()
    http = HttpPath(stats)
    router = Router(table_from_snapshot(snapshot), workload_of(identity),
                    rng=random.Random(1), http=http.entry)
    http.switch.current = Routers(router, EMPTY_INBOUND)
    forwarder = Forwarder(OUTBOUND, stats, http.switch.choose,
                          resolver=lambda sock: (UPSTREAM, upstream_port))
    listener = await loop.create_server(forwarder, "127.0.0.1", 0)
    print(listener.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main()))
