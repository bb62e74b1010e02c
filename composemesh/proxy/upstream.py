"""Pooled keep-alive HTTP/1.1 connections to upstream endpoints, one asyncio Protocol each.

A connection answers httpcore's four questions (``is_available``, ``has_expired``,
``is_idle``, ``is_closed``); the pool keeps, per (address, port), a LIFO of idle ones.
A connection parses its responses itself (httptools) and hands the pieces to its ``sink``,
the exchange that sent the request; it goes back to the pool only after a complete response.
A response head is counted as it arrives, like a request's (``max_response_headers_kb``,
``max_headers_count``): past either, or if what comes is not HTTP, the connection is dropped
with ``protocol_error`` set, and the exchange answers 502. A chunked response's trailers are
kept (``trailers``) for the sink to pass on after the last chunk; a response that ends its
connection (``Connection: close``, or HTTP/1.0 without keep-alive) says so (``closing``), so
that the exchange closes the app's connection after it too, as Envoy does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from composemesh.model.east_west import sni
from composemesh.model.limits import ProxyLimits
from composemesh.proxy.buffers import WRITE_HIGH_WATER, WRITE_LOW_WATER
from composemesh.proxy.connector import connect_peer
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.selection import Endpoint

MAX_IDLE_PER_HOST = 64
IDLE_EXPIRY = 60.0  # seconds an idle connection is kept
SWEEP_INTERVAL = 10.0  # how often expired idle connections are closed

Key = tuple[str, int] | tuple[str, int, str]  # (address, port), or with an east-west SNI


def upstream_key(endpoint: Endpoint, port: int) -> Key:
    """Where a request to ``endpoint`` for the app's ``port`` goes, as the pool keys it: the
    endpoint at that port, or an instance on another host at its gateway with the SNI that
    names it there (connections to one gateway for two targets are not shared)."""
    if not endpoint.remote:
        return (endpoint.address, port)
    if endpoint.sni and not endpoint.plaintext:
        return (endpoint.address, endpoint.port or port, sni(port, endpoint.sni))
    return (endpoint.address, endpoint.port or port)

# How a response's body ends, decided from its head.
NO_BODY = 0  # HEAD, 1xx, 204, 304
LENGTH = 1  # Content-Length
CHUNKED = 2  # Transfer-Encoding: chunked (re-encoded as it passes)
UNTIL_CLOSE = 3  # neither: the body runs until the upstream closes

# Response headers that are the connection's own and do not pass on.
_RESPONSE_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
_SWITCHING_HOP = frozenset({b"keep-alive", b"proxy-connection"})
_STATUS_LINE = {"1.1": b"HTTP/1.1 %d %s\r\n", "1.0": b"HTTP/1.0 %d %s\r\n"}

# Where a response stands on its connection.
_IDLE, _HEAD, _BODY = 0, 1, 2


class ResponseSink(Protocol):
    """What a connection tells the exchange that sent the current request."""

    def response_head(self, conn: UpstreamConnection, status: int, head: bytes,
                      framing: int) -> None:
        """A final (or 1xx) response head: the status line and the end-to-end headers,
        without the blank line that ends them."""

    def response_body(self, data: bytes) -> None:
        """A piece of the body, de-chunked."""

    def flush(self) -> None:
        """What came in one read is handled: send on what was held to send at once."""

    def response_done(self, conn: UpstreamConnection, reusable: bool) -> None:
        """The whole response came; ``reusable``: the connection may carry another request.

        The sink hands the connection back (``pool.release``) or closes it."""

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The connection ended before the response did (``conn.got_bytes`` says whether
        any of the response had come)."""

    def upstream_paused(self, paused: bool) -> None:
        """The connection's write buffer filled up (True) or drained (False)."""

    def upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream switched protocols (101); ``rest``: what it sent after the head.

        The connection is no longer HTTP: the sink takes its transport over."""


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to an endpoint; carries one request at a time."""

    __slots__ = ("pool", "key", "transport", "parser", "sink", "requests", "idle_since",
                 "closed", "eof", "got_bytes", "head_only", "discarding", "reading",
                 "protocol_error", "head_left", "closing", "trailers", "_state", "_status",
                 "_reason", "_pairs", "_framing")

    transport: asyncio.Transport

    def __init__(self, pool: UpstreamPool, key: Key) -> None:
        self.pool = pool
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.requests = 0  # requests sent on it so far
        self.idle_since = 0.0
        self.closed = False
        self.eof = False
        self.got_bytes = False  # any of the current response has come
        self.head_only = False  # the current request is HEAD: the response has no body
        self.discarding = False  # the sink gave the response up: read it to the end, drop it
        self.reading = True
        self.protocol_error = False  # dropped for what it sent (not HTTP, a head too large)
        self.head_left = pool.head_max  # bytes the response head may still take
        self.closing = False  # the current response ends the connection (Connection: close)
        self.trailers = b""  # the current chunked response's trailer fields, as sent
        self._state = _IDLE
        self._status = 0
        self._reason = b""
        self._pairs: list[tuple[bytes, bytes]] = []
        self._framing = NO_BODY

    # ---- httpcore's four questions

    def is_available(self) -> bool:
        """Can take a request now: open, and none in flight."""
        return not self.closed and not self.eof and self.sink is None and not self.discarding

    def has_expired(self, now: float) -> bool:
        """Should be closed rather than used: closed by the upstream, or idle too long."""
        return (self.closed or self.eof
                or (self.is_idle() and now - self.idle_since > self.pool.idle_expiry))

    def is_idle(self) -> bool:
        """No request in flight, and no response being read."""
        return self.sink is None and not self.discarding

    def is_closed(self) -> bool:
        return self.closed

    # ---- used by the exchange

    @property
    def reused(self) -> bool:
        """Whether the current request is not the first on this connection."""
        return self.requests > 1

    def attach(self, sink: ResponseSink, head_only: bool) -> None:
        """``sink`` sends a request on this connection now and receives its response."""
        self.sink = sink
        self.requests += 1
        self.got_bytes = False
        self.head_only = head_only
        self.closing = False
        self.trailers = b""
        self._state = _HEAD
        self._pairs = []
        self.head_left = self.pool.head_max
        if not self.reading:
            self.resume()

    def detach(self) -> None:
        """The sink no longer wants the response: read it to its end, then pool or close."""
        self.sink = None
        self.discarding = True
        if not self.reading:
            self.resume()

    def pause(self) -> None:
        if self.reading and not self.closed:
            self.reading = False
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            self.transport.resume_reading()

    def close(self) -> None:
        self.sink = None
        self.discarding = False
        if not self.closed:
            self.transport.close()

    def abort(self) -> None:
        self.sink = None
        self.discarding = False
        if not self.closed:
            self.transport.abort()

    # ---- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.idle_since = self.pool.clock()
        self.pool.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._state == _IDLE:  # nothing asked for: not HTTP we can follow
            self.abort()
            return
        self.got_bytes = True
        try:
            if self._state != _HEAD:
                self.parser.feed_data(data)
            elif len(data) <= self.head_left:  # all of it may be head: counted, then parsed
                self.head_left -= len(data)
                self.parser.feed_data(data)
            else:
                self._feed_bounded(data)
            if self.sink is not None:
                self.sink.flush()
        except httptools.HttpParserUpgrade as exc:
            sink = self.sink
            if sink is None or self._status != 101:  # not asked for: not ours to follow
                self._broken()
                return
            self.sink = None
            self._state = _IDLE
            sink.upgraded(self, data[exc.args[0]:])
        except (httptools.HttpParserError, HeadTooLarge):
            self._broken()

    def _feed_bounded(self, data: bytes | memoryview) -> None:
        """More than the head may still take has come: its share first. A head that has not
        ended within it is not read further (HeadTooLarge); else the rest is parsed (a 1xx
        head may be followed by the final one, counted from there)."""
        view = memoryview(data)
        room = self.head_left
        self.head_left = -1  # on_headers_complete sets it again if a head ends in the share
        if room > 0:
            self.parser.feed_data(view[:room])
        if self.head_left < 0:
            raise HeadTooLarge()
        rest = view[room:]
        try:
            if self._state != _HEAD or len(rest) <= self.head_left:
                if self._state == _HEAD:
                    self.head_left -= len(rest)
                self.parser.feed_data(rest)
            else:
                self._feed_bounded(rest)
        except httptools.HttpParserUpgrade as exc:
            raise httptools.HttpParserUpgrade(room + exc.args[0]) from None

    def eof_received(self) -> bool:
        self.eof = True
        return False  # close; connection_lost tells the sink

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        sink = self.sink
        if self._state == _BODY and self._framing == UNTIL_CLOSE and exc is None:
            self._done(False)  # the close was the end of the body
            return
        self.discarding = False
        if sink is not None:
            self.sink = None
            sink.upstream_lost(self)

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.upstream_paused(False)

    # ---- httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        pairs = self._pairs
        pairs.append((name, value))
        if len(pairs) > self.pool.headers_max:
            raise HeadTooLarge()
        if self._state == _BODY:  # after a chunked body: a trailer field
            self.trailers += b"%s: %s\r\n" % (name, value)
            if len(self.trailers) > self.pool.head_max:
                raise HeadTooLarge()

    def on_headers_complete(self) -> None:
        self.head_left = self.pool.head_max  # a 1xx head: the final one has its own budget
        parser = self.parser
        status = self._status = parser.get_status_code()
        line = _STATUS_LINE.get(parser.get_http_version(), b"HTTP/1.1 %d %s\r\n")
        parts = [line % (status, self._reason)]
        has_length = chunked = False
        drop: frozenset[bytes] = _RESPONSE_HOP
        if status == 101:  # switching protocols: Connection and Upgrade are the answer
            drop = _SWITCHING_HOP
        else:
            for name, value in self._pairs:
                if name.lower() == b"connection":
                    drop = _RESPONSE_HOP | _connection_tokens(value)
                    break
        for name, value in self._pairs:
            lname = name.lower()
            if lname in drop:
                continue
            if lname == b"content-length":
                has_length = True
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            parts += (name, b": ", value, b"\r\n")
        self._pairs = []
        if status < 200 or status in (204, 304) or self.head_only:
            framing = NO_BODY
        elif chunked:
            framing = CHUNKED
        elif has_length:
            framing = LENGTH
        else:
            framing = UNTIL_CLOSE
        self._framing = framing
        if status >= 200:
            self._state = _BODY
            self.closing = not parser.should_keep_alive()
        sink = self.sink
        if sink is not None:
            sink.response_head(self, status, b"".join(parts), framing)
        if self.head_only and status >= 200 and self._state == _BODY:
            # httptools cannot be told that a HEAD response has no body: end it here and
            # give the next response a fresh parser.
            self.parser = httptools.HttpResponseParser(self)
            self._done(parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None and self._state == _BODY:
            sink.response_body(body)

    def on_message_complete(self) -> None:
        if self._state != _BODY:  # a 1xx (the final response follows) or a HEAD ended early
            if self._state == _HEAD:
                self._pairs = []
            return
        self._done(self.parser.should_keep_alive())

    def _done(self, reusable: bool) -> None:
        self._state = _IDLE
        reusable = reusable and not self.eof and not self.closed
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.response_done(self, reusable)
        elif self.discarding:
            self.discarding = False
            if reusable:
                self.pool.release(self)
            else:
                self.close()

    def _broken(self) -> None:
        """The upstream sent what is not HTTP/1.x, or a head past the limits: drop the
        connection (the sink hears of it, ``protocol_error`` set)."""
        self.protocol_error = True
        if not self.closed:
            self.transport.abort()


class HeadTooLarge(Exception):
    """A response head past ``max_response_headers_kb`` or ``max_headers_count``."""


def _connection_tokens(value: bytes) -> set[bytes]:
    """The header names a Connection header lists (besides close and keep-alive)."""
    return {t.strip().lower() for t in value.split(b",")} - {b"close", b"keep-alive", b""}


class UpstreamPool:
    """Idle keep-alive connections per (address, port), most recently used first."""

    def __init__(self, *, max_idle_per_host: int = MAX_IDLE_PER_HOST,
                 idle_expiry: float = IDLE_EXPIRY,
                 clock: Callable[[], float] = time.monotonic,
                 tls: MeshTls | None = None,
                 limits: ProxyLimits = ProxyLimits()) -> None:  # noqa: B008 (frozen)
        self.tls = tls  # mTLS to endpoints that name a peer, once the proxy has a certificate
        self.head_max = limits.max_response_head  # a response head's bytes, at most
        self.headers_max = limits.max_headers_count  # ... and its header fields
        self.max_idle_per_host = max_idle_per_host
        self.idle_expiry = idle_expiry
        self.clock = clock
        self.idle: dict[Key, list[UpstreamConnection]] = {}
        self.connections: set[UpstreamConnection] = set()  # every open one, idle or busy
        self.opened = 0  # connections opened, ever
        self.tls_opened = 0  # of which mutual TLS
        self.reused = 0  # requests that found an idle connection
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def acquire(self, key: Key) -> UpstreamConnection | None:
        """The most recently used idle connection to ``key`` still good; None if there is none."""
        stack = self.idle.get(key)
        if not stack:
            return None
        now = self.clock()
        while stack:
            conn = stack.pop()
            if conn.has_expired(now):
                conn.close()
                continue
            self.reused += 1
            return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Take ``conn`` back after a complete response; closes it if not wanted."""
        if self._closed or not conn.is_available():
            conn.close()
            return
        stack = self.idle.get(conn.key)
        if stack is None:
            stack = self.idle[conn.key] = []
        if len(stack) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = self.clock()
        if not conn.reading:
            conn.resume()  # an idle connection reads, so that a close by the upstream shows
        stack.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        """``conn`` is closed: drop it wherever it is kept."""
        self.connections.discard(conn)
        stack = self.idle.get(conn.key)
        if stack and conn in stack:
            stack.remove(conn)

    def connect(self, key: Key, timeout: float,
                peer: str | None = None) -> asyncio.Task[UpstreamConnection]:
        """A task opening a new connection to ``key`` (OSError or TimeoutError if it cannot).

        With ``peer`` (a SPIFFE ID) and a certificate in hand, the connection is mutual TLS
        and the endpoint must prove to be ``peer`` (PeerIdentityError otherwise)."""
        return asyncio.get_running_loop().create_task(self._open(key, timeout, peer))

    async def _open(self, key: Key, timeout: float, peer: str | None) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        tls = self.tls
        context = tls.client if tls is not None and peer is not None else None
        if context is None or peer is None:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, key), key[0], key[1])
            self.opened += 1
            return conn
        async with asyncio.timeout(timeout):
            link = await connect_peer(context, key[0], key[1], peer,
                                      key[2] if len(key) > 2 else None)
        conn = UpstreamConnection(self, key)
        link.attach(conn)
        self.opened += 1
        self.tls_opened += 1
        return conn

    def idle_count(self) -> int:
        return sum(len(stack) for stack in self.idle.values())

    def close(self) -> None:
        """Close every connection, idle or busy (shutdown)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            conn.abort()
        self.idle.clear()

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.clock()
        for key, stack in list(self.idle.items()):
            while stack and stack[0].has_expired(now):  # the oldest are at the bottom
                stack.pop(0).close()
            if not stack:
                del self.idle[key]
        if self.idle and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_INTERVAL, self._sweep)
