"""Protocols through the sidecars on loopback, on both event loops (issue 9, section 3).

Two proxies with mutual TLS between them (test_mtls.pair: A the caller's, B the app's):
upgrades whose server speaks right after the 101; server-first protocols on a port whose
protocol is not declared (A connects ahead, B learns the protocol from ALPN); clean closes
that count and log nothing. One proxy in front of raw servers (test_http_wire.wire): TCP to a
version's own address, line protocols that look like HTTP, trailers, an upstream's
``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import statistics
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from composemesh.proxy import inbound, tcp
from composemesh.proxy.http import HttpPath
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.router import Router, RouterSwitch
from composemesh.proxy.server import routing_applier
from composemesh.proxy.stats import (
    INBOUND,
    OUTBOUND,
    PeerLabels,
    ProxyStats,
    passthrough_labels,
)
from composemesh.proxy.table import build_table
from composemesh.proxy.tcp import Forwarder, sniff_http

from .conftest import run_on
from .snapshots import settings_of
from .test_http import V1, V2, route, routing, settings, snapshot
from .test_http_wire import OK, read_responses, wire
from .test_mtls import A_ADDR, Pair, Pki, get, new_pki, pair, tcp_call

pytestmark = pytest.mark.timeout(120)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]
BANNER = b"220 banner ready\r\n"
LABELS = passthrough_labels(OUTBOUND, PeerLabels())


@pytest.fixture(scope="module")
def pki() -> Pki:
    return new_pki()


def watch_loop_errors() -> list[dict[str, Any]]:
    """What the running loop's exception handler is told (a traceback in a proxy's log)."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: seen.append(context))
    return seen


def errors(*stats: ProxyStats) -> list[dict[str, int]]:
    return [{kind: n for kind, n in s.totals()[d]["errors_by_kind"].items() if n}
            for s in stats for d in (OUTBOUND, INBOUND)]


async def settle(p: Pair, closed: int) -> None:
    """Until both proxies counted ``closed`` TCP connections closed (or 5 s)."""
    for _ in range(500):
        a = p.a_stats.totals()[OUTBOUND]["connections_closed"]
        b = p.b_stats.totals()[INBOUND]["connections_closed"]
        if a >= closed and b >= closed:
            return
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- detection, pure


def test_sniff_http_wants_the_start_of_a_request_line() -> None:
    assert sniff_http(b"GET / HTTP/1.1\r\n") is True
    assert sniff_http(b"OPTIONS * HTTP/1.0\r\n") is True
    assert sniff_http(b"GET /a HTTP/") is True
    for undecided in (b"", b"G", b"GET", b"GET ", b"GET /path", b"GET /path ", b"GET /p HT"):
        assert sniff_http(undecided) is None, undecided
    for not_http in (b"GET key\r\n", b"GET key\n", b"GET a b\r\n", b"GET  x", b"get / HTTP/1.1",
                     b"GETX / HTTP/1.1", b"\x16\x03\x01", b"PRI * HTTP/2.0\r\n", b"220 hi",
                     b"SET k v\r\n", b"GET / FTP/1.0"):
        assert sniff_http(not_http) is False, not_http
    assert sniff_http(b"GET /" + b"a" * (tcp.SNIFF_MAX + 1)) is False


# --------------------------------------------------------------------------- 1. upgrades


async def upgrade_then_greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers an upgrade with 101 and, in the same breath, a greeting; then echoes once."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: chat\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        writer.write(b"hello from the server")
        data = await reader.read(65536)
        writer.write(b"echo:" + data)
        await writer.drain()
        await reader.read()  # until the client closes
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def test_an_upgrade_whose_server_speaks_first_loses_nothing(pki: Pki, loop_kind: str) -> None:
    """B sends the 101 and the greeting as two TLS records that A reads at once: each record
    goes to the protocol in place when it is delivered (the tunnel, after the first)."""
    rounds = 50

    async def main() -> None:
        loop_errors = watch_loop_errors()
        async with pair(pki, app=upgrade_then_greet) as p:
            for i in range(rounds):
                reader, writer = await asyncio.open_connection(A_ADDR, p.port)
                writer.write(b"GET /chat HTTP/1.1\r\nHost: reviews\r\nUpgrade: chat\r\n"
                             b"Connection: Upgrade\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 101 "), (i, head)
                greeting = await asyncio.wait_for(reader.readexactly(21), 5)
                assert greeting == b"hello from the server", i
                writer.write(b"ping %d" % i)
                assert await asyncio.wait_for(reader.readexactly(10 + len(str(i))), 5) == (
                    b"echo:ping %d" % i)
                writer.close()
                await writer.wait_closed()
            for _ in range(500):  # counted when each tunnel has closed
                if p.a_stats.http_totals()["requests"] == rounds:
                    break
                await asyncio.sleep(0.01)
            totals = p.a_stats.http_totals()
            assert totals["responses_by_code"] == {"101": rounds}
            assert totals["responses_by_flags"] == {"-": rounds}  # clean closes, no flag
            assert errors(p.a_stats, p.b_stats) == [{}] * 4
        assert loop_errors == []

    run_on(loop_kind, main())


def test_an_upgrade_the_upstream_breaks_is_counted_with_its_flag(loop_kind: str) -> None:
    async def reset_after_101(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: chat\r\n"
                     b"Connection: Upgrade\r\n\r\nhi")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset (linger 0), not a close

    async def main() -> None:
        async with wire(lambda request, i: OK) as w:
            await w.replace_upstream(reset_after_101)
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\nUpgrade: chat\r\n"
                         b"Connection: Upgrade\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\nhi"), 5)
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 5)
            for _ in range(200):
                if w.stats.http_totals()["requests"]:
                    break
                await asyncio.sleep(0.01)
            assert w.stats.http_totals()["responses_by_flags"] == {"UC": 1}

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- 2. by address


def says(version: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # to the client's FIN
        writer.write(version)
        await writer.drain()
        writer.close()

    return handler


def test_tcp_to_a_versions_own_address_reaches_that_version_only(loop_kind: str) -> None:
    """reviews-v1 and reviews-v2 are compose services of their own (pinned names): a TCP
    connection (declared, or detected: an h2c preface) to a v2 instance's address goes to v2
    although the weights send everything to v1; one to a v1 address to v1."""

    async def main() -> None:
        v1 = await asyncio.start_server(says(b"v1"), V1, 0)
        port = v1.sockets[0].getsockname()[1]
        v2 = await asyncio.start_server(says(b"v2"), V2, port)
        dialed = [V2]
        try:
            for protocol, first in (("tcp", b"x"), (None, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")):
                stats = ProxyStats()
                switch = RouterSwitch()
                http = HttpPath(stats, switch=switch)
                outbound = Forwarder(OUTBOUND, stats, switch.choose,
                                     resolver=lambda sock: (dialed[0], port))
                store = ConfigStore([routing_applier(switch, http, random.Random(1))])
                answer = store.offer(snapshot("s1", settings(
                    routing(route(("v1", 100))), [("v1", V1), ("v2", V2)], protocol)))
                assert answer.ok, answer.reason
                listener = await asyncio.get_running_loop().create_server(
                    outbound, "127.0.0.1", 0)
                listening = listener.sockets[0].getsockname()[1]
                try:
                    for address, want in ((V2, b"v2"), (V1, b"v1")):
                        dialed[0] = address
                        for _ in range(10):
                            got = await tcp_call("127.0.0.1", listening, first)
                            assert got == want, (protocol, address, got)
                finally:
                    listener.close()
                    outbound.abort_all()
                    http.close()
        finally:
            v1.close()
            v2.close()

    run_on(loop_kind, main())


def test_tcp_to_the_mesh_service_name_keeps_the_weights() -> None:
    """A compose service named like its mesh service has no name of its own: its address
    means the mesh service, and TCP to it is split by the weights."""
    s = settings(routing(route(("v2", 100))), [("v1", V1), ("v2", V2)], "tcp")
    s["services"]["reviews"][0]["node"] = "shop-reviews-netns-1"  # compose service "reviews"
    router = Router(build_table(settings_of(s), project="shop"), PeerLabels())
    for dialed in (V1, V2):
        hosts = set()
        for _ in range(20):
            destination = router.tcp_destination("reviews", 9080, dialed)
            assert destination is not None
            hosts.add(destination.host)
        assert hosts == {V2}, dialed


# --------------------------------------------------------------------------- 3. server first


async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server-first protocol: a banner at once, then an echo until the client's FIN."""
    try:
        writer.write(BANNER)
        while data := await reader.read(65536):
            writer.write(data)
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def test_a_banner_on_an_undeclared_port_waits_for_no_sniffing(
        pki: Pki, loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With both sides' detection waits set to 2 s, the banner still comes at once: A
    connected ahead and took the banner as the verdict, B took the protocol from ALPN."""
    monkeypatch.setattr(tcp, "SNIFF_TIMEOUT", 2.0)
    monkeypatch.setattr(inbound, "FIRST_BYTES_TIMEOUT", 2.0)

    async def main() -> None:
        loop_errors = watch_loop_errors()
        async with pair(pki, protocol=None, app=banner) as p:
            took = []
            for _ in range(30):
                started = time.monotonic()
                reader, writer = await asyncio.open_connection(A_ADDR, p.port)
                assert await asyncio.wait_for(reader.readexactly(len(BANNER)), 5) == BANNER
                took.append(time.monotonic() - started)
                writer.write(b"QUIT\r\n")
                assert await asyncio.wait_for(reader.readexactly(6), 5) == b"QUIT\r\n"
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
            median = statistics.median(took)
            print(f"banner through two proxies, port undeclared: median {median * 1000:.1f} ms,"
                  f" max {max(took) * 1000:.1f} ms")
            assert max(took) < 1.0  # far from the 2 s either side would have waited
            await settle(p, 30)
            assert p.a_stats.totals()[OUTBOUND]["connections_opened"] == 30
            assert p.b_stats.totals()[INBOUND]["connections_opened"] == 30
            assert p.a_stats.http_totals()["requests"] == 0
            assert errors(p.a_stats, p.b_stats) == [{}] * 4
        assert loop_errors == []

    run_on(loop_kind, main())


def test_http_on_an_undeclared_port_is_http_on_both_sides_with_no_error(
        pki: Pki, loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first connection is opened ahead and let go unused (cleanly) when the request
    comes; the port is then known to speak HTTP: no more connections ahead. B's inbound
    takes HTTP from ALPN (its own wait set to 2 s would show)."""
    monkeypatch.setattr(inbound, "FIRST_BYTES_TIMEOUT", 2.0)

    async def main() -> None:
        async with pair(pki, protocol=None) as p:
            started = time.monotonic()
            for _ in range(3):
                assert await get(p.url(), 2) == [(200, "reviews")] * 2
            assert time.monotonic() - started < 2.0
            inbound_http = p.b_stats.http_inbound_totals()
            assert inbound_http["requests_by_security"] == {"mutual_tls": 6}
            for _ in range(100):
                if not p.b_stats.totals()[INBOUND]["connections_active"]:
                    break
                await asyncio.sleep(0.02)
            b_tcp = p.b_stats.totals()[INBOUND]  # only the one opened ahead, closed cleanly
            assert b_tcp["connections_opened"] <= 1
            assert b_tcp["connections_active"] == 0
            assert errors(p.a_stats, p.b_stats) == [{}] * 4

    run_on(loop_kind, main())


def test_a_banner_reaches_a_direct_client_at_once(loop_kind: str) -> None:
    """One proxy, undeclared port, plaintext: the banner is the verdict (no 100 ms wait)."""

    async def main() -> None:
        async with wire(lambda request, i: OK, protocol=None) as w:
            await w.replace_upstream(banner)
            took = []
            for _ in range(10):
                started = time.monotonic()
                reader, writer = await w.connect()
                assert await asyncio.wait_for(reader.readexactly(len(BANNER)), 5) == BANNER
                took.append(time.monotonic() - started)
                writer.close()
            assert statistics.median(took) < tcp.SNIFF_TIMEOUT / 2

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- 4. HTTP edges


def test_a_line_protocol_that_starts_with_get_is_tcp(loop_kind: str) -> None:
    async def kv(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"VALUE " + line.split(b" ", 1)[1])
            await writer.drain()
        writer.close()

    async def main() -> None:
        async with wire(lambda request, i: OK, protocol=None) as w:
            await w.replace_upstream(kv)
            reader, writer = await w.connect()
            writer.write(b"GET key\r\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"VALUE key\r\n"
            writer.write(b"GET other thing\r\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"VALUE other thing\r\n"
            writer.close()
            assert w.stats.http_totals()["requests"] == 0

    run_on(loop_kind, main())


def test_chunked_trailers_pass_both_ways(loop_kind: str) -> None:
    response = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-Sum: 294\r\nX-Other: b\r\n\r\n")

    async def main() -> None:
        async with wire(lambda request, i: response) as w:
            reader, writer = await w.connect()
            writer.write(b"POST / HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n"
                         b"Trailer: X-Check\r\n\r\n2\r\nhi\r\n0\r\nX-Check: 7\r\n\r\n")
            raw = b""
            while not raw.endswith(b"0\r\nX-Sum: 294\r\nX-Other: b\r\n\r\n"):
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                assert chunk, raw
                raw += chunk
            assert bytes(w.upstream.raw[0]).endswith(b"0\r\nX-Check: 7\r\n\r\n")
            writer.write(b"GET /next HTTP/1.1\r\nHost: reviews\r\n\r\n")  # still in step
            (message,), _ = await read_responses(reader)
            assert message["body"] == b"abc"
            writer.close()

    run_on(loop_kind, main())


def test_an_upstreams_connection_close_closes_the_apps_connection(loop_kind: str) -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    async def main() -> None:
        async with wire(lambda request, i: closing) as w:
            w.upstream.close_after = True
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            (message,), raw = await read_responses(reader)
            assert message["body"] == b"ok"
            assert b"connection: close\r\n" in raw.lower()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # and closed after it
            writer.close()

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- 5. clean closes


async def echo_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()  # until the client's FIN
    writer.write(b"echo:" + data)
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("protocol", ["tcp", None])
def test_clean_closes_count_no_error_and_log_nothing(pki: Pki, loop_kind: str,
                                                     protocol: str | None) -> None:
    """50 TCP connections ended by the client first (its FIN, then the answer), 50 by the
    server first: both proxies count each opened and closed, and no error."""

    async def server_closes_first(reader: asyncio.StreamReader,
                                  writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        loop_errors = watch_loop_errors()
        async with pair(pki, protocol=protocol, app=echo_after_eof) as p:
            for _ in range(50):
                assert await tcp_call(A_ADDR, p.port, b"hello") == b"echo:hello"
            await settle(p, 50)
        async with pair(pki, protocol=protocol, app=server_closes_first) as q:
            for _ in range(50):
                reader, writer = await asyncio.open_connection(A_ADDR, q.port)
                assert await asyncio.wait_for(reader.read(), 5) == b"bye\n"
                writer.close()
                await writer.wait_closed()
            await settle(q, 50)
        for proxies in (p, q):
            a, b = proxies.a_stats.totals()[OUTBOUND], proxies.b_stats.totals()[INBOUND]
            assert (a["connections_opened"], a["connections_closed"]) == (50, 50)
            assert (b["connections_opened"], b["connections_closed"]) == (50, 50)
            assert errors(proxies.a_stats, proxies.b_stats) == [{}] * 4
        assert loop_errors == []

    run_on(loop_kind, main())
