"""Measures the TCP forwarder on loopback: MB/s through it against direct, and connections/s.

Not a test (pytest does not collect it): ``python tests/proxy/bench_forwarder.py [--mb 1024]``.
The sink, the client and the proxy each run in their own process, as they would in a mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import threading
import time

from composemesh.proxy.stats import OUTBOUND, ProxyStats, Workload, passthrough_labels
from composemesh.proxy.tcp import Forwarder, passthrough

CHUNK = 256 * 1024


def _sink(ready: mp.Queue) -> None:  # type: ignore[type-arg]
    """Reads everything it is sent; answers each connection's first byte (for connections/s)."""
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)
    ready.put(server.getsockname()[1])

    def handle(conn: socket.socket) -> None:
        with conn:
            first = True
            buf = bytearray(CHUNK)
            while n := conn.recv_into(buf):
                if first:
                    conn.sendall(b"k")
                    first = False
                del n

    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _proxy(sink_port: int, ready: mp.Queue, use_uvloop: bool) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        loop = asyncio.get_running_loop()
        forwarder = Forwarder(OUTBOUND, ProxyStats(),
                              passthrough(passthrough_labels(OUTBOUND, Workload())),
                              resolver=lambda sock: ("127.0.0.1", sink_port))
        server = await loop.create_server(forwarder, "127.0.0.1", 0, backlog=1024)
        ready.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    if use_uvloop:
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())


def stream(port: int, total: int) -> float:
    """MB/s of one connection sending ``total`` bytes and waiting for the close."""
    data = b"x" * CHUNK
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            sock.sendall(data)
            sent += len(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):
            pass
        return total / (time.perf_counter() - start) / 1e6


def connections(port: int, seconds: float) -> float:
    """Connections/s: connect, one byte each way, close; one client at a time."""
    count = 0
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"p")
            assert sock.recv(1) == b"k"
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    ready: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    procs = [mp.Process(target=_sink, args=(ready,), daemon=True)]
    procs[0].start()
    sink_port = ready.get()
    ports = {"direct": sink_port}
    for name, use_uvloop in (("asyncio", False), ("uvloop", True)):
        proc = mp.Process(target=_proxy, args=(sink_port, ready, use_uvloop), daemon=True)
        proc.start()
        procs.append(proc)
        ports[name] = ready.get()
    total = args.mb * 1024 * 1024
    for name, port in ports.items():
        mbps = stream(port, total)
        cps = connections(port, args.seconds)
        print(f"{name:8s} {mbps:8.0f} MB/s   {cps:8.0f} connections/s")
    for proc in procs:
        proc.terminate()


if __name__ == "__main__":
    main()
