"""The TCP data path: accept a captured connection, classify it, choose its destination, pump bytes.

The decisions are plain functions (a ``Chooser``, ``is_proxy_address``, ``sniff_http``) and the
routers of the snapshot in force (``proxy.router``); the protocols below only move bytes,
apply flow control and count, or hand the connection over to the HTTP path. A connected pair
(and an upgraded HTTP connection) that carries nothing for ``tcp_idle_timeout`` is closed
(``IdleWatch``: reads set a flag, one timer per pair looks at it).

Where a port's protocol is not declared, the first bytes tell (``sniff_http``), and whoever
speaks first decides: the connection to the TCP destination is opened at once, while the
client's first bytes are awaited. HTTP is client-first, so a server that speaks first (a
banner, a MySQL or SMTP greeting) says "TCP" the moment its first bytes arrive, which go to
the client at once: a server-first protocol waits for nothing. Client bytes that start an
HTTP request hand the connection to the HTTP path, and the connection opened meanwhile is
let go unused (``Unused``: a FIN, nothing counted); a (service, port) found to speak HTTP is
remembered, and its next connections are not opened ahead. Neither side saying anything for
``SNIFF_TIMEOUT`` is TCP too.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast

from composemesh.model.limits import ProxyLimits
from composemesh.model.wellknown import PROXY_PORTS
from composemesh.proxy.buffers import WRITE_HIGH_WATER, WRITE_LOW_WATER
from composemesh.proxy.connector import PeerIdentityError, connect_peer
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.original_dst import Address, original_dst
from composemesh.proxy.stats import (
    DOWNSTREAM_CLOSED,
    NO_FLAGS,
    UPSTREAM_RESET,
    ProxyStats,
    TcpCounters,
    TcpLabels,
)
from composemesh.proxy.telemetry import Observer, address_text, cluster_name
from composemesh.proxy.tls_link import TlsLink

CONNECT_TIMEOUT = 5.0  # seconds to reach a destination before the connection is dropped
SNIFF_TIMEOUT = 0.1  # seconds to wait for anyone's first bytes before deciding on TCP
SNIFF_MAX = 64 * 1024  # first bytes held this long without a verdict are TCP
UNUSED_LINGER = 10.0  # seconds a connection opened ahead and not used may take to close

_LOCAL_HOSTS = frozenset({"0.0.0.0", "::", "::1"})

# Request methods that mark a connection as HTTP/1.x when followed by a space.
HTTP_METHODS = frozenset({
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
    b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY", b"MOVE", b"LOCK", b"UNLOCK", b"REPORT",
    b"SEARCH", b"PURGE",
})
_MAX_METHOD = max(len(m) for m in HTTP_METHODS)
_VERSION = b"HTTP/"


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one captured connection goes, and the labels its metrics carry."""

    host: str
    port: int
    labels: TcpLabels
    peer: str | None = None  # the SPIFFE ID the destination must prove (mTLS); None: plaintext
    preamble: bytes = b""  # sent first on the connection, before the client's bytes
    sni: str | None = None  # the server name of the mTLS ClientHello (an east-west gateway's)


@dataclass(frozen=True, slots=True)
class Refused:
    """Refuse the connection: close it, counting ``kind`` (an authorization policy said no)."""

    kind: str


@dataclass(frozen=True, slots=True)
class Handoff:
    """Hand a captured connection to another protocol (the HTTP path), with its first bytes."""

    take: Callable[[asyncio.Transport, bytes], None]


@dataclass(frozen=True, slots=True)
class Sniff:
    """The protocol is not declared: HTTP if the first bytes say so, else TCP to ``tcp()``.

    ``key`` names what is detected (a service and port): found to be HTTP once, its next
    connections wait for the client's bytes without opening the TCP one ahead."""

    http: Handoff
    tcp: Callable[[], Destination | Refused | None]
    key: object = None


Route = Destination | Handoff | Sniff | Refused
Chooser = Callable[[Address], "Route | None"]  # original destination -> what to do
Resolver = Callable[[Any], Address]  # accepted socket -> its original destination


def passthrough(labels: TcpLabels) -> Chooser:
    """The chooser of plain TCP forwarding: every connection goes to its original destination."""

    def choose(original: Address) -> Destination:
        return Destination(original[0], original[1], labels)

    return choose


def sniff_http(data: bytes) -> bool | None:
    """Whether ``data``, a connection's first bytes, start an HTTP/1.x request line: a method,
    a space, a request target, a space and ``HTTP/``; None while too few bytes have come to
    tell. A line protocol whose first line only begins with a method's name (``GET key``)
    is not HTTP, nor is anything that has not told within ``SNIFF_MAX`` bytes."""
    space = data.find(b" ", 0, _MAX_METHOD + 1)
    if space < 0:
        if len(data) > _MAX_METHOD:
            return False
        return None if any(m.startswith(data) for m in HTTP_METHODS) else False
    if data[:space] not in HTTP_METHODS:
        return False
    end = data.find(b" ", space + 1)
    target = data[space + 1:end] if end >= 0 else data[space + 1:]
    if (not target and end >= 0) or b"\n" in target or b"\r" in target:
        return False  # no target, or the line ended before its version
    if end < 0:
        return None if len(data) <= SNIFF_MAX else False
    version = data[end + 1:end + 1 + len(_VERSION)]
    if version == _VERSION:
        return True
    return None if _VERSION.startswith(version) else False


def is_proxy_address(original: Address, local: Address, proxy_ports: Collection[int]) -> bool:
    """Whether ``original`` is the proxy itself: the connection was not redirected, so refuse it.

    Forwarding it would connect the proxy to its own listener, again and again.
    """
    host, port = original[0], original[1]
    if host == local[0] and port == local[1]:
        return True
    return port in proxy_ports and (
        host == local[0] or host.startswith("127.") or host in _LOCAL_HOSTS
    )


class Forwarder:
    """One capture listener's data path; pass it to ``loop.create_server`` as the factory."""

    def __init__(
        self,
        direction: str,
        stats: ProxyStats,
        chooser: Chooser,
        *,
        resolver: Resolver = original_dst,
        connect_timeout: float = CONNECT_TIMEOUT,
        proxy_ports: Collection[int] = PROXY_PORTS,
        tls: MeshTls | None = None,
        limits: ProxyLimits = ProxyLimits(),  # noqa: B008 (frozen)
        observer: Observer | None = None,
    ) -> None:
        self.direction = direction
        self.observer = observer  # an access-log line per connection, when it closes
        self.limits = limits
        self.tcp_idle = limits.tcp_idle_timeout
        self.tls = tls  # the client side of mTLS to destinations that name a peer
        self.stats = stats
        self.chooser = chooser  # replaced whole when a new snapshot changes the decisions
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.proxy_ports = frozenset(proxy_ports)
        self.connections: set[Downstream] = set()
        # Sniff keys (service, port) found to speak HTTP: not connected ahead of the verdict
        self.speaks_http: set[object] = set()

    def __call__(self) -> Downstream:
        return Downstream(self)

    def abort_all(self) -> None:
        """Drop every connection at once (shutdown)."""
        for connection in list(self.connections):
            connection.abort()


class _Side(asyncio.Protocol):
    """One socket of a forwarded pair; what it reads goes to its peer, flow-controlled."""

    __slots__ = ("transport", "peer", "forward", "eof_in", "eof_out", "moved")

    transport: asyncio.Transport
    peer: _Side | None
    forward: Callable[[bytes], None]  # the peer transport's write
    eof_in: bool  # the remote end sent FIN
    eof_out: bool  # we sent FIN to the remote end
    moved: bool  # bytes came since the pair's IdleWatch last looked

    def pause_writing(self) -> None:
        # Our write buffer is full: stop reading what fills it.
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        """Half-close: pass the FIN on; close each socket once both its directions have ended."""
        if self.eof_in:  # seen again after a pause/resume of reading
            return not self.eof_out
        self.eof_in = True
        peer = self.peer
        if peer is None or peer.transport.is_closing():
            return False
        if not peer.transport.can_write_eof():
            peer.transport.close()
            return False
        peer.transport.write_eof()  # after whatever is still buffered
        peer.eof_out = True
        if peer.eof_in:
            peer.transport.close()
        return not self.eof_out  # False closes our transport too

    def _lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is None:
            return
        if exc is not None:
            peer.transport.abort()
        elif not peer.transport.is_closing():
            peer.transport.close()  # flushes what is buffered first


class Downstream(_Side):
    """The accepted (captured) connection: decides where it goes and owns the pair's accounting."""

    __slots__ = ("forwarder", "counters", "connecting", "upstream", "early", "sniff", "sniffed",
                 "sniffing", "watch", "ahead", "ready", "dropped", "destination", "wall",
                 "received_n", "sent_n")

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.peer = None  # the Upstream, once connected and linked
        self.eof_in = self.eof_out = self.moved = False
        self.watch: IdleWatch | None = None
        self.counters: TcpCounters | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.upstream: Upstream | None = None  # set as soon as it exists, linked or not
        self.early: list[bytes] | None = None  # what came before the destination answered
        self.sniff: Sniff | None = None  # while the first bytes are awaited
        self.sniffed = b""  # the first bytes so far, too few to tell
        self.sniffing: asyncio.TimerHandle | None = None
        self.ahead: Destination | None = None  # connected to while sniffing, before a verdict
        self.ready: asyncio.Transport | None = None  # ... that connection, open, not linked
        self.dropped = False  # the verdict was HTTP: the connection opened ahead is not used
        self.destination: Destination | None = None  # where it went, once counted
        self.wall = 0.0  # when it was counted (epoch seconds), for its access-log line
        self.received_n = self.sent_n = 0  # this connection's own bytes, each way

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop: no subclass
        original = self.resolve()
        if original is not None:
            self.route(self.forwarder.chooser(original))

    def resolve(self) -> Address | None:
        """The captured connection's original destination; None (and dropped) if there is
        none, or if it is the proxy itself."""
        fwd = self.forwarder
        transport = self.transport
        try:
            original = fwd.resolver(transport.get_extra_info("socket"))
        except (OSError, ValueError):
            fwd.stats.error(fwd.direction, "original_dst")
            transport.abort()
            return None
        if is_proxy_address(original, transport.get_extra_info("sockname"), fwd.proxy_ports):
            fwd.stats.error(fwd.direction, "loop")
            transport.abort()
            return None
        return original

    def route(self, chosen: Route | None, first: bytes = b"") -> None:
        """Carry out ``chosen``; ``first``: bytes already read from the client, inside the
        ``data_received`` that counts them."""
        fwd = self.forwarder
        transport = self.transport
        if chosen is None or type(chosen) is Refused:
            fwd.stats.error(fwd.direction, "no_route" if chosen is None else chosen.kind)
            transport.abort()
            return
        if type(chosen) is Destination:
            self._start(chosen, [first] if first else None)
        elif type(chosen) is Handoff:
            chosen.take(transport, first)
        else:
            assert isinstance(chosen, Sniff)
            self.sniff = chosen
            self.counters = UNCOUNTED  # counted once the verdict is in
            self.forward = self._sniff_data
            fwd.connections.add(self)
            self.sniffing = asyncio.get_running_loop().call_later(
                SNIFF_TIMEOUT, self._sniff_timeout)
            if first:
                self._sniff_data(first)
            if self.sniff is not None and chosen.key not in fwd.speaks_http:
                self._connect_ahead(chosen)

    def _connect_ahead(self, sniff: Sniff) -> None:
        """While the client's first bytes are awaited, connect to where TCP would go: a server
        that speaks first is heard at once. Nothing is counted before the verdict."""
        destination = sniff.tcp()
        if type(destination) is not Destination:  # refused or no route: told by the verdict
            return
        self.ahead = destination
        self.connecting = asyncio.get_running_loop().create_task(self._connect(destination))

    def _start(self, destination: Destination, early: list[bytes] | None = None) -> None:
        """Connect to ``destination``, then pump bytes."""
        transport = self.transport
        fwd = self.forwarder
        counters = self.counters = fwd.stats.tcp(destination.labels)
        counters.opened += 1
        self.destination = destination
        self.wall = time.time()
        self.received_n = self.sent_n = 0  # what came before (a TLS handshake) is not its own
        fwd.connections.add(self)
        # Hold the client until the destination answers. uvloop starts reading only after
        # connection_made returns, so the first chunk may still come: _hold keeps it.
        transport.pause_reading()
        self.early = early
        self.forward = self._hold
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self.ahead is not None:  # connected (or connecting) to it already
            self.ahead = None
            if self.upstream is not None:
                self.upstream.counters = counters
            ready, self.ready = self.ready, None
            if ready is not None:
                self._link(ready)
            return
        self.connecting = asyncio.get_running_loop().create_task(self._connect(destination))

    def _sniff_data(self, data: bytes) -> None:
        buf = self.sniffed + data if self.sniffed else data
        verdict = sniff_http(buf)
        if verdict is None:
            self.sniffed = buf
            return
        self._sniffed(verdict, buf, len(buf) - len(data))  # data_received counts ``data``

    def _sniff_timeout(self) -> None:
        self.sniffing = None
        self._sniffed(False, self.sniffed, len(self.sniffed))

    def server_first(self, data: bytes) -> None:
        """The destination connected ahead spoke before the client said what it speaks: not
        HTTP (a client-first protocol). TCP, and ``data`` goes to the client now."""
        if self.sniff is not None:
            self.forwarder.speaks_http.discard(self.sniff.key)
            self._sniffed(False, self.sniffed, len(self.sniffed))
        upstream = self.upstream
        if upstream is not None:
            upstream.forward = self.transport.write
        self.transport.write(data)

    def _sniffed(self, is_http: bool, first: bytes, uncounted: int) -> bool:
        """The verdict is in: hand over to HTTP, or connect TCP with ``first`` to send first.

        Returns False when the connection was refused (no endpoint)."""
        if self.sniffing is not None:
            self.sniffing.cancel()
            self.sniffing = None
        sniff = self.sniff
        assert sniff is not None
        self.sniff = None
        self.sniffed = b""
        fwd = self.forwarder
        if is_http:
            fwd.connections.discard(self)
            fwd.speaks_http.add(sniff.key)
            self._drop_ahead()
            sniff.http.take(self.transport, first)
            return True
        destination = self.ahead or sniff.tcp()
        if destination is None or type(destination) is Refused:
            fwd.connections.discard(self)
            fwd.stats.error(fwd.direction,
                            "no_route" if destination is None else destination.kind)
            self.counters = None
            self.transport.abort()
            return False
        assert isinstance(destination, Destination)
        self._start(destination, [first] if first else None)
        self.counters.received += uncounted  # type: ignore[union-attr]
        self.received_n += uncounted
        return True

    def _drop_ahead(self) -> None:
        """The connection opened ahead is not wanted (HTTP, or the client left): closed
        cleanly once open, its protocol cut off from the client's transport."""
        if self.ahead is None:
            return
        self.ahead = None
        self.dropped = True
        upstream = self.upstream
        if upstream is not None:
            upstream.peer = None
            upstream.forward = _drop
        ready, self.ready = self.ready, None
        if ready is not None:
            Unused(ready)
        # still connecting: _connect lets it go once it is open

    async def _connect(self, destination: Destination) -> None:
        fwd = self.forwarder
        loop = asyncio.get_running_loop()
        tls = fwd.tls
        peer = destination.peer
        context = tls.client_tcp if tls is not None and peer is not None else None
        try:
            async with asyncio.timeout(fwd.connect_timeout):
                if context is None or peer is None:
                    upstream_transport, _ = await loop.create_connection(
                        lambda: Upstream(self), destination.host, destination.port)
                else:
                    link = await connect_peer(context, destination.host, destination.port, peer,
                                              destination.sni)
                    if self.dropped:  # opened ahead for nothing
                        self.connecting = None
                        Unused(link)
                        return
                    link.attach(Upstream(self))
                    if destination.preamble:  # inside the mTLS, before the client's bytes
                        link.write(destination.preamble)
                    upstream_transport = link
        except TimeoutError:
            kind = "connect_timeout"
        except PeerIdentityError:
            kind = "tls_peer"
        except ssl.SSLError:
            kind = "tls_handshake"
        except OSError:
            kind = "connect_failed"
        else:
            self.connecting = None
            if self.dropped:
                Unused(upstream_transport)
            elif self.sniff is not None:  # opened ahead: linked once the verdict is TCP
                self.ready = upstream_transport
            else:
                self._link(upstream_transport)
            return
        self.connecting = None
        if self.sniff is not None or self.dropped:  # opened ahead: the verdict tries again
            self.ahead = None
            return
        fwd.stats.error(fwd.direction, kind)
        self.transport.abort()

    def _link(self, upstream_transport: asyncio.Transport) -> None:
        upstream = self.upstream
        if upstream is None or self.transport.is_closing():  # the client left meanwhile
            upstream_transport.abort()
            return
        self.peer = upstream
        upstream.counters = self.counters  # type: ignore[assignment]
        upstream.forward = self.transport.write
        self.forward = write = upstream.transport.write
        if self.forwarder.tcp_idle:
            self.watch = IdleWatch(self, upstream, self.forwarder.tcp_idle, self._idle)
        early, self.early = self.early, None
        for data in early or ():
            write(data)
        if not self.eof_in:
            self.transport.resume_reading()
            return
        upstream.eof_out = True  # the client finished before we were connected
        upstream.transport.write_eof()
        if upstream.eof_in:
            upstream.transport.close()

    def _idle(self) -> None:
        fwd = self.forwarder
        fwd.stats.error(fwd.direction, "tcp_idle_timeout")
        self.abort()

    def _hold(self, data: bytes) -> None:
        if self.early is None:
            self.early = []
        self.early.append(data)
        self.transport.pause_reading()

    def pause_writing(self) -> None:
        # The destination's first bytes may fill our buffer before _link: ask it to wait too.
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.sniff is not None:  # the client ended before saying enough: decide now
            self.eof_in = True
            first = self.sniffed
            is_http = bool(sniff_http(first))
            if not self._sniffed(is_http, first, len(first)):
                return False
            if is_http:  # the HTTP path owns the transport now: it sees the FIN too
                protocol = cast(asyncio.Protocol, self.transport.get_protocol())
                return bool(protocol.eof_received())
            return True
        if self.peer is None:  # still connecting: passed on by _link
            self.eof_in = True
            return True
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        self.moved = True
        self.forward(data)
        self.counters.received += len(data)  # type: ignore[union-attr]
        self.received_n += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sniff is not None:  # gone before its first bytes told what it speaks
            if self.sniffing is not None:
                self.sniffing.cancel()
            self.forwarder.connections.discard(self)
            self._drop_ahead()
            return
        counters = self.counters
        if counters is None:  # refused before it was counted
            return
        counters.closed += 1
        fwd = self.forwarder
        fwd.connections.discard(self)
        observer = fwd.observer
        if observer is not None and observer.logging and self.destination is not None:
            self._log(observer, self.destination, exc)
        if self.watch is not None:
            self.watch.cancel()
        if exc is not None:
            fwd.stats.error(fwd.direction, "reset")
        if self.connecting is not None:
            self.connecting.cancel()
        if self.peer is None and self.upstream is not None:  # connected but never linked
            self.upstream.transport.abort()
        self._lost(exc)

    def _log(self, observer: Observer, destination: Destination, exc: Exception | None) -> None:
        labels = destination.labels
        transport = self.transport
        observer.tcp(
            wall=self.wall, received=self.received_n, sent=self.sent_n,
            flags=UPSTREAM_RESET if exc is not None else NO_FLAGS,
            upstream=f"{destination.host}:{destination.port}",
            cluster=cluster_name(self.forwarder.direction, destination.port,
                                 labels.destination.version, labels.destination_service_name),
            local=address_text(transport.get_extra_info("sockname")),
            remote=address_text(transport.get_extra_info("peername")),
            reporter=labels.reporter, source=labels.source,
            service=labels.destination_service_name, destination=labels.destination,
            security=labels.connection_security_policy)

    def abort(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
        if self.sniffing is not None:
            self.sniffing.cancel()
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.transport.abort()
        if self.ready is not None:
            self.ready.abort()
        self.transport.abort()


def _drop(data: bytes) -> None:
    """Where the bytes of a connection nobody reads go."""


class Unused(asyncio.Protocol):
    """A connection opened ahead and not used, let go cleanly: our FIN goes at once, what
    comes is dropped, and it closes when the other end has closed too (a close, not a reset
    that either end would count), or after ``UNUSED_LINGER`` seconds."""

    __slots__ = ("timer",)

    def __init__(self, transport: asyncio.Transport) -> None:
        self.timer = asyncio.get_running_loop().call_later(UNUSED_LINGER, transport.abort)
        if isinstance(transport, TlsLink):
            transport.adopt(self)  # records it held already are read (and dropped) too
        else:
            transport.set_protocol(self)
        if transport.is_closing():
            return
        transport.write_eof()
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # both directions have ended: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


class Pipe(_Side):
    """One end of a plain byte pipe between two open transports (an upgraded HTTP connection)."""

    __slots__ = ("owner", "watch", "ends", "broken")

    def __init__(self, transport: asyncio.Transport, owner: set[asyncio.Protocol],
                 ends: PipeEnds | None = None, broken: str = "") -> None:
        self.transport = transport
        self.peer = None
        self.eof_in = self.eof_out = self.moved = False
        self.owner = owner
        self.watch: IdleWatch | None = None
        self.ends = ends
        self.broken = broken  # the flag of this end ending in an error

    def data_received(self, data: bytes) -> None:
        self.moved = True
        self.forward(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.discard(self)
        if self.watch is not None:
            self.watch.cancel()
        if self.ends is not None:
            self.ends.lost(self.broken if exc is not None else "")
        self._lost(exc)


class PipeEnds:
    """Tells ``ended`` once both ends of a pipe are closed: the flag of the first end that
    broke (a reset), or ``-`` when both closed cleanly."""

    __slots__ = ("left", "flags", "ended")

    def __init__(self, ended: Callable[[str], object]) -> None:
        self.left = 2
        self.flags = NO_FLAGS
        self.ended = ended

    def lost(self, flag: str) -> None:
        if flag and self.flags == NO_FLAGS:
            self.flags = flag
        self.left -= 1
        if self.left == 0:
            self.ended(self.flags)


class Held(asyncio.Protocol):
    """The protocol of a connection opened before its splice (a gateway's, to where it
    forwards): keeps what the far end says meanwhile, for ``splice``'s ``b_first``."""

    def __init__(self) -> None:
        self.first = bytearray()

    def data_received(self, data: bytes) -> None:
        self.first += data


def abort_pipes(pipes: set[asyncio.Protocol]) -> None:
    """Abort every spliced connection of ``pipes`` (a gateway's, at its shutdown)."""
    for pipe in list(pipes):
        transport = getattr(pipe, "transport", None)
        if transport is not None:
            transport.abort()


def splice(a: asyncio.Transport, b: asyncio.Transport, a_first: bytes, b_first: bytes,
           owner: set[asyncio.Protocol], idle_timeout: float = 0.0,
           ended: Callable[[str], object] | None = None) -> tuple[Pipe, Pipe]:
    """Join two open transports into a flow-controlled pipe; ``a_first`` (read from ``a``
    already) goes to ``b`` first, ``b_first`` to ``a``. Both ends are kept in ``owner``;
    with ``idle_timeout``, both are closed once neither carried a byte for that long.
    ``ended`` is told once both are closed, with ``DC`` if ``a`` (the downstream) broke
    first, ``UC`` if ``b`` (the upstream) did, else ``-``. Returns both ends (their
    ``forward`` may be wrapped, to count)."""
    ends = PipeEnds(ended) if ended is not None else None
    pa, pb = Pipe(a, owner, ends, DOWNSTREAM_CLOSED), Pipe(b, owner, ends, UPSTREAM_RESET)
    pa.peer, pb.peer = pb, pa
    pa.forward, pb.forward = b.write, a.write
    owner.add(pa)
    owner.add(pb)
    if idle_timeout:
        def expire() -> None:
            a.abort()
            b.abort()

        pa.watch = pb.watch = IdleWatch(pa, pb, idle_timeout, expire)
    a.set_protocol(pa)
    b.set_protocol(pb)
    if a_first:
        b.write(a_first)
    if b_first:
        a.write(b_first)
    a.resume_reading()
    b.resume_reading()
    return pa, pb


UNCOUNTED = TcpCounters()  # what a connection's bytes add to before it has its own counters


class IdleWatch:
    """Ends a connected pair once neither side carried a byte for ``timeout`` seconds.

    A read only sets its side's ``moved``; one timer per pair wakes every quarter of the
    timeout, so the pair is closed between 1 and 1.25 times the timeout after its last byte,
    and a busy pair costs four timer handles per timeout, not one per read.
    """

    __slots__ = ("a", "b", "timeout", "expire", "quiet_since", "timer")

    def __init__(self, a: _Side, b: _Side, timeout: float, expire: Callable[[], object]) -> None:
        self.a, self.b = a, b
        self.timeout = timeout
        self.expire = expire
        loop = asyncio.get_running_loop()
        self.quiet_since = now = loop.time()
        self.timer: asyncio.TimerHandle | None = loop.call_at(now + timeout / 4, self._tick)

    def _tick(self) -> None:
        self.timer = None
        a, b = self.a, self.b
        loop = asyncio.get_running_loop()
        now = loop.time()
        if a.moved or b.moved:
            a.moved = b.moved = False
            self.quiet_since = now
        elif now >= self.quiet_since + self.timeout:
            self.expire()
            return
        self.timer = loop.call_at(min(now + self.timeout / 4, self.quiet_since + self.timeout),
                                  self._tick)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Upstream(_Side):
    """The proxy's own connection to the chosen destination."""

    __slots__ = ("counters", "down")

    def __init__(self, downstream: Downstream) -> None:
        self.peer = downstream
        self.down = downstream  # kept when ``peer`` is let go: its bytes are its own
        self.eof_in = self.eof_out = self.moved = False
        self.counters: TcpCounters = downstream.counters  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        downstream = self.peer
        assert isinstance(downstream, Downstream)
        if downstream.dropped:  # opened ahead, and the verdict was HTTP: nobody reads it
            self.peer = None
            self.forward = _drop
            return
        # opened ahead of the verdict: the first bytes from here mean TCP (server_first)
        self.forward = (downstream.transport.write if downstream.sniff is None
                        else downstream.server_first)
        downstream.upstream = self

    def data_received(self, data: bytes) -> None:
        self.moved = True
        self.forward(data)
        self.counters.sent += len(data)
        self.down.sent_n += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        downstream = self.peer
        if downstream is None:  # opened ahead and dropped
            return
        if exc is not None:
            assert isinstance(downstream, Downstream)
            downstream.forwarder.stats.error(downstream.forwarder.direction, "reset")
        self._lost(exc)
