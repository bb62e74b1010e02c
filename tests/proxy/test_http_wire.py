"""The outbound HTTP path byte for byte: framing both ways, hop-by-hop headers, HTTP/1.0,
pipelining, HEAD, 100-continue, upgrades, stale pooled connections, and protocol detection.

The app side is a raw socket and the upstream a raw asyncio server (``RawUpstream``) so that
the exact bytes each sees can be checked. Same loopback set-up as test_http.py (the
original destination is injected; no iptables).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import httptools
from aiohttp import web

from composemesh.model.limits import ProxyLimits
from composemesh.proxy.http import HttpPath
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.router import RouterSwitch
from composemesh.proxy.server import routing_applier
from composemesh.proxy.stats import OUTBOUND, ProxyStats
from composemesh.proxy.tcp import Forwarder

from .conftest import run_on
from .test_http import V1, V2, route, routing, settings, snapshot

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Request:
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    version: str


class _Collector:
    """httptools callbacks that collect whole messages (requests or responses)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, object]] = []
        self._current: dict[str, object] = {}

    def on_message_begin(self) -> None:
        self._current = {"url": b"", "headers": [], "body": b"", "reason": b""}

    def on_url(self, url: bytes) -> None:
        self._current["url"] += url  # type: ignore[operator]

    def on_status(self, reason: bytes) -> None:
        self._current["reason"] = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._current["headers"].append((name, value))  # type: ignore[attr-defined]

    def on_body(self, body: bytes) -> None:
        self._current["body"] += body  # type: ignore[operator]

    def on_message_complete(self) -> None:
        self.messages.append(self._current)


Respond = Callable[[Request, int], "bytes | None"]  # (request, its index on the connection)


class RawUpstream:
    """An HTTP server written on a bare asyncio stream: records every byte it is sent."""

    def __init__(self, address: str, respond: Respond) -> None:
        self.address = address
        self.respond = respond
        self.raw: list[bytearray] = []  # per connection, everything received
        self.requests: list[Request] = []
        self.close_after = False  # close each connection after its first answer
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = bytearray()
        self.raw.append(raw)
        collector = _Collector()
        parser = httptools.HttpRequestParser(collector)
        answered = 0
        try:
            while data := await reader.read(65536):
                raw += data
                parser.feed_data(data)
                while answered < len(collector.messages):
                    m = collector.messages[answered]
                    request = Request(parser.get_method(), m["url"], m["headers"],  # type: ignore[arg-type]
                                      m["body"], parser.get_http_version())  # type: ignore[arg-type]
                    self.requests.append(request)
                    answer = self.respond(request, answered)
                    answered += 1
                    if answer is None:
                        writer.close()
                        return
                    writer.write(answer)
                    await writer.drain()
                    if self.close_after:
                        writer.close()
                        return
        except (ConnectionError, httptools.HttpParserError):
            pass
        finally:
            writer.close()

    async def start(self, port: int = 0) -> int:
        self.server = await asyncio.start_server(self.handle, self.address, port,
                                                 reuse_address=True)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass
class Wire:
    port: int
    service_port: int
    stats: ProxyStats
    http: HttpPath
    upstream: RawUpstream
    extra: list[asyncio.Server] = field(default_factory=list)
    clients: list[asyncio.StreamWriter] = field(default_factory=list)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An app connection to the proxy; ``wire`` closes it even when the test fails."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.clients.append(writer)
        return reader, writer

    async def replace_upstream(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                       Awaitable[None]]) -> asyncio.Server:
        """Serve ``handler`` on the endpoint instead of the RawUpstream; ``wire`` closes it."""
        self.upstream.close()
        await asyncio.sleep(0.01)
        server = await asyncio.start_server(handler, V1, self.service_port, reuse_address=True)
        self.extra.append(server)
        return server


@contextlib.asynccontextmanager
async def wire(respond: Respond, protocol: str | None = "http",
               resolver: Callable[[object], tuple[str, int]] | None = None,
               limits: ProxyLimits = ProxyLimits()  # noqa: B008 (frozen)
               ) -> AsyncIterator[Wire]:
    """A proxy in front of a RawUpstream on V1, the one endpoint of "reviews"."""
    upstream = RawUpstream(V1, respond)
    port = await upstream.start()
    stats = ProxyStats()
    switch = RouterSwitch()
    http = HttpPath(stats, limits=limits, switch=switch)
    outbound = Forwarder(OUTBOUND, stats, switch.choose,
                         resolver=resolver or (lambda sock: (V1, port)), limits=limits)
    store = ConfigStore([routing_applier(switch, http, random.Random(1))])
    answer = store.offer(snapshot("s1", settings(routing(route(("v1", 100))), [("v1", V1)],
                                                 protocol)))
    assert answer.ok, answer.reason
    listener = await asyncio.get_running_loop().create_server(outbound, "127.0.0.1", 0)
    w = Wire(listener.sockets[0].getsockname()[1], port, stats, http, upstream)
    try:
        yield w
    finally:
        for client in w.clients:
            client.close()
        for server in w.extra:
            server.close()
        listener.close()
        outbound.abort_all()
        http.close()
        upstream.close()


async def read_responses(reader: asyncio.StreamReader, n: int = 1,
                         head_only: bool = False) -> tuple[list[dict[str, object]], bytes]:
    """``n`` whole responses (and the raw bytes they came in); to EOF for a close-delimited one."""
    collector = _Collector()
    parser = httptools.HttpResponseParser(collector)
    raw = b""
    while len(collector.messages) < n:
        data = await asyncio.wait_for(reader.read(65536), 5)
        raw += data
        if head_only and b"\r\n\r\n" in raw:
            return [], raw
        if not data:
            collector.on_message_complete()  # the close ended the body
            break
        parser.feed_data(data)
    return collector.messages, raw


def header(message: dict[str, object], name: bytes) -> bytes | None:
    for key, value in message["headers"]:  # type: ignore[attr-defined]
        if key.lower() == name:
            return bytes(value)
    return None


# --------------------------------------------------------------------------- byte for byte


def test_request_and_response_pass_byte_for_byte_but_for_hop_by_hop(loop_kind: str) -> None:
    response = (b"HTTP/1.1 201 Made It\r\nX-Thing:  a  b\r\nConnection: keep-alive, X-Hop\r\n"
                b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\ncontent-length: 2\r\n\r\nok")

    async def main() -> None:
        async with wire(lambda request, i: response) as w:
            reader, writer = await w.connect()
            writer.write(b"GET /a?b=1 HTTP/1.1\r\nHost: reviews:9080\r\n"
                         b"X-Mixed-Case: Value  with  spaces\r\nConnection: keep-alive, X-Trace\r\n"
                         b"X-Trace: hop\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                         b"Accept: */*\r\n\r\n")
            _, raw = await read_responses(reader)
            assert raw == (b"HTTP/1.1 201 Made It\r\nX-Thing: a  b\r\n"
                           b"content-length: 2\r\n\r\nok")
            assert bytes(w.upstream.raw[0]) == (
                b"GET /a?b=1 HTTP/1.1\r\nHost: reviews:9080\r\n"
                b"X-Mixed-Case: Value  with  spaces\r\nAccept: */*\r\n\r\n")
            writer.close()

    run_on(loop_kind, main())


def test_chunked_bodies_both_ways(loop_kind: str) -> None:
    def respond(request: Request, i: int) -> bytes:
        assert request.body == b"hello, chunked world"
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nfirst\r\n7\r\n, then \r\n4\r\nmore\r\n0\r\n\r\n")

    async def main() -> None:
        async with wire(respond) as w:
            reader, writer = await w.connect()
            writer.write(b"POST /up HTTP/1.1\r\nHost: reviews\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"6\r\nhello,\r\n")
            await asyncio.sleep(0.05)
            writer.write(b"e\r\n chunked world\r\n0\r\n\r\n")
            (message,), raw = await read_responses(reader)
            assert message["body"] == b"first, then more"
            assert header(message, b"transfer-encoding") == b"chunked"
            assert raw.endswith(b"0\r\n\r\n")
            upstream_saw = bytes(w.upstream.raw[0])
            assert b"Transfer-Encoding: chunked\r\n" in upstream_saw
            assert upstream_saw.endswith(b"\r\n0\r\n\r\n")
            writer.close()

    run_on(loop_kind, main())


def test_large_bodies_stream_through_both_ways(loop_kind: str) -> None:
    """3 MiB up (more than is kept for retries: streamed) and 5 MiB down, chunked and not."""
    big = bytes(range(256)) * (5 * 4096)

    async def echo_length(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        response = web.StreamResponse(headers={"x-body-length": str(len(body))})
        if request.query.get("chunked"):
            response.enable_chunked_encoding()
        else:
            response.content_length = len(big)
        await response.prepare(request)
        for i in range(0, len(big), 65536):
            await response.write(big[i:i + 65536])
        await response.write_eof()
        return response

    async def main() -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", echo_length)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        try:
            async with wire(lambda request, i: OK) as w:
                w.upstream.close()
                await asyncio.sleep(0.01)
                await web.TCPSite(runner, V1, w.service_port, reuse_address=True).start()
                async def upload() -> AsyncIterator[bytes]:
                    for i in range(0, 3 * 1024 * 1024, 65536):
                        yield big[i:i + 65536]
                async with aiohttp.ClientSession() as session:
                    for query in ("", "?chunked=1"):
                        async with session.post(f"http://127.0.0.1:{w.port}/{query}",
                                                data=big[:3 * 1024 * 1024]) as response:
                            assert response.headers["x-body-length"] == str(3 * 1024 * 1024)
                            assert await response.read() == big
                        async with session.post(f"http://127.0.0.1:{w.port}/{query}",
                                                data=upload()) as response:  # chunked upload
                            assert response.headers["x-body-length"] == str(3 * 1024 * 1024)
                            assert await response.read() == big
        finally:
            await runner.cleanup()

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- connections


def test_http_1_0_client_gets_its_answer_and_a_close(loop_kind: str) -> None:
    async def main() -> None:
        async with wire(lambda request, i: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok") as w:
            reader, writer = await w.connect()
            writer.write(b"GET /old HTTP/1.0\r\nHost: reviews\r\n\r\n")
            (message,), raw = await read_responses(reader)
            assert message["body"] == b"ok"
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after it
            assert w.upstream.requests[0].version == "1.0"
            assert bytes(w.upstream.raw[0]).startswith(b"GET /old HTTP/1.0\r\n")
            writer.close()

    run_on(loop_kind, main())


def test_connection_close_from_the_app_closes_it_not_the_pooled_one(loop_kind: str) -> None:
    async def main() -> None:
        async with wire(lambda request, i: OK) as w:
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
            (message,), raw = await read_responses(reader)
            assert header(message, b"connection") == b"close"
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert b"Connection" not in bytes(w.upstream.raw[0])
            assert w.http.pool.idle_count() == 1
            writer.close()

    run_on(loop_kind, main())


def test_an_app_that_half_closes_after_its_request_gets_the_answer(loop_kind: str) -> None:
    async def main() -> None:
        async with wire(lambda request, i: OK) as w:
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            writer.write_eof()
            (message,), _ = await read_responses(reader)
            assert message["body"] == b"ok"
            assert header(message, b"connection") == b"close"
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    run_on(loop_kind, main())


def test_pipelined_requests_are_answered_in_order(loop_kind: str) -> None:
    def respond(request: Request, i: int) -> bytes:
        body = request.url
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def main() -> None:
        async with wire(respond) as w:
            reader, writer = await w.connect()
            writer.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: reviews\r\n\r\n" % i
                                  for i in range(5)))
            messages, _ = await read_responses(reader, 5)
            assert [m["body"] for m in messages] == [b"/%d" % i for i in range(5)]
            writer.close()

    run_on(loop_kind, main())


def test_head_answers_have_no_body_and_the_connection_goes_on(loop_kind: str) -> None:
    def respond(request: Request, i: int) -> bytes:
        if request.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        return OK

    async def main() -> None:
        async with wire(respond) as w:
            reader, writer = await w.connect()
            for _ in range(2):
                writer.write(b"HEAD / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                _, raw = await read_responses(reader, head_only=True)
                assert raw == b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                (message,), _ = await read_responses(reader)
                assert message["body"] == b"ok"
            assert len(w.upstream.raw) == 1  # one upstream connection throughout
            writer.close()

    run_on(loop_kind, main())


def test_a_close_delimited_response_reaches_the_app_whole(loop_kind: str) -> None:
    async def main() -> None:
        async with wire(lambda request, i: (
                b"HTTP/1.1 200 OK\r\nX-Old: style\r\n\r\nall of it, until the close")) as w:
            w.upstream.close_after = True
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            (message,), raw = await read_responses(reader)
            assert message["body"] == b"all of it, until the close"
            assert header(message, b"connection") == b"close"
            writer.close()

    run_on(loop_kind, main())


def test_expect_100_continue_passes_through(loop_kind: str) -> None:
    async def main() -> None:
        heads: list[bytes] = []

        async def continuing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await reader.readexactly(5)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
            await writer.drain()
            await reader.read()
            writer.close()

        async with wire(lambda request, i: OK) as w:
            server = await w.replace_upstream(continuing)
            reader, writer = await w.connect()
            writer.write(b"PUT /up HTTP/1.1\r\nHost: reviews\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 5\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            assert b"Expect: 100-continue\r\n" in heads[0]
            writer.write(b"12345")
            (message,), _ = await read_responses(reader)
            assert message["body"] == b"12345"
            writer.close()
            server.close()

    run_on(loop_kind, main())


def test_a_stale_pooled_connection_is_replaced_for_idempotent_requests(loop_kind: str) -> None:
    """The upstream drops a kept-alive connection just as the next request is sent on it."""

    def first_only(request: Request, i: int) -> bytes | None:
        return OK if i == 0 else None  # a second request on a connection: closed unanswered

    async def main() -> None:
        async with wire(first_only) as w:
            reader, writer = await w.connect()
            for _ in range(3):
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
                (message,), _ = await read_responses(reader)
                assert message["body"] == b"ok"
            writer.write(b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 1\r\n\r\nx")
            (message,), _ = await read_responses(reader)
            assert message["body"].startswith(b"upstream connect error")  # not replayed
            assert w.stats.retries == 0
            writer.close()

    run_on(loop_kind, main())


def test_an_idle_connection_closed_by_the_upstream_leaves_the_pool(loop_kind: str) -> None:
    async def main() -> None:
        async with wire(lambda request, i: OK) as w:
            w.upstream.close_after = True  # answers, then closes: a short keep-alive timeout
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            await read_responses(reader)
            await asyncio.sleep(0.1)
            assert w.http.pool.idle_count() == 0
            assert not w.http.pool.connections
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            (message,), _ = await read_responses(reader)
            assert message["body"] == b"ok"
            assert len(w.upstream.raw) == 2
            assert w.http.pool.opened == 2
            writer.close()

    run_on(loop_kind, main())


def test_a_websocket_upgrade_becomes_a_tunnel(loop_kind: str) -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo " + msg.data)
        return ws

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/ws", ws_echo)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        try:
            async with wire(lambda request, i: OK) as w:
                w.upstream.close()
                await asyncio.sleep(0.01)
                await web.TCPSite(runner, V1, w.service_port, reuse_address=True).start()
                async with aiohttp.ClientSession() as session, \
                        session.ws_connect(f"http://127.0.0.1:{w.port}/ws") as ws:
                    for word in ("one", "two"):
                        await ws.send_str(word)
                        assert (await ws.receive(timeout=5)).data == f"echo {word}"
                for _ in range(200):  # counted once the tunnel has closed
                    if w.stats.http_totals()["requests"]:
                        break
                    await asyncio.sleep(0.01)
                assert w.stats.http_totals()["responses_by_code"] == {"101": 1}
                assert w.stats.http_totals()["responses_by_flags"] == {"-": 1}
        finally:
            await runner.cleanup()

    run_on(loop_kind, main())


def test_garbage_is_a_400_and_a_close(loop_kind: str) -> None:
    async def main() -> None:
        async with wire(lambda request, i: OK) as w:
            reader, writer = await w.connect()
            writer.write(b"GET / HTTP/1.1\r\nHost reviews\r\n\r\n")
            (message,), raw = await read_responses(reader)
            assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert w.upstream.requests == []
            writer.close()

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- which path


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_a_tcp_declared_service_is_carried_as_tcp_to_an_endpoint(loop_kind: str) -> None:
    async def main() -> None:
        async with wire(lambda request, i: OK, protocol="tcp") as w:
            server = await w.replace_upstream(echo)
            reader, writer = await w.connect()
            request = b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n"
            writer.write(request)  # HTTP bytes, but declared TCP: echoed, never parsed
            assert await asyncio.wait_for(reader.readexactly(len(request)), 5) == request
            writer.close()
            server.close()
            assert w.stats.http_totals()["requests"] == 0
            (labels,) = [labels for labels in w.stats._tcp]
            assert (labels.destination_service, labels.destination.workload) == (
                "reviews", "reviews-v1")

    run_on(loop_kind, main())


def test_a_destination_outside_the_mesh_passes_through(loop_kind: str) -> None:
    async def main() -> None:
        outside = await asyncio.start_server(echo, V2, 0)  # V2: no endpoint of any service
        address = outside.sockets[0].getsockname()[:2]
        try:
            async with wire(lambda request, i: OK, resolver=lambda sock: address) as w:
                reader, writer = await w.connect()
                request = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"
                writer.write(request)
                assert await asyncio.wait_for(reader.readexactly(len(request)), 5) == request
                writer.close()
                assert w.stats.http_totals()["requests"] == 0
                (labels,) = [labels for labels in w.stats._tcp]
                assert labels.destination_service_name == "PassthroughCluster"
        finally:
            outside.close()

    run_on(loop_kind, main())


def test_detection_http_first_bytes_take_the_http_path(loop_kind: str) -> None:
    async def main() -> None:
        async with wire(lambda request, i: OK, protocol=None) as w:
            reader, writer = await w.connect()
            writer.write(b"GE")
            await asyncio.sleep(0.02)
            writer.write(b"T / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            (message,), _ = await read_responses(reader)
            assert message["body"] == b"ok"
            assert w.stats.http_totals()["requests"] == 1
            writer.close()

    run_on(loop_kind, main())


def test_detection_server_first_and_binary_protocols_take_the_tcp_path(loop_kind: str) -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 ready\r\n")
        await echo(reader, writer)

    async def main() -> None:
        async with wire(lambda request, i: OK, protocol=None) as w:
            server = await w.replace_upstream(banner)
            loop = asyncio.get_running_loop()
            reader, writer = await w.connect()
            started = loop.time()
            assert await asyncio.wait_for(reader.readexactly(11), 5) == b"220 ready\r\n"
            assert loop.time() - started < 0.09  # the banner is the verdict: no waiting
            writer.write(b"HELO me\r\n")
            assert await asyncio.wait_for(reader.readexactly(9), 5) == b"HELO me\r\n"
            writer.close()

            reader, writer = await w.connect()
            writer.write(b"\x16\x03\x01\x02\x00")  # a TLS ClientHello's first bytes
            await asyncio.wait_for(reader.readexactly(11), 5)
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"\x16\x03\x01\x02\x00"
            writer.close()
            server.close()
            assert w.stats.http_totals()["requests"] == 0
            assert w.stats.totals()[OUTBOUND]["connections_opened"] == 2

    run_on(loop_kind, main())
