"""Hostile HTTP against one proxy on loopback: broken framing, oversized heads, slow and idle
clients, idle tunnels, too many connections from one source, and paths that try to slip past
a policy. Every attack is a raw socket; the proxy's limits are set short where a timeout is
tested, and the assertions wait for the event with generous bounds (a busy 2-core machine).

The outbound path is test_http_wire's ``wire`` (a RawUpstream as the endpoint). The inbound
path is built as ``server.data_path`` builds it: an ``InboundForwarder`` and an inbound ``HttpPath``
fed a snapshot through ``routing_applier``; its original-destination lookup names the app (a
RawUpstream on 127.0.0.2), as SO_ORIGINAL_DST would behind the capture.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any

import pytest

from composemesh.model.limits import ProxyLimits
from composemesh.model.policy import KEEP_UNCHANGED, Operation, Policy
from composemesh.model.snapshot import ProxyIdentity, Snapshot, encode_snapshot
from composemesh.proxy.http import HttpPath
from composemesh.proxy.inbound import InboundForwarder
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.router import RouterSwitch
from composemesh.proxy.server import routing_applier
from composemesh.proxy.stats import INBOUND, OUTBOUND, ProxyStats

from .conftest import PYTHON, REPO, run_on
from .test_http_wire import OK, RawUpstream, Request, read_responses, wire

APP = "127.0.0.2"
SHORT = 0.5  # seconds: the timeouts under test
WAIT = 10.0  # seconds an expected event may take on a loaded machine, at most


async def closed_within(reader: asyncio.StreamReader, seconds: float = WAIT) -> bytes:
    """Everything until the proxy closes the connection (EOF or a reset)."""
    out = b""
    with contextlib.suppress(ConnectionError):
        while data := await asyncio.wait_for(reader.read(65536), seconds):
            out += data
    return out


async def emptied(held: Callable[[], Collection[object]], seconds: float = WAIT) -> bool:
    """Whether ``held()`` becomes empty within ``seconds``."""
    deadline = time.monotonic() + seconds
    while held():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def ok(request: Request, i: int) -> bytes:
    return OK


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize("body", [
    b"POST /up HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: xchunked\r\n\r\nabc",
    b"POST /up HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffffffff\r\n",
    b"POST /up HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n",
    b"POST /up HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY",
    b"POST /up HTTP/1.1\r\nHost: reviews\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
], ids=["xchunked", "chunk-size-overflow", "bad-chunk-size", "bad-chunk-end", "two-lengths"])
def test_framing_broken_after_the_head_is_a_400_and_a_close_at_once(loop_kind: str,
                                                                     body: bytes) -> None:
    async def main() -> None:
        async with wire(ok) as w:
            reader, writer = await w.connect()
            writer.write(body)
            started = time.monotonic()
            raw = await closed_within(reader)
            assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw
            assert b"\r\nconnection: close\r\n" in raw
            assert raw.endswith(b"\r\n\r\nBad Request")
            assert time.monotonic() - started < WAIT / 2
            assert w.upstream.requests == []
            # the client has its answer and a FIN; the proxy lets go of the connection after
            # a linger (reading what the client may still send) even if the client never closes
            assert await emptied(lambda: w.http.connections)
            assert w.stats.http_totals()["responses_by_code"] == {"400": 1}

    run_on(loop_kind, main())


def test_a_broken_body_closes_the_upstream_connection_it_had_opened(loop_kind: str) -> None:
    """100-continue sends the head upstream before the body: the upstream connection exists
    when the framing breaks, and it is closed with the client's."""

    async def main() -> None:
        async with wire(ok) as w:
            reader, writer = await w.connect()
            writer.write(b"POST /up HTTP/1.1\r\nHost: reviews\r\nExpect: 100-continue\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for _ in range(500):  # the head is upstream
                if w.upstream.raw and b"\r\n\r\n" in w.upstream.raw[0]:
                    break
                await asyncio.sleep(0.01)
            assert len(w.http.pool.connections) == 1
            writer.write(b"5\r\nhello\r\nnot-a-size\r\n")
            raw = await closed_within(reader)
            assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw
            assert await emptied(lambda: w.http.pool.connections)
            assert w.http.pool.idle_count() == 0

    run_on(loop_kind, main())


def test_twenty_broken_requests_leave_no_connection_open(loop_kind: str) -> None:
    """The issue's attack: 20 connections with `Transfer-Encoding: xchunked` held 42
    descriptors for as long as the attacker liked."""

    async def main() -> None:
        async with wire(ok) as w:
            streams = [await w.connect() for _ in range(20)]
            for _, writer in streams:
                writer.write(b"POST / HTTP/1.1\r\nHost: reviews\r\n"
                             b"Transfer-Encoding: xchunked\r\n\r\nx")
            for reader, _ in streams:
                assert (await closed_within(reader)).startswith(b"HTTP/1.1 400 ")
            assert await emptied(lambda: w.http.connections)  # the clients still hold theirs
            assert w.http.pool.connections == set()

    run_on(loop_kind, main())


def test_a_broken_request_behind_a_good_one_ends_the_connection_after_its_answer(
        loop_kind: str) -> None:
    async def main() -> None:
        async with wire(ok) as w:
            reader, writer = await w.connect()
            writer.write(b"GET /a HTTP/1.1\r\nHost: reviews\r\n\r\n"
                         b"POST /b HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: xchunked\r\n"
                         b"\r\nx")
            raw = await closed_within(reader)
            assert raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw
            assert [r.url for r in w.upstream.requests] == [b"/a"]

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- head limits


@pytest.mark.parametrize(("head", "status"), [
    (b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
     b"431 Request Header Fields Too Large"),
    (b"GET / HTTP/1.1\r\nHost: reviews\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(100))
     + b"\r\n", b"431 Request Header Fields Too Large"),
    (b"GET /" + b"a" * (16 * 1024) + b" HTTP/1.1\r\nHost: reviews\r\n\r\n",
     b"414 URI Too Long"),
], ids=["head-over-64KiB", "101-headers", "url-over-16KiB"])
def test_heads_past_the_limits_are_refused(loop_kind: str, head: bytes, status: bytes) -> None:
    async def main() -> None:
        async with wire(ok) as w:
            reader, writer = await w.connect()
            writer.write(head)
            raw = await closed_within(reader)
            assert raw.startswith(b"HTTP/1.1 " + status + b"\r\n"), raw[:200]
            assert raw.endswith(b"\r\n\r\n" + status.split(b" ", 1)[1])
            assert w.upstream.requests == []

    run_on(loop_kind, main())


def test_heads_within_the_limits_pass_and_bodies_do_not_count(loop_kind: str) -> None:
    """Just under each limit passes; a body far larger than a head, in the same read as its
    head, is a body; the limits are the configured ones."""
    limits = ProxyLimits(max_request_headers_kb=8, max_headers_count=10, max_url_kb=1)

    async def main() -> None:
        async with wire(ok, limits=limits) as w:
            reader, writer = await w.connect()
            body = b"b" * 300_000
            writer.write(b"POST /" + b"u" * 1000 + b" HTTP/1.1\r\nHost: reviews\r\n"
                         + b"".join(b"X-%d: 1\r\n" % i for i in range(8))
                         + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            (message,), _ = await read_responses(reader)
            assert message["body"] == b"ok"
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\nX: " + b"x" * 8200 + b"\r\n\r\n")
            raw = await closed_within(reader)
            assert raw.startswith(b"HTTP/1.1 431 "), raw[:100]
            assert len(w.upstream.requests) == 1

    run_on(loop_kind, main())


def test_a_head_trickled_past_the_limit_is_refused_before_it_ends(loop_kind: str) -> None:
    """64 KiB of one header value in 1 KiB writes: refused once the budget is spent, while
    the client is still sending (never buffered to its end)."""

    async def main() -> None:
        async with wire(ok) as w:
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: ")
            answered = asyncio.ensure_future(closed_within(reader))
            sent = 0
            with contextlib.suppress(ConnectionError):
                while not answered.done() and sent < 10 * 1024 * 1024:
                    writer.write(b"a" * 1024)
                    await writer.drain()
                    sent += 1024
                    await asyncio.sleep(0)
            raw = await answered
            assert raw.startswith(b"HTTP/1.1 431 "), raw[:100]
            assert sent < 1024 * 1024  # refused long before the client was done

    run_on(loop_kind, main())


def test_a_response_head_past_the_limit_is_a_502_and_the_upstream_is_closed(
        loop_kind: str) -> None:
    huge = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 80_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    many = (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
            + b"Content-Length: 2\r\n\r\nok")

    async def main() -> None:
        for answer in (huge, many):
            async with wire(lambda request, i, a=answer: a) as w:  # type: ignore[misc]
                reader, writer = await w.connect()
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                (message,), raw = await read_responses(reader)
                assert raw.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), raw[:100]
                assert message["body"].endswith(b"reset reason: protocol error")  # type: ignore[union-attr]
                assert w.stats.http_totals()["responses_by_flags"] == {"UPE": 1}
                assert w.http.pool.connections == set()
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")  # still usable
                (again,), _ = await read_responses(reader)
                assert again["body"].startswith(b"upstream connect error")  # type: ignore[union-attr]

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- timeouts


def test_slowloris_gets_408_after_the_header_timeout(loop_kind: str) -> None:
    limits = ProxyLimits(request_headers_timeout=SHORT)

    async def main() -> None:
        async with wire(ok, limits=limits) as w:
            reader, writer = await w.connect()
            started = time.monotonic()
            answered = asyncio.ensure_future(closed_within(reader))
            with contextlib.suppress(ConnectionError):
                for byte in b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa":
                    if answered.done():
                        break
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)  # slower than the timeout allows for the head
            raw = await answered
            took = time.monotonic() - started
            assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), raw
            assert raw.endswith(b"\r\n\r\nrequest header timeout")
            assert SHORT * 0.8 <= took < WAIT, took
            assert w.upstream.requests == []

    run_on(loop_kind, main())


def test_a_silent_connection_is_closed_by_the_header_timeout(loop_kind: str) -> None:
    limits = ProxyLimits(request_headers_timeout=SHORT)

    async def main() -> None:
        async with wire(ok, limits=limits) as w:
            reader, _ = await w.connect()
            started = time.monotonic()
            assert await closed_within(reader) == b""  # closed without a word
            assert SHORT * 0.8 <= time.monotonic() - started < WAIT
            assert w.stats.totals()[OUTBOUND]["errors_by_kind"]["idle_timeout"] == 1

    run_on(loop_kind, main())


def test_a_later_request_head_has_the_header_timeout_from_its_first_byte(loop_kind: str) -> None:
    limits = ProxyLimits(request_headers_timeout=SHORT, idle_timeout=60)

    async def main() -> None:
        async with wire(ok, limits=limits) as w:
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            await read_responses(reader)
            await asyncio.sleep(SHORT * 2)  # idle between requests: no header timeout
            writer.write(b"GET / HTTP/1.1\r\n")
            started = time.monotonic()
            raw = await closed_within(reader)
            assert raw.startswith(b"HTTP/1.1 408 "), raw
            assert SHORT * 0.8 <= time.monotonic() - started < WAIT

    run_on(loop_kind, main())


def test_an_idle_keep_alive_connection_is_closed_and_a_busy_one_is_not(loop_kind: str) -> None:
    limits = ProxyLimits(idle_timeout=SHORT)

    async def main() -> None:
        async with wire(ok, limits=limits) as w:
            busy_reader, busy = await w.connect()
            idle_reader, idle = await w.connect()
            for writer, reader in ((busy, busy_reader), (idle, idle_reader)):
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                await read_responses(reader)
            started = time.monotonic()
            closing = asyncio.ensure_future(closed_within(idle_reader))
            while not closing.done():  # a request every fifth of the timeout keeps it open
                busy.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                await read_responses(busy_reader)
                await asyncio.sleep(SHORT / 5)
            assert await closing == b""
            assert SHORT * 0.8 <= time.monotonic() - started < WAIT
            busy.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            (message,), _ = await read_responses(busy_reader)
            assert message["body"] == b"ok"

    run_on(loop_kind, main())


def test_bytes_that_start_no_request_do_not_keep_a_connection_open(loop_kind: str) -> None:
    """Empty lines between requests are allowed, but they are not a request: the idle
    timeout runs from the end of the last exchange (Envoy's), whatever trickles in."""
    limits = ProxyLimits(idle_timeout=SHORT)

    async def main() -> None:
        async with wire(ok, limits=limits) as w:
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            await read_responses(reader)
            started = time.monotonic()
            closing = asyncio.ensure_future(closed_within(reader))
            with contextlib.suppress(ConnectionError):
                while not closing.done() and time.monotonic() - started < WAIT:
                    writer.write(b"\r\n")
                    await asyncio.sleep(SHORT / 10)
            assert await closing == b""
            assert SHORT * 0.8 <= time.monotonic() - started < WAIT

    run_on(loop_kind, main())


def test_a_stalled_request_or_upstream_meets_the_stream_idle_timeout(loop_kind: str) -> None:
    """The client stops sending its body: 408; the upstream never answers: 504."""
    limits = ProxyLimits(stream_idle_timeout=SHORT)

    async def main() -> None:
        async with wire(lambda request, i: b"" if request.url == b"/mute" else OK,
                        limits=limits) as w:
            reader, writer = await w.connect()
            writer.write(b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 10\r\n\r\nabc")
            raw = await closed_within(reader)
            assert raw.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), raw
            assert raw.endswith(b"stream timeout")
            reader, writer = await w.connect()
            writer.write(b"GET /mute HTTP/1.1\r\nHost: reviews\r\n\r\n")
            (message,), raw = await read_responses(reader)
            assert raw.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n"), raw
            assert message["body"] == b"stream timeout"
            assert w.stats.http_totals()["responses_by_flags"] == {"SI": 2}

    run_on(loop_kind, main())


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def test_an_idle_tcp_tunnel_is_closed_and_a_busy_one_is_not(loop_kind: str) -> None:
    limits = ProxyLimits(tcp_idle_timeout=SHORT)

    async def main() -> None:
        async with wire(ok, protocol="tcp", limits=limits) as w:
            await w.replace_upstream(echo)
            busy_reader, busy = await w.connect()
            idle_reader, idle = await w.connect()
            for writer, reader in ((busy, busy_reader), (idle, idle_reader)):
                writer.write(b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"ping"
            started = time.monotonic()
            closing = asyncio.ensure_future(closed_within(idle_reader))
            while not closing.done():
                busy.write(b"ping")
                assert await asyncio.wait_for(busy_reader.readexactly(4), WAIT) == b"ping"
                await asyncio.sleep(SHORT / 5)
            assert await closing == b""
            assert SHORT * 0.8 <= time.monotonic() - started < WAIT
            assert w.stats.totals()[OUTBOUND]["errors_by_kind"]["tcp_idle_timeout"] == 1

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- inbound


@dataclass
class Inbound:
    port: int
    stats: ProxyStats
    forwarder: InboundForwarder
    app: RawUpstream
    http: HttpPath

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def inbound(protocol: str | None = "http", policies: tuple[Policy, ...] = (),
                  limits: ProxyLimits = ProxyLimits(),  # noqa: B008 (frozen)
                  app: Any = None) -> AsyncIterator[Inbound]:
    """The inbound side of the sidecar of "reviews", in front of ``app`` (a RawUpstream
    answering OK unless given) on APP; plaintext is let in (the pilot runs no CA)."""
    upstream = RawUpstream(APP, app or ok)
    app_port = await upstream.start()
    stats = ProxyStats()
    switch = RouterSwitch()
    inbound_http = HttpPath(stats, limits=limits, switch=switch, direction=INBOUND)
    forwarder = InboundForwarder(stats, switch, tls=None, ca_offered=lambda: False,
                                 resolver=lambda sock: (APP, app_port), limits=limits)
    http = HttpPath(stats, switch=switch)
    store = ConfigStore([routing_applier(switch, http, random.Random(1),
                                         inbound_http=inbound_http)])
    identity = ProxyIdentity(node="shop-reviews-netns-1", project="shop",
                             compose_service="reviews", service="reviews", version="v1")
    settings = {
        "mtls_mode": "PERMISSIVE",
        "policies": {"reviews": policies} if policies else {},
        "protocols": {"reviews": {"default": protocol, "ports": {}}},
    }
    answer = store.offer(encode_snapshot(Snapshot(version="1", identity=identity,
                                                  settings=settings)))
    assert answer.ok, answer.reason
    listener = await asyncio.get_running_loop().create_server(forwarder, "127.0.0.1", 0)
    try:
        yield Inbound(listener.sockets[0].getsockname()[1], stats, forwarder, upstream,
                      inbound_http)
    finally:
        listener.close()
        forwarder.abort_all()
        inbound_http.close()
        upstream.close()


async def app_connections(app: RawUpstream, settle: float = 0.3) -> int:
    await asyncio.sleep(settle)
    return len(app.raw)


def test_a_silent_connection_to_a_declared_http_port_never_reaches_the_app(
        loop_kind: str) -> None:
    limits = ProxyLimits(request_headers_timeout=1.0)

    async def main() -> None:
        async with inbound("http", limits=limits) as p:
            started = time.monotonic()
            streams = [await p.connect() for _ in range(20)]
            assert await app_connections(p.app) == 0  # past FIRST_BYTES_TIMEOUT: no tunnel
            for reader, _ in streams:
                assert await closed_within(reader) == b""
            assert 0.8 <= time.monotonic() - started < WAIT
            assert await app_connections(p.app, 0) == 0
            assert p.http.connections == set()

    run_on(loop_kind, main())


def test_a_silent_connection_to_an_undeclared_port_is_a_tunnel_with_an_idle_timeout(
        loop_kind: str) -> None:
    """Server-first protocols still work where the protocol is not declared; the tunnel is
    closed once it carried nothing for tcp_idle_timeout."""
    limits = ProxyLimits(tcp_idle_timeout=SHORT)

    async def main() -> None:
        async with inbound(None, limits=limits) as p:
            reader, writer = await p.connect()  # kept: a dropped writer closes
            for _ in range(500):
                if p.app.raw:
                    break
                await asyncio.sleep(0.01)
            assert len(p.app.raw) == 1  # the app got the connection (it could speak first)
            assert await closed_within(reader) == b""
            assert p.stats.totals()[INBOUND]["errors_by_kind"]["tcp_idle_timeout"] == 1

    run_on(loop_kind, main())


def test_one_source_may_hold_so_many_connections_and_no_more(loop_kind: str) -> None:
    limits = ProxyLimits(max_connections_per_source=3)

    async def main() -> None:
        async with inbound("http", limits=limits) as p:
            held = [await p.connect() for _ in range(3)]
            reader, writer = await p.connect()
            assert await closed_within(reader) == b""  # closed as it is accepted
            assert p.stats.totals()[INBOUND]["errors_by_kind"]["source_limit"] == 1
            for r, w in held:  # the three held still work
                w.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                (message,), _ = await read_responses(r)
                assert message["body"] == b"ok"
            held[0][1].close()
            await closed_within(held[0][0])
            await asyncio.sleep(0.2)
            reader, writer = await p.connect()  # a place came free
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            (message,), _ = await read_responses(reader)
            assert message["body"] == b"ok"
            assert p.stats.totals()[INBOUND]["errors_by_kind"]["source_limit"] == 1
            for _, w in held[1:] + [(reader, writer)]:
                w.close()

    run_on(loop_kind, main())


DENY_ADMIN = (Policy(name="no-admin", action="DENY", operations=(Operation(paths=("/admin/*",)),)),)
ALLOW_PUBLIC = (Policy(name="public", operations=(Operation(paths=("/public/*",)),)),)


async def one(p: Inbound, target: bytes) -> tuple[int, bytes | None]:
    """The status of ``GET target`` and the request target the app saw (None: not asked)."""
    before = len(p.app.requests)
    reader, writer = await p.connect()
    try:
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: reviews\r\n\r\n")
        (message,), raw = await read_responses(reader)
        status = int(raw.split(b" ", 2)[1])
        seen = p.app.requests[before].url if len(p.app.requests) > before else None
        return status, seen
    finally:
        writer.close()


@pytest.mark.parametrize(("policies", "target", "status", "seen"), [
    (DENY_ADMIN, b"/admin/x", 403, None),
    (DENY_ADMIN, b"/admin%2Fsecret", 400, None),
    (DENY_ADMIN, b"/admin/..\\x", 400, None),
    (DENY_ADMIN, b"/public/../admin/x", 403, None),
    (DENY_ADMIN, b"/public/%2e%2e/admin/x", 403, None),
    (DENY_ADMIN, b"//admin//x", 403, None),
    (DENY_ADMIN, b"/a/./b/../c?next=/admin/../x", 200, b"/a/c?next=/admin/../x"),
    (DENY_ADMIN, b"http://reviews/x/../y?q=1", 200, b"/y?q=1"),
    (DENY_ADMIN, b"/admin#x", 400, None),
    (DENY_ADMIN, b"/admin%00/x", 400, None),
    (ALLOW_PUBLIC, b"/public/..%2Fadmin", 400, None),
    (ALLOW_PUBLIC, b"/admin/..\\public/x", 400, None),
    (ALLOW_PUBLIC, b"/public/../admin", 403, None),
    (ALLOW_PUBLIC, b"/public/./%61", 200, b"/public/a"),
    (ALLOW_PUBLIC, b"/public/x", 200, b"/public/x"),
])
def test_the_app_receives_the_path_the_policy_checked(
        loop_kind: str, policies: tuple[Policy, ...], target: bytes, status: int,
        seen: bytes | None) -> None:
    async def main() -> None:
        async with inbound("http", policies) as p:
            assert await one(p, target) == (status, seen)

    run_on(loop_kind, main())


def test_without_path_policies_the_request_line_passes_untouched(loop_kind: str) -> None:
    only_get = (Policy(name="get", operations=(Operation(methods=frozenset({"GET"})),)),)

    async def main() -> None:
        async with inbound("http", only_get) as p:
            assert await one(p, b"/a/../b%2Fc") == (200, b"/a/../b%2Fc")

    run_on(loop_kind, main())


def test_keep_unchanged_sends_escaped_slashes_encoded(loop_kind: str) -> None:
    limits = ProxyLimits(path_with_escaped_slashes_action=KEEP_UNCHANGED)

    async def main() -> None:
        async with inbound("http", DENY_ADMIN, limits=limits) as p:
            assert await one(p, b"/admin%2fsecret") == (200, b"/admin%2Fsecret")
            assert await one(p, b"/x/..\\admin") == (200, b"/x/..%5Cadmin")
            assert await one(p, b"/x/../admin/y") == (403, None)

    run_on(loop_kind, main())


def test_inbound_framing_and_head_limits_answer_and_close(loop_kind: str) -> None:
    async def main() -> None:
        async with inbound("http") as p:
            for attack, status in (
                    (b"POST / HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: xchunked\r\n\r\nx", 400),
                    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431)):
                reader, writer = await p.connect()
                writer.write(attack)
                raw = await closed_within(reader)
                assert raw.startswith(b"HTTP/1.1 %d " % status), raw[:100]
            assert p.app.requests == []
            assert p.stats.http_inbound_totals()["responses_by_code"] == {"400": 1, "431": 1}

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- memory


def rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_a_100_mb_header_is_431_and_never_buffered() -> None:
    """The proxy in its own process (uvloop, as in a sidecar): its peak RSS while a client
    streams a 100 MB header stays within a few MiB of its RSS before."""
    proc = subprocess.Popen([PYTHON, "-m", "tests.proxy.hostile_proxy"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as warm:
            warm.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")  # every code path loaded
            assert warm.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.2)
        with open(f"/proc/{proc.pid}/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM from now on: the peak during the attack
        before = rss_kib(proc.pid, "VmRSS")
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as attacker:
            sent = [0]

            def send() -> None:
                chunk = b"a" * (1024 * 1024)
                try:
                    attacker.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: ")
                    while sent[0] < 100 * 1024 * 1024:
                        attacker.sendall(chunk)
                        sent[0] += len(chunk)
                except OSError:
                    pass

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            answer = b""
            with contextlib.suppress(OSError):
                while data := attacker.recv(65536):
                    answer += data
            sender.join(WAIT)
        peak = rss_kib(proc.pid, "VmHWM")
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer
        grew = peak - before
        print(f"\nRSS before {before} KiB, peak during the attack {peak} KiB "
              f"(+{grew} KiB); the client sent {sent[0] / 2 ** 20:.0f} MiB")
        assert grew < 4 * 1024, f"the proxy grew by {grew} KiB"
    finally:
        proc.kill()
        proc.wait(5)
