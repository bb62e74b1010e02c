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
import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httptools

from composemesh.ca.tls import (
    HANDSHAKE_TIMEOUT,
    MESH_ALPN_HTTP,
    MESH_ALPN_TCP,
    TLS_RECORD,
    is_tls_client_hello,
    peer_spiffe,
)
from composemesh.model.limits import ProxyLimits
from composemesh.model.policy import Policy, authorize, request_path
from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset
from composemesh.model.snapshot import Snapshot, SnapshotError
from composemesh.proxy.decisions import (
    STRICT,
    Endpoint,
    LocalNetwork,
    admits_plaintext,
)
from composemesh.proxy.http import (
    Exchange,
    HttpDownstream,
    OutboundHttp,
)
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.original_dst import Address
from composemesh.proxy.stats import (
    BAD_REQUEST,
    INBOUND,
    MUTUAL_TLS,
    NO_SECURITY,
    RBAC_DENIED,
    REPORTER,
    PeerLabels,
    ProxyStats,
    TcpLabels,
)
from composemesh.proxy.table import HTTP, TCP, ServiceProtocols
from composemesh.proxy.tcp import (
    UNCOUNTED,
    Destination,
    Downstream,
    Forwarder,
    Handoff,
    Refused,
    Route,
    ServiceState,
    Sniff,
)
from composemesh.proxy.tls_link import TlsLink

FIRST_BYTES_TIMEOUT = 0.1  # seconds to wait for a client's first bytes (server-first: none)
SOURCE_SWEEP = 10.0  # seconds between sweeps of closed connections out of the per-source count

_BY_ALPN = {MESH_ALPN_HTTP: HTTP, MESH_ALPN_TCP: TCP}  # what a client proxy says it carries

# Inbound requests go to the one local app: one try, no timeout of the proxy's own.
_INBOUND_ROUTE = HttpRoute(name="inbound", matches=(), destinations=(WeightedSubset("local", 1),))


@dataclass(frozen=True)
class InboundConfig:
    """What one snapshot says about letting peers in: decoded whole, or a NACK."""

    me: PeerLabels
    node: str
    trust_domain: str = ""
    mode: str = STRICT
    policies: tuple[Policy, ...] = ()
    published: frozenset[int] = frozenset()
    networks: tuple[LocalNetwork, ...] = ()
    protocols: ServiceProtocols = ServiceProtocols()

    @property
    def paths_checked(self) -> bool:
        """Whether a policy matches on paths: then requests carry the path it checked."""
        return any(op.paths for policy in self.policies for op in policy.operations)


def inbound_config(snapshot: Snapshot, me: PeerLabels,
                   protocols: ServiceProtocols) -> InboundConfig:
    """The inbound settings of ``snapshot``; SnapshotError naming the first bad field."""
    settings = snapshot.settings
    networks = []
    for i, net in enumerate(settings.networks):
        try:
            networks.append(LocalNetwork(ipaddress.ip_network(net.subnet, strict=False),
                                         net.gateway))
        except ValueError as exc:
            raise SnapshotError(f"$.settings.networks[{i}].subnet: {exc}") from None
    return InboundConfig(
        me=me,
        node=snapshot.identity.node,
        trust_domain=settings.trust_domain,
        mode=settings.mtls_mode,
        policies=settings.policies.get(snapshot.identity.service, ()),
        published=frozenset(settings.published_ports),
        networks=tuple(networks),
        protocols=protocols,
    )


class InboundRouter:
    """One snapshot's inbound decisions: admit, authorize, and which path (TCP or HTTP)."""

    def __init__(self, config: InboundConfig, http: InboundHttp | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.me = config.me
        self.http = http
        self.state = ServiceState(
            ServiceRouting(service=config.me.app, routes=(_INBOUND_ROUTE,), outlier=None),
            rng or random.Random())
        self.paths_checked = config.paths_checked
        self._labels: dict[tuple[str | None, bool], TcpLabels] = {}

    def admits(self, port: int, source: str) -> bool:
        c = self.config
        return admits_plaintext(c.mode, port, source, c.published, c.networks)

    def decide(self, original: Address, peer: str | None, secure: bool,
               offered: str | None = None) -> Route:
        """Where a let-in connection from ``peer`` (its mesh service; None: unauthenticated)
        to ``original`` goes: TCP (authorized here, whole), HTTP (per request), or sniff.
        ``offered``: the ALPN protocol of its mTLS, what the client proxy says it carries
        (the port's declared protocol, where there is one, comes first)."""
        port = original[1]
        protocol = self.config.protocols.at(port)
        if protocol is None and offered is not None:
            protocol = _BY_ALPN.get(offered)
        http = self.http
        if protocol == TCP or http is None:
            return self.tcp(original, peer, secure)
        handoff = http.entry(original, peer, secure)
        if protocol == HTTP:
            return handoff
        return Sniff(handoff, partial(self.tcp, original, peer, secure), original)

    def tcp(self, original: Address, peer: str | None, secure: bool) -> Destination | Refused:
        if not authorize(self.config.policies, peer, None, None).allowed:
            return Refused("rbac_denied")
        return Destination(original[0], original[1], self.labels(peer, secure))

    def labels(self, peer: str | None, secure: bool) -> TcpLabels:
        key = (peer, secure)
        labels = self._labels.get(key)
        if labels is None:
            me = self.me
            labels = self._labels[key] = TcpLabels(
                reporter=REPORTER[INBOUND],
                source=self.source(peer),
                destination=me,
                destination_service=me.app,
                destination_service_name=me.app,
                destination_service_namespace=me.namespace,
                connection_security_policy=MUTUAL_TLS if secure else NO_SECURITY,
            )
        return labels

    def source(self, peer: str | None) -> PeerLabels:
        """How the metrics name the peer: its mesh service and principal, if it proved them."""
        if peer is None:
            return PeerLabels()
        ns = self.me.namespace
        return PeerLabels(namespace=ns, app=peer,
                          principal=f"spiffe://{self.config.trust_domain}/ns/{ns}/sa/{peer}")


class InboundDownstream(Downstream):
    """A captured inbound connection: first bytes, then mTLS or plaintext, then the app."""

    __slots__ = ("original", "waiting", "held")

    def __init__(self, forwarder: InboundForwarder) -> None:
        super().__init__(forwarder)
        self.original: Address = ("", 0)
        self.waiting: asyncio.TimerHandle | None = None
        self.held = b""  # a lone first byte that may start a ClientHello

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        fwd = self.forwarder
        assert isinstance(fwd, InboundForwarder)
        if not fwd.admit(self.transport):
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

    def _router(self) -> InboundRouter:
        fwd = self.forwarder
        assert isinstance(fwd, InboundForwarder)
        return fwd.router

    def _plaintext(self, first: bytes) -> None:
        fwd = self.forwarder
        assert isinstance(fwd, InboundForwarder)
        router = fwd.router
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
        peer = tls.source_service(peer_spiffe(link.sslobj)) if tls is not None else None
        if peer is None:  # a good chain, but not an identity of this mesh's project
            fwd.stats.error(fwd.direction, "tls_peer")
            link.abort()
            return
        self.transport = link
        link.adopt(self)
        self.route(self._router().decide(self.original, peer, True,
                                         link.sslobj.selected_alpn_protocol()))

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
    """The inbound listener's data path (port 15006); ``router`` is swapped per snapshot."""

    def __init__(self, stats: ProxyStats, router: InboundRouter, *, tls: MeshTls | None,
                 ca_offered: Callable[[], bool | None] = lambda: None, **kwargs: Any) -> None:
        super().__init__(INBOUND, stats, _no_chooser, tls=tls, **kwargs)
        self.router = router
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


def _no_chooser(original: Address) -> Route | None:  # inbound decides through its router
    return None


# --------------------------------------------------------------------------- HTTP


class InboundHttp(OutboundHttp):
    """The HTTP side of the inbound listener: authorize each request, carry it to the app."""

    direction = INBOUND

    def __init__(self, stats: ProxyStats, router: InboundRouter | None = None,
                 limits: ProxyLimits = ProxyLimits()) -> None:  # noqa: B008 (frozen)
        super().__init__(stats, limits=limits)
        self.inbound: InboundRouter | None = router
        self.escaped_slashes = limits.path_with_escaped_slashes_action

    def entry(self, original: Address, peer: str | None, secure: bool) -> Handoff:  # type: ignore[override]
        return Handoff(partial(self._take_inbound, original, peer, secure))

    def _take_inbound(self, original: Address, peer: str | None, secure: bool,
                      transport: asyncio.Transport, first: bytes) -> None:
        downstream = InboundHttpDownstream(self, original, peer, secure)
        transport.set_protocol(downstream)
        downstream.connection_made(transport)
        if first:
            downstream.data_received(first)


class InboundHttpDownstream(HttpDownstream):
    """A peer's HTTP connection into this workload, its source known (or not) once."""

    __slots__ = ("peer", "secure", "endpoint")
    rewrites_target = True  # request_target normalizes paths where policies check them

    def __init__(self, http: InboundHttp, original: Address, peer: str | None,
                 secure: bool) -> None:
        router = http.inbound
        assert router is not None
        super().__init__(http, router.me.app, original[1])
        self.peer = peer
        self.secure = secure
        # the app, at the address the peer dialed (it may listen on that address only)
        self.endpoint = Endpoint(node=router.config.node, version=router.me.version,
                                 address=original[0])

    def request_target(self, url: bytes, path: str) -> tuple[bytes, str]:
        """Where a policy matches on paths, the normalized path (``request_path``), also in
        the request line sent to the app (in origin-form, the query kept as it came); ""
        for a path refused (400 when its turn comes)."""
        http = self.http
        assert isinstance(http, InboundHttp) and http.inbound is not None
        if not http.inbound.paths_checked or url == b"*":
            return url, path
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
        normal = request_path(path, http.escaped_slashes)
        if normal is None:
            return url, ""
        if normal == path and url[:1] == b"/":
            return url, path
        return normal.encode("latin-1") + query, normal

    def count_refused(self, status: int, flags: str) -> None:
        http = self.http
        assert isinstance(http, InboundHttp) and http.inbound is not None
        router = http.inbound
        http.stats.http_inbound_request(router.source(self.peer), router.me, status, flags,
                                        MUTUAL_TLS if self.secure else NO_SECURITY, 0.0, 0, 0)


class InboundExchange(Exchange):
    """One request into the workload: authorized, then one try to the app."""

    __slots__ = ()

    def dispatch(self) -> None:
        self.dispatched = True
        down = self.down
        assert isinstance(down, InboundHttpDownstream)
        http = down.http
        assert isinstance(http, InboundHttp) and http.inbound is not None
        router = http.inbound  # the one in force now: policy changes apply to the next request
        if not self.path:  # an escaped slash, a fragment, an encoded NUL (request_path)
            self.local(400, b"", BAD_REQUEST)
            return
        decision = authorize(router.config.policies, down.peer, self.method, self.path)
        if not decision.allowed:
            self.local(403, decision.reason.encode(), RBAC_DENIED)
            return
        self.state = router.state
        self.route = _INBOUND_ROUTE
        self._go(None)

    def _pick(self) -> Endpoint | None:
        down = self.down
        assert isinstance(down, InboundHttpDownstream)
        return down.endpoint

    def _peer(self) -> str | None:
        return None  # the app is in this namespace: plaintext

    def _record(self) -> None:
        down = self.down
        assert isinstance(down, InboundHttpDownstream)
        http = down.http
        assert isinstance(http, InboundHttp) and http.inbound is not None
        router = http.inbound
        http.stats.http_inbound_request(
            router.source(down.peer), router.me, self.status, self.flags,
            MUTUAL_TLS if down.secure else NO_SECURITY,
            (asyncio.get_running_loop().time() - self.started) * 1000.0,
            len(self.head) + self.body_size, self.response_size)


InboundHttpDownstream.exchange_type = InboundExchange

