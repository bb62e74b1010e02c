"""The TCP data path on loopback, against real servers, on both event loops.

SO_ORIGINAL_DST needs an iptables redirect, which loopback tests do not have: the forwarder's
resolver is injected to name the real server as the "original destination" instead
(test_capture_e2e.py covers the real redirect).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from composemesh.proxy import tcp
from composemesh.proxy.stats import OUTBOUND, PeerLabels, ProxyStats, passthrough_labels
from composemesh.proxy.tcp import Destination, Forwarder, is_proxy_address, passthrough

from .conftest import run_on

LABELS = passthrough_labels(OUTBOUND, PeerLabels(workload="web-v1", app="web"))
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echoes until EOF, then half-closes and closes."""
    while data := await reader.read(1 << 18):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def proxied(handler: Handler, **forwarder_args: Any) -> AsyncIterator[
        tuple[Forwarder, int]]:
    """A real server behind a forwarder; yields the forwarder and the port clients dial."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[:2]
    forwarder_args.setdefault("resolver", lambda sock: target)
    forwarder = Forwarder(OUTBOUND, ProxyStats(), passthrough(LABELS), **forwarder_args)
    listener = await asyncio.get_running_loop().create_server(forwarder, "127.0.0.1", 0)
    try:
        yield forwarder, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        forwarder.abort_all()
        server.close()


async def settled(forwarder: Forwarder, closed: int = 1) -> dict[str, Any]:
    """The outbound totals once ``closed`` connections have been closed (or after 5 s)."""
    for _ in range(500):
        totals = forwarder.stats.totals()[OUTBOUND]
        if totals["connections_closed"] >= closed:
            return totals
        await asyncio.sleep(0.01)
    return forwarder.stats.totals()[OUTBOUND]


def test_ten_megabytes_echo_through_intact_and_counted(loop_kind: str) -> None:
    payload = os.urandom(10 * 1024 * 1024)

    async def main() -> None:
        async with proxied(echo) as (forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def send() -> None:
                for i in range(0, len(payload), 65536):
                    writer.write(payload[i:i + 65536])
                    await writer.drain()
                writer.write_eof()

            sending = asyncio.create_task(send())
            received = await reader.read(-1)  # to EOF: the echo server's FIN came through
            await sending
            writer.close()
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            totals = await settled(forwarder)
            assert totals["connections_opened"] == 1
            assert totals["connections_closed"] == 1
            assert totals["connections_active"] == 0
            assert totals["bytes_received"] == len(payload)
            assert totals["bytes_sent"] == len(payload)
            assert totals["errors"] == 0
            assert not forwarder.connections

    run_on(loop_kind, main())


def test_client_half_close_reaches_server_and_the_answer_still_comes_back(
        loop_kind: str) -> None:
    async def digest_on_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)  # only returns once the client's FIN arrived
        writer.write(hashlib.sha256(data).hexdigest().encode())
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with proxied(digest_on_eof) as (forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"request body")
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(-1), 5)
            assert answer == hashlib.sha256(b"request body").hexdigest().encode()
            writer.close()
            totals = await settled(forwarder)
            assert totals["connections_closed"] == 1
            assert totals["bytes_received"] == len(b"request body")
            assert totals["bytes_sent"] == 64

    run_on(loop_kind, main())


def test_server_half_close_reaches_client_which_can_still_send(loop_kind: str) -> None:
    async def main() -> None:
        heard: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def banner_then_listen(reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> None:
            writer.write(b"hello")
            writer.write_eof()
            heard.set_result(await reader.read(-1))
            writer.close()

        async with proxied(banner_then_listen) as (forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(-1), 5) == b"hello"  # the server's FIN
            writer.write(b"still talking")
            await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(heard, 5) == b"still talking"
            writer.close()
            totals = await settled(forwarder)
            assert totals["connections_closed"] == 1

    run_on(loop_kind, main())


def test_flow_control_bounds_the_proxys_buffer_until_the_server_reads(loop_kind: str) -> None:
    total = 64 * 1024 * 1024

    async def main() -> None:
        go = asyncio.Event()
        got = asyncio.get_running_loop().create_future()

        async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await go.wait()
            count = 0
            while data := await reader.read(1 << 18):
                count += len(data)
            got.set_result(count)
            writer.close()

        async with proxied(slow_sink) as (forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * total)  # all at once: the client's own buffer holds the rest
            await asyncio.sleep(1.0)
            (downstream,) = forwarder.connections
            assert downstream.upstream is not None
            buffered = downstream.upstream.transport.get_write_buffer_size()
            assert buffered <= tcp.WRITE_HIGH_WATER + 256 * 1024
            assert not downstream.transport.is_reading()  # paused: the server is not reading
            assert forwarder.stats.totals()[OUTBOUND]["bytes_received"] < total // 2
            go.set()
            await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(got, 30) == total
            writer.close()

    run_on(loop_kind, main())


def test_flow_control_bounds_the_proxys_buffer_until_the_client_reads(loop_kind: str) -> None:
    total = 64 * 1024 * 1024

    async def main() -> None:
        async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"y" * total)
            await writer.drain()
            writer.close()

        async with proxied(firehose) as (forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            await asyncio.sleep(1.0)  # not reading yet
            (downstream,) = forwarder.connections
            assert downstream.upstream is not None
            assert downstream.transport.get_write_buffer_size() <= (
                tcp.WRITE_HIGH_WATER + 256 * 1024)
            assert not downstream.upstream.transport.is_reading()
            assert forwarder.stats.totals()[OUTBOUND]["bytes_sent"] < total // 2
            count = 0
            while data := await reader.read(1 << 20):
                count += len(data)
            assert count == total
            writer.close()

    run_on(loop_kind, main())


def test_connect_failure_closes_the_client_and_is_counted(loop_kind: str) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]  # nobody listens here once it is closed

    async def main() -> None:
        async with proxied(echo, resolver=lambda sock: ("127.0.0.1", closed_port)) as (
                forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"anyone?")
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            totals = await settled(forwarder)
            assert totals["errors_by_kind"]["connect_failed"] == 1
            assert totals["connections_opened"] == totals["connections_closed"] == 1

    run_on(loop_kind, main())


def test_connect_timeout_drops_the_client(loop_kind: str) -> None:
    # A listener whose backlog is full drops further SYNs: connecting to it hangs.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname())
    hanging = full.getsockname()[:2]

    async def main() -> None:
        async with proxied(echo, resolver=lambda sock: hanging, connect_timeout=0.3) as (
                forwarder, port):
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = loop.time()
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            assert 0.25 < loop.time() - started < 2.0
            writer.close()
            totals = await settled(forwarder)
            assert totals["errors_by_kind"]["connect_timeout"] == 1

    try:
        run_on(loop_kind, main())
    finally:
        filler.close()
        full.close()


def test_a_connection_to_the_proxy_itself_is_refused_not_looped(loop_kind: str) -> None:
    async def main() -> None:
        async with proxied(echo, resolver=lambda sock: sock.getsockname()[:2]) as (
                forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await asyncio.sleep(0.05)
            totals = forwarder.stats.totals()[OUTBOUND]
            assert totals["errors_by_kind"]["loop"] == 1
            assert totals["connections_opened"] == 0

    run_on(loop_kind, main())


def test_the_real_resolver_refuses_an_unredirected_connection(loop_kind: str) -> None:
    """No NAT here: SO_ORIGINAL_DST gives the listener's own address (a loop) or nothing."""

    async def main() -> None:
        async with proxied(echo, resolver=tcp.original_dst) as (forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            await asyncio.sleep(0.05)
            errors = forwarder.stats.totals()[OUTBOUND]["errors_by_kind"]
            assert errors["loop"] + errors["original_dst"] == 1

    run_on(loop_kind, main())


def test_no_route_closes_and_a_new_chooser_applies_to_new_connections(loop_kind: str) -> None:
    async def main() -> None:
        async with proxied(echo) as (forwarder, port):
            target = forwarder.resolver(None)
            forwarder.chooser = lambda original: None
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert forwarder.stats.totals()[OUTBOUND]["errors_by_kind"]["no_route"] == 1

            other = passthrough_labels(OUTBOUND, PeerLabels(workload="web-v2"))
            forwarder.chooser = lambda original: Destination(target[0], target[1], other)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            assert forwarder.stats.tcp(other).opened == 1
            assert forwarder.stats.tcp(LABELS).opened == 0
            writer.close()

    run_on(loop_kind, main())


def test_abort_all_drops_open_connections(loop_kind: str) -> None:
    async def main() -> None:
        async with proxied(echo) as (forwarder, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
            forwarder.abort_all()
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            totals = await settled(forwarder)
            assert totals["connections_active"] == 0

    run_on(loop_kind, main())


def test_is_proxy_address() -> None:
    ports = (15001, 15006)
    local = ("127.0.0.1", 15001)
    assert is_proxy_address(("127.0.0.1", 15001), local, ports)
    assert is_proxy_address(("10.0.0.5", 15006), ("10.0.0.5", 15006), ports)
    assert is_proxy_address(("127.0.0.1", 15006), ("10.0.0.5", 15001), ports)
    assert not is_proxy_address(("10.0.0.9", 15001), local, ports)  # someone else's 15001
    assert not is_proxy_address(("10.0.0.9", 9080), local, ports)
