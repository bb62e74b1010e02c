"""The TCP data path: accept a captured connection, choose its destination, pump bytes both ways.

The decisions are plain functions (``Chooser``, ``is_proxy_address``) that later issues replace
with routing; the protocols below only move bytes, apply flow control and count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, cast

from composemesh.model.wellknown import PROXY_PORTS
from composemesh.proxy.original_dst import Address, original_dst
from composemesh.proxy.stats import ProxyStats, TcpCounters, TcpLabels

CONNECT_TIMEOUT = 5.0  # seconds to reach a destination before the connection is dropped
WRITE_HIGH_WATER = 1024 * 1024  # a side stops reading its peer when its own buffer holds this
WRITE_LOW_WATER = 256 * 1024  # ... and starts again once the buffer drains below this

_LOCAL_HOSTS = frozenset({"0.0.0.0", "::", "::1"})


@dataclass(frozen=True, slots=True)
class Destination:
    """Where one captured connection goes, and the labels its metrics carry."""

    host: str
    port: int
    labels: TcpLabels


Chooser = Callable[[Address], "Destination | None"]  # original destination -> where to go
Resolver = Callable[[Any], Address]  # accepted socket -> its original destination


def passthrough(labels: TcpLabels) -> Chooser:
    """The chooser of plain TCP forwarding: every connection goes to its original destination."""

    def choose(original: Address) -> Destination:
        return Destination(original[0], original[1], labels)

    return choose


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
    ) -> None:
        self.direction = direction
        self.stats = stats
        self.chooser = chooser  # replaced whole when a new snapshot changes the decisions
        self.resolver = resolver
        self.connect_timeout = connect_timeout
        self.proxy_ports = frozenset(proxy_ports)
        self.connections: set[Downstream] = set()

    def __call__(self) -> Downstream:
        return Downstream(self)

    def abort_all(self) -> None:
        """Drop every connection at once (shutdown)."""
        for connection in list(self.connections):
            connection.abort()


class _Side(asyncio.Protocol):
    """One socket of a forwarded pair; what it reads goes to its peer, flow-controlled."""

    __slots__ = ("transport", "peer", "forward", "eof_in", "eof_out")

    transport: asyncio.Transport
    peer: _Side | None
    forward: Callable[[bytes], None]  # the peer transport's write
    eof_in: bool  # the remote end sent FIN
    eof_out: bool  # we sent FIN to the remote end

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

    __slots__ = ("forwarder", "counters", "connecting", "upstream", "early")

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder
        self.peer = None  # the Upstream, once connected and linked
        self.eof_in = self.eof_out = False
        self.counters: TcpCounters | None = None
        self.connecting: asyncio.Task[None] | None = None
        self.upstream: Upstream | None = None  # set as soon as it exists, linked or not
        self.early: list[bytes] | None = None  # what came before the destination answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop: no subclass
        fwd = self.forwarder
        try:
            original = fwd.resolver(transport.get_extra_info("socket"))
        except (OSError, ValueError):
            fwd.stats.error(fwd.direction, "original_dst")
            transport.abort()
            return
        if is_proxy_address(original, transport.get_extra_info("sockname"), fwd.proxy_ports):
            fwd.stats.error(fwd.direction, "loop")
            transport.abort()
            return
        destination = fwd.chooser(original)
        if destination is None:
            fwd.stats.error(fwd.direction, "no_route")
            transport.abort()
            return
        counters = self.counters = fwd.stats.tcp(destination.labels)
        counters.opened += 1
        fwd.connections.add(self)
        # Hold the client until the destination answers. uvloop starts reading only after
        # connection_made returns, so the first chunk may still come: _hold keeps it.
        transport.pause_reading()
        self.forward = self._hold
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.connecting = asyncio.get_running_loop().create_task(self._connect(destination))

    async def _connect(self, destination: Destination) -> None:
        fwd = self.forwarder
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(fwd.connect_timeout):
                upstream_transport, _ = await loop.create_connection(
                    lambda: Upstream(self), destination.host, destination.port)
        except TimeoutError:
            kind = "connect_timeout"
        except OSError:
            kind = "connect_failed"
        else:
            self.connecting = None
            self._link(upstream_transport)
            return
        self.connecting = None
        fwd.stats.error(fwd.direction, kind)
        self.transport.abort()

    def _link(self, upstream_transport: asyncio.Transport) -> None:
        upstream = self.upstream
        if upstream is None or self.transport.is_closing():  # the client left meanwhile
            upstream_transport.abort()
            return
        self.peer = upstream
        self.forward = write = upstream.transport.write
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
        if self.peer is None:  # still connecting: passed on by _link
            self.eof_in = True
            return True
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        self.forward(data)
        self.counters.received += len(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        counters = self.counters
        if counters is None:  # refused before it was counted
            return
        counters.closed += 1
        fwd = self.forwarder
        fwd.connections.discard(self)
        if exc is not None:
            fwd.stats.error(fwd.direction, "reset")
        if self.connecting is not None:
            self.connecting.cancel()
        if self.peer is None and self.upstream is not None:  # connected but never linked
            self.upstream.transport.abort()
        self._lost(exc)

    def abort(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        if self.upstream is not None:
            self.upstream.transport.abort()
        self.transport.abort()


class Upstream(_Side):
    """The proxy's own connection to the chosen destination."""

    __slots__ = ("counters",)

    def __init__(self, downstream: Downstream) -> None:
        self.peer = downstream
        self.eof_in = self.eof_out = False
        self.counters: TcpCounters = downstream.counters  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        downstream = self.peer
        assert isinstance(downstream, Downstream)
        self.forward = downstream.transport.write
        downstream.upstream = self

    def data_received(self, data: bytes) -> None:
        self.forward(data)
        self.counters.sent += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            downstream = self.peer
            assert isinstance(downstream, Downstream)
            downstream.forwarder.stats.error(downstream.forwarder.direction, "reset")
        self._lost(exc)
