"""The outbound HTTP/1.1 path: route each of the app's requests, carry it upstream, answer it.

A captured connection that speaks HTTP becomes an ``HttpDownstream``: httptools parses its
requests; each becomes an ``Exchange`` that takes the decisions of ``proxy.selection``
(route, fault, version, endpoint), sends the request over a pooled ``UpstreamConnection``,
and streams the response back, or tries again (retries, per-try and route timeouts, outlier
ejection). Requests and responses pass byte for byte but for the hop-by-hop headers (a
chunked body's trailers pass too); only the answers the proxy makes itself (404, 503, 504,
injected faults) carry its own headers. A response that ends its upstream connection
(``Connection: close``) ends the app's connection after it. An upgrade (101) makes the
connection a tunnel; the request is counted when the tunnel ends, with the flag of the side
that broke it (``UC`` the upstream, ``DC`` the app).

A connection is held to its ``ProxyLimits`` as bytes arrive: a request head is fed to the
parser only up to ``max_request_headers_kb`` (431 past it: never buffered), the URL and the
header count are counted in the parser's callbacks (414, 431), a request whose framing breaks
after its head is answered 400 at once, and one timer per connection, re-armed lazily, holds
the header timeout (408), the keep-alive idle timeout and the stream idle timeout. Every
answer that ends a connection is followed by a FIN and a short linger that reads and drops
what the client still sends, so that the client reads the answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from functools import partial
from http import HTTPStatus
from typing import cast

import httptools

from composemesh.model.gateways import BLACK_HOLE_CLUSTER
from composemesh.model.limits import ProxyLimits
from composemesh.model.policy import request_path
from composemesh.model.routing import HttpRoute, RetryPolicy
from composemesh.proxy.buffers import WRITE_HIGH_WATER, WRITE_LOW_WATER
from composemesh.proxy.original_dst import Address
from composemesh.proxy.retries import (
    Answer,
    Next,
    Outcome,
    Respond,
    Tries,
)
from composemesh.proxy.router import (
    INBOUND_ROUTE,
    InboundRouter,
    Router,
    RouterSwitch,
    ServiceState,
    endpoint_peer,
)
from composemesh.proxy.selection import (
    Endpoint,
    draw_fault,
    pick_endpoint,
    pick_version,
    select_route,
)
from composemesh.proxy.stats import (
    BAD_REQUEST,
    CONNECT_FAILURE,
    DOWNSTREAM_CLOSED,
    FAULT_ABORT,
    FAULT_DELAY,
    INBOUND,
    MUTUAL_TLS,
    NO_FLAGS,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    NO_SECURITY,
    OUTBOUND,
    STREAM_IDLE_TIMEOUT,
    UNKNOWN,
    UPSTREAM_PROTOCOL_ERROR,
    UPSTREAM_RESET,
    PeerLabels,
    ProxyStats,
)
from composemesh.proxy.tcp import Handoff, splice
from composemesh.proxy.telemetry import CLIENT, SERVER, Observer, address_text, cluster_name
from composemesh.proxy.tracing import TraceContext
from composemesh.proxy.upstream import (
    CHUNKED,
    UNTIL_CLOSE,
    Key,
    UpstreamConnection,
    UpstreamPool,
    upstream_key,
)

UNKNOWN_PEER = PeerLabels()  # a destination not chosen yet
BODY_BUFFER_LIMIT = 1024 * 1024  # request bodies up to this are kept for retries; larger stream
LINGER = 1.0  # seconds a connection closed after an error answer still reads (Envoy's
# delayed_close_timeout): what the client sends meanwhile is dropped, not answered with a reset

# Request headers that are the connection's own: the upstream connection has its own.
_REQUEST_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"})
_UPGRADE_HOP = _REQUEST_HOP - {b"upgrade"}  # an upgrade request's Upgrade header passes on
_NOT_HOP_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
_NO_HEADERS: dict[str, str] = {}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_NO_RETRIES = RetryPolicy()  # a request's policy until it is routed

# Why the client's reading is paused (bits of HttpDownstream.paused).
_PAUSE_QUEUED = 1  # a request waits behind the one being answered
_PAUSE_UPSTREAM = 2  # the upstream connection's write buffer is full
_PAUSE_HELD = 4  # body bytes are held until the upstream connection is there

# The answers the proxy makes itself.
NO_ROUTE_BODY = "no route to {service}"
NO_HEALTHY_UPSTREAM_BODY = b"no healthy upstream"
FAULT_ABORT_BODY = b"fault filter abort"
BAD_REQUEST_BODY = b"Bad Request"  # Envoy's codec errors: the status text
HEADERS_TOO_LARGE_BODY = b"Request Header Fields Too Large"
URI_TOO_LONG_BODY = b"URI Too Long"
HEADER_TIMEOUT_BODY = b"request header timeout"
STREAM_TIMEOUT_BODY = b"stream timeout"
UPSTREAM_PROTOCOL_BODY = (b"upstream connect error or disconnect/reset before headers. "
                          b"reset reason: protocol error")
CONNECT_METHOD_BODY = b"CONNECT is not supported"
BLACK_HOLE_BODY = (b"%s:%d is outside the mesh and not listed in x-composemesh.egress.hosts: "
                   b"refused (outboundTrafficPolicy REGISTRY_ONLY, BlackHoleCluster)")


class Refusal(Exception):
    """The request breaks a limit (raised while parsing): answer ``status``, then close."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body

log = logging.getLogger("composemesh.proxy.http")


class HttpPath:
    """The HTTP side of a capture listener, for the proxy's whole life: one for the outbound
    listener (the app's requests to mesh services) and one for the inbound listener (peers'
    requests to the app). Both are this same path; inbound is a configuration of it, set per
    connection (``InboundCaller``): the request is authorized by the inbound router, its one
    endpoint is the app at the address the peer dialed, in plaintext, and it is counted by
    the destination's reporter.

    Owns the upstream pool and its listener's HTTP connections; each request reads the
    routers in force (``switch``) when it is routed.
    """

    def __init__(self, stats: ProxyStats, pool: UpstreamPool | None = None,
                 limits: ProxyLimits = ProxyLimits(),  # noqa: B008 (frozen)
                 switch: RouterSwitch | None = None, direction: str = OUTBOUND,
                 observer: Observer | None = None) -> None:
        self.stats = stats
        self.observer = observer  # access logs and spans (None: neither, no request id)
        self.direction = direction
        self.pool = pool or UpstreamPool(limits=limits)
        self.switch = switch or RouterSwitch()
        self.escaped_slashes = limits.path_with_escaped_slashes_action
        self.connections: set[HttpDownstream] = set()
        self.tunnels: set[asyncio.Protocol] = set()  # upgraded connections, spliced
        self.limits = limits
        # what each connection reads, derived once
        self.head_max = limits.max_request_head
        self.url_max = limits.max_url
        self.headers_max = limits.max_headers_count
        self.header_timeout = limits.request_headers_timeout
        self.idle_timeout = limits.idle_timeout
        self.stream_idle = limits.stream_idle_timeout
        # the timer's period: a quarter of the shorter idle timeout, so that either fires
        # within 1.25 times its length of the last byte (0: neither is on)
        quiet = [t for t in (limits.idle_timeout, limits.stream_idle_timeout) if t > 0]
        self.tick = min(quiet) / 4 if quiet else 0.0

    @property
    def router(self) -> Router:
        """The outbound router in force."""
        return self.switch.current.outbound

    @property
    def inbound(self) -> InboundRouter:
        """The inbound router in force."""
        return self.switch.current.inbound

    def entry(self, service: str, port: int) -> Handoff:
        """The handoff that makes a captured connection to ``service`` an HTTP one (a
        ``Router``'s ``http``)."""
        return Handoff(partial(self._take, service, port, None))

    def inbound_entry(self, original: Address, peer: str | None, secure: bool,
                      source: PeerLabels) -> Handoff:
        """The handoff that makes a peer's connection into the app an HTTP one (an
        ``InboundRouter``'s ``http``): ``peer`` is its mesh service (None: unauthenticated),
        ``secure`` whether it came over mTLS, ``source`` how the metrics name it."""
        inbound = self.inbound  # the one in force, read once
        caller = InboundCaller(peer, secure, Endpoint(node=inbound.config.node,
                                                      version=inbound.me.version,
                                                      address=original[0]), source)
        return Handoff(partial(self._take, inbound.me.app, original[1], caller))

    def black_hole_entry(self, host: str, port: int) -> Handoff:
        """The handoff of an app's HTTP connection to ``host:port`` that REGISTRY_ONLY refuses:
        each request gets its 502 (a ``Router``'s ``black_hole``)."""
        return Handoff(partial(self._take, BLACK_HOLE_CLUSTER, port, BlackHoleCaller(host, port)))

    def _take(self, service: str, port: int, caller: InboundCaller | BlackHoleCaller | None,
              transport: asyncio.Transport, first: bytes) -> None:
        downstream = HttpDownstream(self, service, port, caller)
        transport.set_protocol(downstream)
        downstream.connection_made(transport)
        if first:
            downstream.data_received(first)

    def close(self) -> None:
        """Drop every connection, the app's and the upstream ones (shutdown)."""
        for downstream in list(self.connections):
            downstream.abort()
        for tunnel in list(self.tunnels):
            cast(asyncio.Transport, getattr(tunnel, "transport")).abort()  # noqa: B009
        self.pool.close()


class InboundCaller:
    """Who an inbound HTTP connection is from, known once per connection: ``peer`` its mesh
    service (None: unauthenticated), ``secure`` whether over mTLS, and its one ``endpoint``:
    the app, at the address the peer dialed (the app may listen on that address only)."""

    __slots__ = ("peer", "secure", "endpoint", "source")

    def __init__(self, peer: str | None, secure: bool, endpoint: Endpoint,
                 source: PeerLabels) -> None:
        self.peer = peer
        self.secure = secure
        self.endpoint = endpoint
        self.source = source  # the metrics' source labels: workload, version, principal


class IngressCaller:
    """A client outside the mesh, at the ingress gateway: over ``scheme`` (``https``, TLS
    ended here, or ``http``); each request is routed by its Host and path."""

    __slots__ = ("scheme",)

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme


class BlackHoleCaller:
    """The app called ``host:port``, outside the mesh and not listed, under REGISTRY_ONLY:
    each request is answered 502 saying so (Istio's BlackHoleCluster)."""

    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


class HttpDownstream(asyncio.Protocol):
    """A connection to one mesh service (and port), speaking HTTP/1.x: the app's to a mesh
    service (outbound), a peer's to the app (inbound: ``caller`` says who), or a client's
    from outside at the ingress gateway (``IngressCaller``: per request, where it routes).

    Requests are answered one at a time, in order; one parsed while another is being
    answered waits (pipelining works, without concurrency).

    Timeouts: one timer (``timer``) per connection, looking every ``HttpPath.tick``
    seconds; the hot path reads no clock and sets no flag for them. The timer compares the
    active exchange's byte counts with those it saw last (``seen``): the stream idle timeout
    runs from the last look that found them moved (``quiet_since``). The end of an exchange
    only clears ``idle_since``, which the timer stamps: the idle timeout runs from it. A
    request head that spans reads has an exact deadline (``head_since`` + the header
    timeout), the first request's from the accept, so that a connection that never sends a
    whole head is closed.
    """

    __slots__ = ("http", "service", "port", "caller", "transport", "parser", "current", "active",
                 "queue", "paused", "writing_paused", "closed", "eof", "tunnel_first", "_url",
                 "_pairs", "head_left", "in_head", "in_body", "head_since", "seen",
                 "quiet_since", "idle_since", "timer", "addresses")

    transport: asyncio.Transport

    def __init__(self, http: HttpPath, service: str, port: int,
                 caller: InboundCaller | IngressCaller | BlackHoleCaller | None = None
                 ) -> None:
        self.http = http
        self.service = service
        self.port = port
        self.caller = caller  # None: outbound, the app is calling
        self.parser = httptools.HttpRequestParser(self)
        self.current: Exchange | None = None  # the request being parsed
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # parsed, waiting for ``active`` to end
        self.paused = 0  # _PAUSE_* bits: reading is paused while any is set
        self.writing_paused = False  # our write buffer to the app is full
        self.closed = False
        self.eof = False  # the app sent FIN: answer what came, then close
        self.tunnel_first: list[bytes] | None = None  # after an upgrade request: bytes held
        self._url = b""
        self._pairs: list[tuple[bytes, bytes]] = []
        self.addresses: tuple[str, str] | None = None  # (local, remote), for access logs
        self.head_left = http.head_max  # bytes the current (or next) request head may still take
        self.in_head = False  # the parser is inside a request head
        self.in_body = False  # ... inside a request body: reads do not count against the head
        self.head_since = 0.0  # when the head awaited under the header timeout began (0: none)
        self.seen: tuple[Exchange, int, int] | None = None  # what the timer saw last
        self.quiet_since = 0.0  # when the timer last saw the active exchange's bytes move
        self.idle_since = 0.0  # when the connection was last seen with no exchange (0: not yet)
        self.timer: asyncio.TimerHandle | None = None

    # ---- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.http.connections.add(self)
        now = asyncio.get_running_loop().time()
        self.quiet_since = self.idle_since = now
        if self.http.header_timeout:
            self.head_since = now  # the first request's head is due from the accept
        self._arm(now)

    def data_received(self, data: bytes) -> None:
        if self.tunnel_first is not None:  # upgrading: held for the tunnel
            self.tunnel_first.append(data)
            self.transport.pause_reading()
            return
        try:
            if self.in_body:
                self.parser.feed_data(data)
            elif len(data) <= self.head_left:  # all of it may be head: counted, then parsed
                self.head_left -= len(data)
                self.parser.feed_data(data)
            else:
                self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrading(data[exc.args[0]:])
            return
        except Refusal as limit:
            self.refuse(limit.status, limit.body)
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, Refusal):
                self.refuse(cause.status, cause.body)
                return
            log.exception("HTTP request handling failed")
            self.abort()
            return
        except httptools.HttpParserError:
            self.refuse(400, BAD_REQUEST_BODY)
            return
        if self.in_head and not self.head_since and self.http.header_timeout:
            self._head_started()

    def _feed(self, data: bytes | memoryview) -> None:
        """Parse ``data``, which may hold (the rest of) a request head: counted against the
        head's budget before the parser sees it, so that a head is never buffered past it."""
        if self.in_body:
            self.parser.feed_data(data)
            return
        room = self.head_left
        if len(data) <= room:
            self.head_left = room - len(data)
            self.parser.feed_data(data)
            return
        # More than the head may still take: its share first. A head that has not ended
        # within it is refused unparsed; else the rest is a body, or a next request whose
        # head began inside the share (so it is counted from there: at most twice the limit).
        view = memoryview(data)
        self.head_left = -1  # on_headers_complete sets it again if a head ends in the share
        if room > 0:
            self.parser.feed_data(view[:room])
        if self.head_left < 0:
            raise Refusal(431, HEADERS_TOO_LARGE_BODY)
        try:
            self._feed(view[room:])
        except httptools.HttpParserUpgrade as exc:
            raise httptools.HttpParserUpgrade(room + exc.args[0]) from None

    def eof_received(self) -> bool:
        self.eof = True
        return self.active is not None or bool(self.queue)  # else close now

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.http.connections.discard(self)
        self.queue.clear()
        active = self.active
        if active is not None:
            self.active = None
            active.client_gone()

    def pause_writing(self) -> None:
        self.writing_paused = True
        active = self.active
        if active is not None and active.conn is not None:
            active.conn.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        active = self.active
        if active is not None and active.conn is not None:
            active.conn.resume()

    def abort(self) -> None:
        self.transport.abort()

    # ---- httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._pairs = []
        self.in_head = True
        if self.active is not None:
            self.pause_for(_PAUSE_QUEUED)

    def on_url(self, url: bytes) -> None:
        if self._url:
            url = self._url + url
        if len(url) > self.http.url_max:
            raise Refusal(414, URI_TOO_LONG_BODY)
        self._url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_body:  # after a chunked body: a trailer field
            self._trailer(name, value)
            return
        pairs = self._pairs
        pairs.append((name, value))
        if len(pairs) > self.http.headers_max:
            raise Refusal(431, HEADERS_TOO_LARGE_BODY)

    def _trailer(self, name: bytes, value: bytes) -> None:
        """A chunked request's trailer field: passed on after the last chunk; all of them
        together held to the head's size limit."""
        current = self.current
        if current is None:
            return
        current.trailers += b"%s: %s\r\n" % (name, value)
        if len(current.trailers) > self.http.head_max:
            raise Refusal(431, HEADERS_TOO_LARGE_BODY)

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.in_body = True
        self.head_since = 0.0
        self.head_left = self.http.head_max
        if self.closed:  # pipelined behind an answer that closes the connection: dropped
            self.current = None
            return
        parser = self.parser
        method = parser.get_method()
        v11 = parser.get_http_version() == "1.1"
        upgrade = parser.should_upgrade()
        url = self._url
        pairs = self._pairs
        if url[:1] == b"/":
            q = url.find(b"?")
            path = (url if q < 0 else url[:q]).decode("latin-1")
        else:  # absolute-form (or *): route on its path
            try:
                path = (httptools.parse_url(url).path or b"/").decode("latin-1")
            except httptools.HttpParserInvalidURLError:
                path = "/"
        caller = self.caller
        forwarded = b""
        drop = _UPGRADE_HOP if upgrade else _REQUEST_HOP
        if caller is not None:
            if type(caller) is InboundCaller:
                if self.http.inbound.paths_checked and url != b"*":
                    url, path = checked_target(url, path, self.http.escaped_slashes)
            elif type(caller) is IngressCaller:  # from outside: said where from (the edge's)
                forwarded = forwarded_headers(
                    pairs, self.transport.get_extra_info("peername"), caller.scheme)
                drop = drop | _FORWARDED
        observer = self.http.observer
        if observer is not None:  # the trace continued: its headers replaced, a request id
            trace, dropped, added = observer.trace(pairs)
            drop = drop | dropped
        line = b"%s %s HTTP/1.1\r\n" if v11 else b"%s %s HTTP/1.0\r\n"
        parts, connection, chunked, expect = _request_head(line % (method, url), pairs, drop)
        if connection is not None:
            tokens = {t.strip().lower() for t in connection.split(b",")} - _NOT_HOP_TOKENS
            if tokens:  # headers the app marked as this connection's own
                parts, _, chunked, expect = _request_head(parts[0], pairs, drop | tokens)
        if upgrade:
            parts.append(b"Connection: upgrade\r\n")
        if forwarded:
            parts.append(forwarded)
        if observer is not None:
            parts.append(added)
        parts.append(b"\r\n")
        exchange = self.current = Exchange(
            self, method.decode("latin-1"), path, pairs, b"".join(parts), v11,
            parser.should_keep_alive() and not upgrade, chunked, expect, upgrade)
        if observer is not None:
            exchange.trace = trace
            exchange.wall = time.time()
        if self.active is None:
            self._activate(exchange)
        else:
            self.queue.append(exchange)

    def on_body(self, body: bytes) -> None:
        if self.current is not None:
            self.current.add_body(body)

    def on_message_complete(self) -> None:
        self.in_body = False
        current = self.current
        if current is not None:
            self.current = None
            current.body_done()

    # ---- the exchanges, one after another

    def _activate(self, exchange: Exchange) -> None:
        self.active = exchange
        if exchange.method == "CONNECT":
            exchange.local(405, CONNECT_METHOD_BODY, NO_FLAGS)
        elif exchange.complete or not exchange.replayable or exchange.expect:
            exchange.dispatch()

    def finished(self, exchange: Exchange, close: bool) -> None:
        """``exchange`` is answered; ``close``: the connection ends with it."""
        if self.active is exchange:
            self.active = None
        self.resume_for(_PAUSE_UPSTREAM | _PAUSE_HELD)
        if close or self.closed:
            self.queue.clear()
            if self.in_head or self.in_body:  # the client is still sending: let it, unread
                self.linger()
            else:
                self.closed = True
                self.transport.close()  # after what is buffered
            return
        if self.queue:
            self._activate(self.queue.popleft())
            return
        if self.eof:
            self.transport.close()
            return
        self.idle_since = 0.0  # idle from now: the timer stamps it at its next look
        self.resume_for(_PAUSE_QUEUED)

    def pause_for(self, bit: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= bit

    def resume_for(self, bits: int) -> None:
        if not self.paused & bits:
            return
        self.paused &= ~bits
        if not self.paused and not self.closed:
            self.transport.resume_reading()

    def refuse(self, status: int, body: bytes, flags: str = BAD_REQUEST) -> None:
        """The request being parsed cannot be taken (bad framing, a limit, too slow): answer
        ``status`` and close at once; after the answer in flight if it is an earlier
        request's (then the refused one gets no answer: the connection just ends)."""
        current = self.current
        self.current = None
        self.closed = True  # nothing more is parsed; finished() closes
        self.in_head = False
        self.head_since = 0.0
        self.queue.clear()
        self.transport.pause_reading()
        active = self.active
        if active is not None and active is not current:
            return
        if active is not None:  # the refused request's own exchange: it ends here
            self.active = None
            if active.abandon(status, flags):  # the app has part of a response already
                self.transport.abort()
                return
        else:
            self.count_refused(status, flags)
        self.transport.write(_local_head(status, len(body), True) + body)
        self.linger()

    def linger(self) -> None:
        """Half-close after an answer that ends the connection; drop what still comes for
        ``LINGER`` seconds (``Drain``), then close (the client's own close ends it sooner)."""
        self.closed = True
        transport = self.transport
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        transport.set_protocol(Drain(self))
        transport.resume_reading()
        self.timer = asyncio.get_running_loop().call_later(LINGER, transport.abort)

    def count_refused(self, status: int, flags: str) -> None:
        """Count (and log) a request refused before it was whole (400, 408, 413, 414, 431)."""
        http = self.http
        caller = self.caller
        observer = http.observer
        transport = self.transport
        if type(caller) is not InboundCaller:  # the app's, or a client's at the ingress
            me = http.router.me
            http.stats.http_request(me, self.service or UNKNOWN, UNKNOWN, UNKNOWN,
                                    None, status, flags, 0.0, 0, 0)
            if observer is not None:
                observer.refused(status=status, flags=flags, reporter="source", source=me,
                                 service=self.service or UNKNOWN, destination=UNKNOWN_PEER,
                                 security=None,
                                 local=address_text(transport.get_extra_info("sockname")),
                                 remote=address_text(transport.get_extra_info("peername")))
            return
        inbound = http.inbound
        security = MUTUAL_TLS if caller.secure else NO_SECURITY
        http.stats.http_inbound_request(caller.source, inbound.me, status, flags, security,
                                        0.0, 0, 0)
        if observer is not None:
            observer.refused(status=status, flags=flags, reporter="destination",
                             source=caller.source, service=inbound.me.app,
                             destination=inbound.me, security=security,
                             local=address_text(transport.get_extra_info("sockname")),
                             remote=address_text(transport.get_extra_info("peername")))

    # ---- timeouts

    def _arm(self, now: float) -> None:
        """Set the timer for the next look: a tick from ``now``, or the head's deadline."""
        http = self.http
        due = now + http.tick if http.tick else 0.0
        if self.head_since:
            deadline = self.head_since + http.header_timeout
            if not due or deadline < due:
                due = deadline
        if due:
            self.timer = asyncio.get_running_loop().call_at(due, self._tick)

    def _head_started(self) -> None:
        """A request head did not end in the read that began it: its deadline runs."""
        loop = asyncio.get_running_loop()
        self.head_since = now = loop.time()
        timer = self.timer
        if timer is None or timer.when() > now + self.http.header_timeout:
            if timer is not None:
                timer.cancel()
            self.timer = None
            self._arm(now)

    def _tick(self) -> None:
        self.timer = None
        now = asyncio.get_running_loop().time()
        http = self.http
        if self.head_since and now >= self.head_since + http.header_timeout:
            self._head_timeout()
            return
        active = self.active
        if active is not None:
            seen = (active, active.body_size, active.response_size)
            if seen != self.seen:  # bytes moved (or a new exchange) since the last look
                self.seen = seen
                self.quiet_since = now
            elif http.stream_idle and now >= self.quiet_since + http.stream_idle:
                self.seen = None
                active.stream_idle()
                if self.closed:
                    return
        elif http.idle_timeout and (not self.in_head or not http.header_timeout):
            # idle from the end of the last exchange (stamped here, at the first look after
            # it), as Envoy's: bytes that start no request do not keep a connection open
            if not self.idle_since:
                self.idle_since = now
            elif now >= self.idle_since + http.idle_timeout:
                http.stats.error(http.direction, "idle_timeout")
                self.closed = True
                self.transport.close()
                return
        self._arm(now)

    def _head_timeout(self) -> None:
        """The header timeout: 408 for a head that began; a connection that never sent one
        is closed without a word (HAProxy's ``timeout http-request``)."""
        if self.in_head:
            self.refuse(408, HEADER_TIMEOUT_BODY, NO_FLAGS)
            return
        self.head_since = 0.0
        if self.active is not None:
            self._arm(asyncio.get_running_loop().time())
            return
        http = self.http
        http.stats.error(http.direction, "idle_timeout")
        self.closed = True
        self.transport.close()

    # ---- upgrades

    def _upgrading(self, rest: bytes) -> None:
        """The request asked to switch protocols: hold what follows until the upstream says."""
        self.tunnel_first = [rest] if rest else []
        self.transport.pause_reading()

    def tunnel(self, conn: UpstreamConnection, upstream_first: bytes,
               exchange: Exchange) -> None:
        """The upstream switched protocols: from now on, bytes pass both ways untouched;
        ``exchange`` is counted when the tunnel ends."""
        self.http.connections.discard(self)
        self.http.pool.connections.discard(conn)
        self.active = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        first = b"".join(self.tunnel_first or ())
        self.tunnel_first = None
        splice(self.transport, conn.transport, first, upstream_first, self.http.tunnels,
               self.http.limits.tcp_idle_timeout, exchange.tunnel_ended)


class Drain(asyncio.Protocol):
    """A connection closing after an error answer (``HttpDownstream.linger``): what the client
    still sends is read and dropped, so that it reads the answer instead of a reset."""

    __slots__ = ("down",)

    def __init__(self, down: HttpDownstream) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.connection_lost(exc)


class Exchange:
    """One request and its answer: routing, tries, timeouts, and streaming the response."""

    __slots__ = (
        "down", "service", "port", "method", "path", "pairs", "head", "v11", "keep_alive",
        "chunked", "expect",
        "upgrade", "head_only", "body", "body_size", "complete", "replayable",
        "dispatched", "started", "router", "state", "route", "tries", "tried", "endpoint",
        "in_try", "connecting", "conn", "sent", "per_try", "deadline", "delay",
        "status", "flags", "framing", "responding", "close_client", "response_size", "done",
        "held", "pinned", "trailers", "trace", "wall",
    )

    def __init__(self, down: HttpDownstream, method: str, path: str,
                 pairs: list[tuple[bytes, bytes]], head: bytes, v11: bool, keep_alive: bool,
                 chunked: bool, expect: bool, upgrade: bool) -> None:
        self.down = down
        self.service = down.service  # the mesh service and port it goes to (the ingress:
        self.port = down.port  # per request, by its route)
        self.method = method
        self.path = path
        self.pairs = pairs
        self.head = head
        self.v11 = v11
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.expect = expect
        self.upgrade = upgrade
        self.head_only = method == "HEAD"
        self.body: list[bytes] = []  # as sent upstream (chunked bodies stay chunked)
        self.body_size = 0
        self.complete = False  # the whole request has come from the app
        self.replayable = True  # the whole body so far is kept in ``body``
        self.dispatched = False
        self.started = asyncio.get_running_loop().time()
        self.router: Router | None = None
        self.state: ServiceState | None = None
        self.route: HttpRoute | None = None
        self.tries = Tries(_NO_RETRIES, self.method)  # the route's policy once it is routed
        self.tried: list[Endpoint] = []
        self.pinned: tuple[Endpoint, ...] = ()  # Host named one compose service: only these
        self.endpoint: Endpoint | None = None  # of the current (or last) try
        self.in_try = False
        self.connecting: asyncio.Task[UpstreamConnection] | None = None
        self.conn: UpstreamConnection | None = None
        self.sent = False  # the head went out on ``conn``
        self.per_try: asyncio.TimerHandle | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.delay: asyncio.TimerHandle | None = None
        self.status = 0
        self.flags = NO_FLAGS
        self.framing = 0
        self.responding = False  # response bytes went to the app: no more tries
        self.close_client = False
        self.response_size = 0
        self.done = False
        self.held: list[bytes] | None = None  # response bytes for the app, sent per read
        self.trailers = b""  # a chunked request body's trailer fields, as sent
        self.trace: TraceContext | None = None  # with an observer: its place in its trace
        self.wall = 0.0  # ... and when its head was in (epoch seconds)

    # ---- the request, as it comes from the app

    def add_body(self, data: bytes) -> None:
        self.body_size += len(data)
        parts = (b"%x\r\n" % len(data), data, b"\r\n") if self.chunked else (data,)
        self._put(parts)

    def body_done(self) -> None:
        if self.chunked:
            self._put((b"0\r\n%s\r\n" % self.trailers if self.trailers else _LAST_CHUNK,))
        self.complete = True
        if not self.dispatched and self.down.active is self:
            self.dispatch()

    def _put(self, parts: tuple[bytes, ...]) -> None:
        if self.sent:  # the head is upstream: stream what comes
            self.conn.transport.writelines(parts)  # type: ignore[union-attr]
            if self.replayable:
                self.body.extend(parts)
                if self.body_size > BODY_BUFFER_LIMIT:
                    self.replayable = False
                    self.tries.body_lost()
                    self.body = []
            return
        self.body.extend(parts)  # held until the head goes out
        if self.replayable and self.body_size > BODY_BUFFER_LIMIT:
            self.replayable = False
        if not self.replayable and not self.done:
            self.down.pause_for(_PAUSE_HELD)
            if not self.dispatched and self.down.active is self:
                self.dispatch()

    def host(self) -> str:
        """The Host header's name, lower-case, without a port ("" if there is none)."""
        for name, value in self.pairs:
            if len(name) == 4 and name.lower() == b"host":
                return value.decode("latin-1").rsplit(":", 1)[0].strip().lower()
        return ""

    def header_map(self) -> dict[str, str]:
        """The request's headers by lower-case name (repeated ones joined), for matching."""
        headers: dict[str, str] = {}
        for name, value in self.pairs:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        return headers

    # ---- routing

    def dispatch(self) -> None:
        """Route the request: no route, fault, or the first try."""
        self.dispatched = True
        down = self.down
        caller = down.caller
        if caller is not None:
            if type(caller) is InboundCaller:
                self._dispatch_inbound(caller)
                return
            if type(caller) is BlackHoleCaller:
                self.service = BLACK_HOLE_CLUSTER
                self.local(502, BLACK_HOLE_BODY % (caller.host.encode(), caller.port), NO_ROUTE)
                return
            if not self._ingress_target(cast(IngressCaller, caller)):
                return
        router = self.router = down.http.router
        service = self.service
        state = self.state = router.services.get(service)
        if state is None:  # the service left the mesh under a kept-alive connection
            self.local(503, NO_HEALTHY_UPSTREAM_BODY, NO_HEALTHY_UPSTREAM)
            return
        headers = self.header_map() if state.needs_headers else _NO_HEADERS
        if service in router.table.pinned_services:  # only then is Host worth reading
            self.pinned = router.table.pinned.get(self.host(), ())
        route = self.route = select_route(state.routing, self.method, self.path, headers)
        if route is None:
            self.local(404, NO_ROUTE_BODY.format(service=service).encode(), NO_ROUTE)
            return
        if route.fault is not None:
            delay, abort = draw_fault(route.fault, router.rng)
            if delay > 0:
                self.flags = FAULT_DELAY
                self.delay = asyncio.get_running_loop().call_later(delay, self._go, abort)
                return
            self._go(abort)
            return
        self._go(None)

    def _ingress_target(self, caller: IngressCaller) -> bool:
        """A request from outside the mesh, at the ingress gateway: the mesh service and port
        its Host and path route to (then routed as an app's request to it), else answered
        here: 308 to https where plain HTTP is redirected, 404 for an unknown host or path.
        False when answered."""
        table = self.down.http.switch.current.ingress
        host = self.host()
        if caller.scheme == "http" and table.redirect_to_https:
            target = self.head.split(b" ", 2)[1].decode("latin-1")
            self.redirect(table.https_url(host, target if target[:1] == "/" else self.path))
            return False
        found = table.route(host, self.path)
        if found is None:
            self.local(404, b"", NO_ROUTE)
            return False
        self.service, self.port = found.service, found.port
        return True

    def _dispatch_inbound(self, caller: InboundCaller) -> None:
        """A peer's request into the app: authorized by the inbound router in force (a
        policy change applies from the next request), then the one try to the app."""
        inbound = self.down.http.inbound
        refused = inbound.refuses(caller.peer, self.method, self.path)
        if refused is not None:
            self.local(refused.status, refused.body, refused.flags)
            return
        self.state = inbound.state
        self.route = INBOUND_ROUTE
        self.pinned = (caller.endpoint,)
        self._go(None)

    def _go(self, abort: int | None) -> None:
        self.delay = None
        if abort is not None:
            self.local(abort, FAULT_ABORT_BODY, FAULT_ABORT)
            return
        route = self.route
        assert route is not None
        self.tries.policy = route.retries
        timeout = route.timeout_s
        if timeout is not None and timeout > 0:
            self.deadline = asyncio.get_running_loop().call_later(timeout, self._deadline)
        self._try()

    def _try(self) -> None:
        """One try: an endpoint (``_pick``), a connection to it."""
        state = self.state
        assert state is not None and self.route is not None
        endpoint = self._pick()
        if endpoint is None:
            self.local(503, NO_HEALTHY_UPSTREAM_BODY, NO_HEALTHY_UPSTREAM)
            return
        tries = self.tries
        tries.begin()
        self.tried.append(endpoint)
        self.endpoint = endpoint
        self.in_try = True
        state.picker.started(endpoint)
        per_try = tries.per_try_timeout_s
        if per_try is not None:
            self.per_try = asyncio.get_running_loop().call_later(per_try, self._per_try_timeout)
        key = upstream_key(endpoint, self.port)
        conn = None if self.upgrade else self.down.http.pool.acquire(key)
        if conn is None:
            self._connect(key)
        else:
            self._send(conn)

    def _pick(self) -> Endpoint | None:
        """A version by weight (or the pinned endpoints: a Host naming one compose service,
        or the app for an inbound request), then an endpoint of it."""
        state = self.state
        assert state is not None and self.route is not None
        if self.pinned:
            endpoints = self.pinned
        else:
            router = self.router
            assert router is not None
            # versions without endpoints (stopped, scaled to 0) give their share to the others
            version = pick_version(self.route, router.rng,
                                   router.table.serving_versions(self.service))
            endpoints = (
                router.table.endpoints.get((self.service, version), ()) if version else ()
            )
        if not endpoints:
            return None
        local = self.router.table.local_of(endpoints) if self.router is not None else None
        return pick_endpoint(state.picker, endpoints, state.outlier.available(endpoints),
                             self.tried, local)

    def _connect(self, key: Key) -> None:
        assert self.state is not None
        task = self.connecting = self.down.http.pool.connect(
            key, self.state.routing.connect_timeout_s, self._peer())
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        if task is not self.connecting:  # abandoned meanwhile
            if not task.cancelled() and task.exception() is None:
                self.down.http.pool.release(task.result())
            return
        self.connecting = None
        if task.cancelled():
            return
        if task.exception() is not None:
            self._end_try(False)
            self._failed(Outcome(error="connect-failure"), CONNECT_FAILURE)
            return
        self._send(task.result())

    def _peer(self) -> str | None:
        """The SPIFFE ID the endpoint must prove over mTLS (None: plaintext, as to the app
        in this namespace)."""
        tls = self.router.tls if self.router is not None else None
        if tls is None:
            return None
        endpoint = self.endpoint
        if endpoint is None:
            return tls.expected(self.service)
        return endpoint_peer(tls, self.service, endpoint)

    def _send(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.attach(self, self.head_only)
        transport = conn.transport
        if self.body:
            transport.writelines((self.head, *self.body))
            if not self.replayable:  # sent, and not kept: no more tries after this one
                self.body = []
                self.tries.body_lost()
        else:
            transport.write(self.head)
        self.sent = True
        down = self.down
        down.resume_for(_PAUSE_HELD)
        if down.writing_paused:
            conn.pause()

    def _end_try(self, ok: bool | None) -> None:
        """The current try is over: ``ok`` for the outlier detector (None: not its fault)."""
        if self.per_try is not None:
            self.per_try.cancel()
            self.per_try = None
        if not self.in_try:
            return
        self.in_try = False
        self.sent = False
        self.conn = None
        endpoint = self.endpoint
        state = self.state
        assert endpoint is not None and state is not None
        state.picker.finished(endpoint)
        if ok is None:
            return
        outlier = state.outlier
        if ok or outlier.is_ejected(endpoint):
            outlier.record(endpoint, ok)
            return
        outlier.record(endpoint, False)
        if outlier.is_ejected(endpoint):
            self.down.http.stats.ejections += 1

    def _abandon_try(self) -> None:
        """Stop the current try where it is (a timeout, or the app left)."""
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.conn is not None:
            self.conn.abort()
            self.conn = None

    def _failed(self, outcome: Outcome, flags: str) -> None:
        self._follow(self.tries.failed(outcome, flags))

    def _follow(self, next_step: Next) -> None:
        """Do what the tries said: the next try, or answer the app."""
        if isinstance(next_step, Answer):
            self.local(next_step.status, next_step.body, next_step.flags)
        else:
            self.down.http.stats.retries += 1
            self._try()

    def _per_try_timeout(self) -> None:
        self.per_try = None
        next_step = self.tries.per_try_expired()
        if next_step is None:
            return
        self._abandon_try()
        self._end_try(False)
        self._follow(next_step)

    def _deadline(self) -> None:
        self.deadline = None
        answer = self.tries.deadline_passed()
        if answer is None:
            return
        self._abandon_try()
        self._end_try(False)
        self.local(answer.status, answer.body, answer.flags)

    # ---- the response (ResponseSink)

    def response_head(self, conn: UpstreamConnection, status: int, head: bytes,
                      framing: int) -> None:
        if status < 200:
            if status == 100 and self.expect:
                self.down.transport.write(_CONTINUE)
            elif status == 101 and self.upgrade:
                self._respond(status, head, framing, False)
            return
        next_step = self.tries.responded(status, self.complete)
        if isinstance(next_step, Respond):
            if next_step.flags != NO_FLAGS:
                self.flags = next_step.flags
            self._respond(status, head, framing, conn.closing)
            return
        conn.detach()  # read to its end, then back to the pool
        self._end_try(status < 500)
        self.down.http.stats.retries += 1
        self._try()

    def _respond(self, status: int, head: bytes, framing: int, closing: bool) -> None:
        """The response begins; ``closing``: the upstream ends its connection after it, and
        the app's connection ends too."""
        self._cancel_timers()
        self.status = status
        self.framing = framing
        self.responding = self.tries.answering = True
        close = self.close_client = status != 101 and (
            not self.keep_alive or framing == UNTIL_CLOSE or not self.complete or self.down.eof
            or closing)
        head = head + (b"connection: close\r\n\r\n" if close and self.v11 else b"\r\n")
        self.response_size = len(head)
        self.held = [head]

    def response_body(self, data: bytes) -> None:
        self.response_size += len(data)
        held = self.held
        if held is None:
            held = self.held = []
        if self.framing == CHUNKED:
            held += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            held.append(data)

    def flush(self) -> None:
        held = self.held
        if held:
            self.held = None
            if len(held) == 1:
                self.down.transport.write(held[0])
            else:
                self.down.transport.writelines(held)

    def response_done(self, conn: UpstreamConnection, reusable: bool) -> None:
        if self.framing == CHUNKED:
            self._last_chunk(conn.trailers)
        self.flush()
        if reusable and self.complete:
            self.down.http.pool.release(conn)
        else:
            conn.close()
        self._end_try(self.status < 500)
        self._finish(self.close_client or not self.complete)

    def _last_chunk(self, trailers: bytes) -> None:
        last = b"0\r\n%s\r\n" % trailers if trailers else _LAST_CHUNK
        if self.held is None:
            self.held = [last]
        else:
            self.held.append(last)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        if conn.protocol_error and not self.responding:  # not HTTP, or a head past the limit
            self._end_try(False)
            self.local(502, UPSTREAM_PROTOCOL_BODY, UPSTREAM_PROTOCOL_ERROR)
            return
        if self.responding:  # the app has part of a response: it cannot have the rest
            self._end_try(False)
            self.flags = UPSTREAM_RESET
            self.held = None
            self.down.transport.abort()
            self._finish(True)
            return
        if not self.done and self.tries.reconnect(conn.got_bytes, conn.reused):
            # A pooled connection the upstream had closed: once more on a new one, same try.
            self.conn = None
            self.sent = False
            self._connect(conn.key)
            return
        self._end_try(False)
        self._failed(Outcome(error="reset"), UPSTREAM_RESET)

    def upstream_paused(self, paused: bool) -> None:
        if paused:
            self.down.pause_for(_PAUSE_UPSTREAM)
        else:
            self.down.resume_for(_PAUSE_UPSTREAM)

    def upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        """The upstream answered 101: the connection becomes a tunnel."""
        if not self.upgrade or self.done:  # a switch nobody asked for
            conn.abort()
            self.upstream_lost(conn)
            return
        self.flush()
        self._end_try(True)
        self._cancel_timers()
        self.done = self.tries.answering = True  # counted when the tunnel ends (tunnel_ended)
        self.down.tunnel(conn, rest, self)

    def tunnel_ended(self, flags: str) -> None:
        """The tunnel this upgrade became is closed: count the request, with ``flags`` if a
        side of it broke (a reset) rather than closed."""
        self.flags = flags
        self._record()

    # ---- the end

    def local(self, status: int, body: bytes, flags: str, extra: bytes = b"") -> None:
        """Answer the app ourselves; ``extra``: header lines of that answer's own."""
        self._cancel_timers()
        self.flags = flags
        self.status = status
        close = (not self.keep_alive or not self.complete or self.down.eof
                 or self.upgrade)
        head = _local_head(status, len(body), close, extra)
        self.response_size = len(head) + len(body)
        self.down.transport.write(head if self.head_only else head + body)
        self._finish(close)

    def redirect(self, location: str) -> None:
        """308 Permanent Redirect to ``location`` (the method and body are kept by clients)."""
        self.local(308, b"", NO_FLAGS, b"location: %s\r\n" % location.encode("latin-1"))

    def abandon(self, status: int, flags: str) -> bool:
        """The request was refused while it came (``HttpDownstream.refuse``): stop its try,
        close its upstream connection, count it as ``status``. True if the app had part of a
        response already (it cannot have a status now: the caller resets the connection)."""
        if self.done:
            return False
        responding = self.responding
        self._cancel_timers()
        self._abandon_try()
        self._end_try(None)
        self.held = None
        self.flags = flags
        if not responding:
            self.status = status
        self.done = self.tries.answering = True
        self._record()
        return responding

    def stream_idle(self) -> None:
        """Nothing moved either way for the stream idle timeout: 408 if the request has not
        all come (the client stalled), 504 if it has (the upstream did); a reset if part of
        the response went out already. Envoy's answers to its stream_idle_timeout."""
        if self.done:
            return
        self._cancel_timers()
        self._abandon_try()
        if self.responding:
            self._end_try(False)
            self.flags = STREAM_IDLE_TIMEOUT
            self.held = None
            self.down.transport.abort()
            self._finish(True)
            return
        self._end_try(False if self.complete else None)
        self.local(504 if self.complete else 408, STREAM_TIMEOUT_BODY, STREAM_IDLE_TIMEOUT)

    def client_gone(self) -> None:
        """The app closed its connection before its answer was complete."""
        if self.done:
            return
        self._cancel_timers()
        self._abandon_try()
        self._end_try(None)
        self.flags = DOWNSTREAM_CLOSED
        self._finish(True, tell=False)

    def _cancel_timers(self) -> None:
        for timer in (self.per_try, self.deadline, self.delay):
            if timer is not None:
                timer.cancel()
        self.per_try = self.deadline = self.delay = None

    def _finish(self, close: bool, *, tell: bool = True) -> None:
        self.done = self.tries.answering = True
        self._record()
        if tell:
            self.down.finished(self, close)

    def _record(self) -> None:
        """Count the answered request (Istio's metrics: reporter "source" outbound,
        "destination" inbound)."""
        down = self.down
        http = down.http
        caller = down.caller
        duration = (asyncio.get_running_loop().time() - self.started) * 1000.0
        if type(caller) is InboundCaller:
            inbound = http.inbound
            security = MUTUAL_TLS if caller.secure else NO_SECURITY
            http.stats.http_inbound_request(
                caller.source, inbound.me, self.status, self.flags, security, duration,
                len(self.head) + self.body_size, self.response_size)
            if self.trace is not None and http.observer is not None:
                self._observe(http.observer, duration, SERVER, inbound.me, caller.source,
                              inbound.me.app, inbound.me, security, inbound.config.node,
                              cluster_name(INBOUND, self.port, "", ""))
            return
        router = self.router or http.router
        endpoint = self.endpoint
        if endpoint is None:
            version = workload = principal = UNKNOWN
            node = None
        else:
            version, workload, node = (endpoint.version, router.table.workload(endpoint),
                                       endpoint.node)
            principal = self._peer() or UNKNOWN  # what the endpoint had to prove
        service = self.service or UNKNOWN
        http.stats.http_request(
            router.me, service, version, workload, node, self.status, self.flags, duration,
            len(self.head) + self.body_size, self.response_size, principal=principal)
        if self.trace is not None and http.observer is not None:
            me = router.me
            self._observe(http.observer, duration, CLIENT, me, me, service,
                          PeerLabels(workload=workload, namespace=me.namespace, app=service,
                                     version=version, principal=principal),
                          None, node or "", cluster_name(OUTBOUND, self.port, version, service))

    def _observe(self, observer: Observer, duration: float, kind: str, me: PeerLabels,
                 source: PeerLabels, service: str, destination: PeerLabels,
                 security: str | None, node: str, cluster: str) -> None:
        """Tell ``observer`` of the request: its access-log line, its span."""
        authority = user_agent = forwarded_for = None
        for name, value in self.pairs:
            lname = name.lower()
            if lname == b"host":
                authority = value.decode("latin-1")
            elif lname == b"user-agent":
                user_agent = value.decode("latin-1")
            elif lname == b"x-forwarded-for":
                forwarded_for = value.decode("latin-1")
        down = self.down
        addresses = down.addresses
        if addresses is None:  # once per connection: each asks the kernel
            transport = down.transport
            addresses = down.addresses = (address_text(transport.get_extra_info("sockname")),
                                          address_text(transport.get_extra_info("peername")))
        endpoint = self.endpoint
        assert self.trace is not None
        observer.http(
            self.trace, kind=kind, wall=self.wall, duration_ms=duration, method=self.method,
            path=self.path, authority=authority or "", user_agent=user_agent,
            forwarded_for=forwarded_for, status=self.status, flags=self.flags,
            bytes_received=len(self.head) + self.body_size, bytes_sent=self.response_size,
            upstream=(f"{endpoint.address}:{endpoint.port or self.port}"
                      if endpoint is not None else None),
            cluster=cluster, local=addresses[0], remote=addresses[1], me=me, source=source,
            service=service, destination=destination, security=security, node=node,
            port=self.port)


_FORWARDED = frozenset({b"x-forwarded-for", b"x-forwarded-proto"})


def forwarded_headers(pairs: list[tuple[bytes, bytes]], peer: object, scheme: str) -> bytes:
    """What the ingress tells the mesh of a request from outside: ``x-forwarded-for`` with
    the client's address appended to what the client said, ``x-forwarded-proto`` the scheme
    it came over (the client's own is not believed), as Envoy does at the edge."""
    client = peer[0] if isinstance(peer, tuple) and peer else ""
    said = [v.strip() for n, v in pairs if n.lower() == b"x-forwarded-for" and v.strip()]
    chain = b", ".join([*said, str(client).encode()]) if client else b", ".join(said)
    out = b"x-forwarded-proto: %s\r\n" % scheme.encode()
    return (b"x-forwarded-for: %s\r\n" % chain if chain else b"") + out


def checked_target(url: bytes, path: str, escaped_slashes: str) -> tuple[bytes, str]:
    """Where a policy matches on paths: the normalized path (``request_path``) to authorize
    with, also in the request line sent to the app (in origin-form, the query kept as it
    came); "" for a path refused (400 when its turn comes)."""
    if url[:1] == b"/":
        q = url.find(b"?")
        query = url[q:] if q >= 0 else b""
    else:  # absolute-form: the path that was routed on, its query, and no fragment
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            return url, ""
        if parsed.fragment is not None:
            return url, ""
        query = b"?" + parsed.query if parsed.query is not None else b""
    normal = request_path(path, escaped_slashes)
    if normal is None:
        return url, ""
    if normal == path and url[:1] == b"/":
        return url, path
    return normal.encode("latin-1") + query, normal


def _request_head(line: bytes, pairs: list[tuple[bytes, bytes]], drop: frozenset[bytes]
                  ) -> tuple[list[bytes], bytes | None, bool, bool]:
    """The request head's pieces for upstream (``line``, then the headers not in ``drop``),
    the Connection header's value, whether the body is chunked, whether 100-continue is
    expected."""
    parts = [line]
    connection = None
    chunked = expect = False
    for name, value in pairs:
        lname = name.lower()
        if lname in drop:
            if lname == b"connection":
                connection = value if connection is None else connection + b"," + value
            continue
        if lname == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif lname == b"expect":
            expect = value.lower() == b"100-continue"
        parts += (name, b": ", value, b"\r\n")
    return parts, connection, chunked, expect


_PHRASES = {414: b"URI Too Long"}  # RFC 9110's name (Python's is RFC 2616's)


def _local_head(status: int, length: int, close: bool, extra: bytes = b"") -> bytes:
    phrase = _PHRASES.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase.encode()
        except ValueError:
            phrase = b"Unknown"
    return (b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\ncontent-type: text/plain\r\n"
            b"server: composemesh\r\n%s%s\r\n"
            % (status, phrase, length, extra, b"connection: close\r\n" if close else b""))
