"""The inbound data path: who the peer is (mTLS or plaintext), whether it may come in, to the app.

A connection captured on its way to the app (port 15006) is held until its first bytes:

- a TLS ClientHello: the proxy terminates mutual TLS (``TlsLink``) with its workload
  certificate; the peer must present a certificate of the mesh's root, and the service its
  SPIFFE ID names is the connection's source, and the protocol the client proxy offered in
  ALPN (``composemesh-http/1.1`` or ``composemesh-tcp``) is what the connection carries, so
  that a port whose protocol is not declared is not detected a second time (a server-first
  protocol would wait for that);
- anything else (or nothing within ``FIRST_BYTES_TIMEOUT``, a server-first protocol):
  plaintext, let in only as ``admits_plaintext`` says (STRICT refuses it from the mesh's
  networks, PERMISSIVE lets it in); its source is unauthenticated.

Then, per the snapshot's authorization policies for this service (``model.policy``): a TCP
port's connection is allowed or closed whole; an HTTP port's requests are each allowed or
answered 403 with the reason. What is allowed goes to the app at the connection's original
destination, in plaintext, inside the namespace. When the policies match on paths, each
request's path is normalized once (``request_path``): the policy checks it and the app
receives it, the request line rewritten; escaped slashes are refused (400) or kept as the
limits say.

No source address holds more than ``max_connections_per_source`` connections at once: the
next is closed as it is accepted (counted as ``source_limit``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

from composemesh.ca.tls import (
    HANDSHAKE_TIMEOUT,
    TLS_RECORD,
    is_tls_client_hello,
    peer_spiffe,
    peer_workload,
)
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.original_dst import Address
from composemesh.proxy.router import RouterSwitch
from composemesh.proxy.stats import (
    INBOUND,
    ProxyStats,
)
from composemesh.proxy.tcp import (
    UNCOUNTED,
    Downstream,
    Forwarder,
    Route,
)
from composemesh.proxy.tls_link import TlsLink

FIRST_BYTES_TIMEOUT = 0.1  # seconds to wait for a client's first bytes (server-first: none)
SOURCE_SWEEP = 10.0  # seconds between sweeps of closed connections out of the per-source count

class InboundDownstream(Downstream):
    """A captured inbound connection: first bytes, then mTLS or plaintext, then the app."""

    __slots__ = ("inbound", "original", "waiting", "held")

    def __init__(self, forwarder: InboundForwarder) -> None:
        super().__init__(forwarder)
        self.inbound = forwarder  # typed as what it is: ``forwarder`` is the base's
        self.original: Address = ("", 0)
        self.waiting: asyncio.TimerHandle | None = None
        self.held = b""  # a lone first byte that may start a ClientHello

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.inbound.admit(self.transport):
            self.transport.abort()
            return
        original = self.resolve()
        if original is None:
            return
        self.original = original
        self.counters = UNCOUNTED
        self.forward = self._first_bytes
        self.forwarder.connections.add(self)
        self.waiting = asyncio.get_running_loop().call_later(FIRST_BYTES_TIMEOUT, self._silent)

    def _first_bytes(self, data: bytes) -> None:
        if self.held:
            data, self.held = self.held + data, b""
        if len(data) == 1 and data[0] == TLS_RECORD:
            self.held = data
            return
        self._stop_waiting()
        if is_tls_client_hello(data):
            self._tls(data)
        else:
            self._plaintext(data)

    def _silent(self) -> None:
        """No bytes yet: a server-first protocol (or a slow client), in plaintext."""
        self.waiting = None
        self._plaintext(self.held)

    def _stop_waiting(self) -> None:
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None

    def _plaintext(self, first: bytes) -> None:
        fwd = self.inbound
        router = fwd.switch.current.inbound
        source = self.transport.get_extra_info("peername") or ("", 0)
        fwd.connections.discard(self)
        # inside data_received, which counts ``first`` on the counters in force when it ends
        self.counters = UNCOUNTED
        if fwd.ca_offered() is not False and not router.admits(self.original[1], str(source[0])):
            fwd.stats.error(fwd.direction, "plaintext_refused")
            self.transport.abort()
            return
        self.route(router.decide(self.original, None, False), first)

    def _tls(self, first: bytes) -> None:
        fwd = self.forwarder
        tls = fwd.tls
        if tls is None or tls.server is None:  # no certificate yet: nothing to answer with
            fwd.connections.discard(self)
            self.counters = None
            fwd.stats.error(fwd.direction, "tls_handshake")
            self.transport.abort()
            return
        link = TlsLink(tls.server, server_side=True, handshake_timeout=HANDSHAKE_TIMEOUT)
        raw = self.transport
        raw.set_protocol(link)
        link.connection_made(raw)
        link.data_received(first)
        link.handshake.add_done_callback(partial(self._handshaken, link))

    def _handshaken(self, link: TlsLink, done: asyncio.Future[None]) -> None:
        fwd = self.forwarder
        fwd.connections.discard(self)
        self.counters = None
        if done.cancelled() or done.exception() is not None:
            fwd.stats.error(fwd.direction, "tls_handshake")
            link.abort()
            return
        tls = fwd.tls
        sslobj = link.sslobj
        peer = tls.source_service(peer_spiffe(sslobj)) if tls is not None else None
        if peer is None:  # a good chain, but not an identity of this mesh's project
            fwd.stats.error(fwd.direction, "tls_peer")
            link.abort()
            return
        self.transport = link
        link.adopt(self)
        router = self.inbound.switch.current.inbound
        self.route(router.decide(self.original, peer, True, sslobj.selected_alpn_protocol(),
                                 router.source(peer, peer_workload(sslobj))))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiting is not None:
            self._stop_waiting()  # gone before saying anything
            self.forwarder.connections.discard(self)
            return
        super().connection_lost(exc)

    def abort(self) -> None:
        self._stop_waiting()
        super().abort()


class InboundForwarder(Forwarder):
    """The inbound listener's data path (port 15006): each connection is decided by the
    inbound router in force (``switch``) once its first bytes (or their absence) tell how
    it comes, not by the base's chooser, which nothing calls here."""

    def __init__(self, stats: ProxyStats, switch: RouterSwitch, *, tls: MeshTls | None,
                 ca_offered: Callable[[], bool | None] = lambda: None, **kwargs: Any) -> None:
        super().__init__(INBOUND, stats, _never_chosen, tls=tls, **kwargs)
        self.switch = switch
        # False when the pilot runs no CA: no peer can prove anything, so STRICT cannot hold
        # and plaintext is let in (a mesh without mTLS, as the routing tests run it)
        self.ca_offered = ca_offered
        self.source_limit = self.limits.max_connections_per_source
        # the transports accepted per source address; closed ones are dropped when a source
        # reaches the limit and by a sweep every SOURCE_SWEEP seconds
        self.by_source: dict[str, list[asyncio.BaseTransport]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> InboundDownstream:
        return InboundDownstream(self)

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Whether a connection just accepted fits its source's limit (counted if it does)."""
        limit = self.source_limit
        if not limit:
            return True
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else ""
        held = self.by_source.get(source)
        if held is None:
            self.by_source[source] = [transport]
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(SOURCE_SWEEP, self._sweep)
            return True
        if len(held) >= limit:
            held[:] = [t for t in held if not t.is_closing()]
            if len(held) >= limit:
                self.stats.error(INBOUND, "source_limit")
                return False
        held.append(transport)
        return True

    def _sweep(self) -> None:
        self._sweeper = None
        for source, held in list(self.by_source.items()):
            held[:] = [t for t in held if not t.is_closing()]
            if not held:
                del self.by_source[source]
        if self.by_source:
            self._sweeper = asyncio.get_running_loop().call_later(SOURCE_SWEEP, self._sweep)

    def abort_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        super().abort_all()


def _never_chosen(original: Address) -> Route | None:
    raise AssertionError("inbound connections are decided by the inbound router")
