# ruff: noqa: E402
"""TCP forwarding on loopback: one stream's MB/s and connections/s, against direct and HAProxy.

    python -m bench.tcp [--rounds 3] [--mb 512] [--duration 3] [--connections 1] [--quick]

Subjects, each in its own process and all on the same hop to one sink (uvloop, reads and
drops; answers a connection's first byte with one byte):

- direct: the client connects to the sink;
- haproxy: HAProxy in ``mode tcp`` (one thread unless --haproxy-threads);
- composemesh: the proxy's TCP ``Forwarder`` on uvloop, pass-through to the original
  destination that an injected resolver gives (the sink), as the outbound capture would.

Figures: MB/s (10^6 bytes) of one connection sending --mb MiB and waiting for the close;
connections/s of --connections clients (1: sequential) that each connect, send a byte, read
a byte and close, for --duration seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: put the repository, not bench/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import socket
import time
from collections.abc import Callable

from bench._common import (
    MP,
    Baseline,
    BenchError,
    Components,
    Metric,
    Ready,
    Results,
    console,
    print_header,
    print_ratio_note,
    progress,
    require_tools,
    results_table,
    rotated,
    run_with_components,
    serve_forever,
    start_haproxy,
    tool_version,
)

SCRIPT = "bench/tcp.py"
HOST = "127.0.0.1"
CHUNK = 256 * 1024
SUBJECTS = ("direct", "haproxy", "composemesh")
METRICS = (
    Metric("stream", "one stream, MB/s"),
    Metric("conns", "connections/s"),
)
BASELINES = (Baseline("direct", "÷ direct"), Baseline("haproxy", "÷ HAProxy"))


# --------------------------------------------------------------------------- components


class _Sink(asyncio.Protocol):
    """Drops what it reads; answers the first bytes with b"k"; closes on the client's FIN."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.WriteTransport = transport  # type: ignore[assignment]
        self.first = True

    def data_received(self, data: bytes) -> None:
        if self.first:
            self.first = False
            self.transport.write(b"k")

    def eof_received(self) -> bool:
        return False  # close our side too


def sink(ready: Ready) -> None:
    async def start() -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(_Sink, HOST, 0, backlog=4096)

    serve_forever(ready, start)


def composemesh_forwarder(ready: Ready, sink_port: int) -> None:
    from composemesh.proxy.stats import OUTBOUND, PeerLabels, ProxyStats, passthrough_labels
    from composemesh.proxy.tcp import Forwarder, passthrough

    async def start() -> asyncio.Server:
        forwarder = Forwarder(OUTBOUND, ProxyStats(),
                              passthrough(passthrough_labels(OUTBOUND, PeerLabels())),
                              resolver=lambda sock: (HOST, sink_port))
        return await asyncio.get_running_loop().create_server(forwarder, HOST, 0, backlog=4096)

    serve_forever(ready, start)


# --------------------------------------------------------------------------- clients


def stream(port: int, total: int) -> float:
    """MB/s of one connection sending ``total`` bytes, then waiting for the sink's close."""
    data = b"x" * CHUNK
    with socket.create_connection((HOST, port)) as sock:
        start = time.perf_counter()
        sent = 0
        while sent < total:
            sock.sendall(data)
            sent += len(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(CHUNK):
            pass
        return sent / (time.perf_counter() - start) / 1e6


def connect_loop(port: int, seconds: float) -> tuple[int, float]:
    """Connect, one byte each way, close; again for ``seconds``: (connections, elapsed)."""
    count = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        with socket.create_connection((HOST, port)) as sock:
            sock.sendall(b"p")
            if sock.recv(1) != b"k":
                raise BenchError(f"port {port}: connection closed before its answer")
        count += 1
    return count, time.perf_counter() - start


def connections_per_s(port: int, seconds: float, clients: int,
                      pool: Callable[[list[tuple[int, float]]], list[tuple[int, float]]] | None
                      ) -> float:
    if pool is None:
        count, elapsed = connect_loop(port, seconds)
        return count / elapsed
    done = pool([(port, seconds)] * clients)
    return sum(count / elapsed for count, elapsed in done)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[1])
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument("--duration", type=float,
                        help="seconds of the connections/s run per subject (default 3; quick 1)")
    parser.add_argument("--connections", type=int, default=1,
                        help="parallel clients of the connections/s run, one process each "
                             "(default 1: sequential)")
    parser.add_argument("--mb", type=int, help="MiB the stream sends (default 512; quick 64)")
    parser.add_argument("--haproxy-threads", type=int, default=1,
                        help="HAProxy's nbthread (default 1, as the proxy has one loop)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 30 s")
    args = parser.parse_args(argv)
    defaults = {"rounds": (3, 2), "duration": (3.0, 1.0), "mb": (512, 64)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.rounds < 1 or args.duration <= 0 or args.mb < 1 or args.connections < 1:
        parser.error("--rounds, --duration, --mb and --connections must be positive")
    return args


def run(args: argparse.Namespace, comps: Components) -> Results:
    tools = require_tools("haproxy")
    out = console()
    sink_port = comps.spawn("sink", sink)
    ports = {
        "direct": sink_port,
        "haproxy": start_haproxy(comps, tools["haproxy"], "tcp", (HOST, sink_port),
                                 args.haproxy_threads),
        "composemesh": comps.spawn("composemesh forwarder", composemesh_forwarder, sink_port),
    }
    haproxy_version = tool_version([tools["haproxy"], "-v"], r"version (\S+)")
    print_header(out, SCRIPT, [
        f"{args.rounds} round(s); stream {args.mb} MiB; connections/s for {args.duration:g} s "
        f"with {args.connections} client(s)",
        f"direct: a uvloop sink; haproxy {haproxy_version}: mode tcp, nbthread "
        f"{args.haproxy_threads}",
        "composemesh: proxy.tcp.Forwarder on uvloop, pass-through",
    ])
    pool = MP.Pool(args.connections) if args.connections > 1 else None
    try:
        mapper = (lambda jobs: pool.starmap(connect_loop, jobs)) if pool is not None else None
        results: Results = {}
        for round_no in range(args.rounds):
            for subject in rotated(SUBJECTS, round_no):
                figure = stream(ports[subject], args.mb * 1024 * 1024)
                results.setdefault(("stream", subject), []).append(figure)
            for subject in rotated(SUBJECTS, round_no):
                figure = connections_per_s(ports[subject], args.duration, args.connections,
                                           mapper)
                results.setdefault(("conns", subject), []).append(figure)
            comps.check_alive()
            progress(f"round {round_no + 1}/{args.rounds} done")
    finally:
        if pool is not None:
            pool.terminate()
    out.print(results_table("TCP on loopback (medians)", METRICS, SUBJECTS, results, BASELINES))
    print_ratio_note(out)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_with_components(SCRIPT, run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
