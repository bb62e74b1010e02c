"""Measures the outbound HTTP path on loopback: requests/s through the proxy against direct.

Not a test (pytest does not collect it): ``python tests/proxy/bench_http.py [--seconds 5]``.
The upstream (a minimal httptools server), the proxy and the load (``wrk`` when installed,
else an asyncio client) each run in their own process, as they would in a mesh. Rows: one
connection, then 50 concurrent ones; columns: direct to the upstream, through the proxy as
HTTP (routed per request, pooled upstream connections), and as TCP (pass-through).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import re
import shutil
import subprocess
import time

import httptools

from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset, routing_to_json
from composemesh.model.snapshot import ProxyIdentity, Snapshot
from composemesh.proxy.http import OutboundHttp
from composemesh.proxy.stats import OUTBOUND, ProxyStats, workload_of
from composemesh.proxy.table import table_from_snapshot
from composemesh.proxy.tcp import Forwarder, Router

UPSTREAM = "127.0.0.2"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nContent-Type: text/plain\r\n\r\nHello, world!"


class _Answer(asyncio.Protocol):
    """Answers every request with ANSWER, keep-alive."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(ANSWER)  # type: ignore[attr-defined]


def _upstream(ready: mp.Queue) -> None:  # type: ignore[type-arg]
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            _Answer, UPSTREAM, 0, backlog=1024)
        ready.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    uvloop.run(main())


def _proxy(port: int, protocol: str, ready: mp.Queue) -> None:  # type: ignore[type-arg]
    import uvloop

    async def main() -> None:
        routing = ServiceRouting("upstream", (HttpRoute("default", (), (
            WeightedSubset("v1", 100),)),))
        identity = ProxyIdentity("bench-client-netns-1", "bench", "client", "client", "v1")
        snapshot = Snapshot("1", identity, settings={
            "services": {"upstream": [{"node": "bench-upstream-netns-1", "version": "v1",
                                       "address": UPSTREAM}]},
            "routing": {"upstream": routing_to_json(routing)},
            "protocols": {"upstream": {"default": protocol, "ports": {}}},
        })
        stats = ProxyStats()
        http = OutboundHttp(stats)
        router = Router(table_from_snapshot(snapshot), workload_of(identity),
                        rng=random.Random(1), http=http.entry)
        http.router = router
        forwarder = Forwarder(OUTBOUND, stats, router.choose,
                              resolver=lambda sock: (UPSTREAM, port))
        server = await asyncio.get_running_loop().create_server(
            forwarder, "127.0.0.1", 0, backlog=1024)
        ready.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    uvloop.run(main())


def wrk(host: str, port: int, connections: int, seconds: float) -> float:
    out = subprocess.run(
        ["wrk", f"-t{min(connections, 2)}", f"-c{connections}", f"-d{seconds:g}s",
         f"http://{host}:{port}/"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def asyncio_client(host: str, port: int, connections: int, seconds: float) -> float:
    """Keep-alive GETs, one in flight per connection, for ``seconds``."""
    request = b"GET / HTTP/1.1\r\nHost: upstream\r\n\r\n"

    async def one(deadline: float) -> int:
        reader, writer = await asyncio.open_connection(host, port)
        count = 0
        while time.perf_counter() < deadline:
            writer.write(request)
            await reader.readexactly(len(ANSWER))
            count += 1
        writer.close()
        return count

    async def main() -> float:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(start + seconds) for _ in range(connections)))
        return sum(counts) / (time.perf_counter() - start)

    import uvloop
    return float(uvloop.run(main()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    ready: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=_upstream, args=(ready,), daemon=True)]
    procs[0].start()
    upstream_port = ready.get()
    ports = {"direct": (UPSTREAM, upstream_port)}
    for name, protocol in (("proxy http", "http"), ("proxy tcp", "tcp")):
        proc = mp.Process(target=_proxy, args=(upstream_port, protocol, ready), daemon=True)
        proc.start()
        procs.append(proc)
        ports[name] = ("127.0.0.1", ready.get())
    load = wrk if shutil.which("wrk") else asyncio_client
    print(f"load: {'wrk' if load is wrk else 'asyncio client'}, {args.seconds:g} s per cell")
    print(f"{'':16s}" + "".join(f"{name:>14s}" for name in ports))
    for connections in (1, 50):
        cells = [load(host, port, connections, args.seconds) for host, port in ports.values()]
        print(f"{connections:3d} connection(s)" + "".join(f"{c:14,.0f}" for c in cells))
    for proc in procs:
        proc.terminate()


if __name__ == "__main__":
    main()
