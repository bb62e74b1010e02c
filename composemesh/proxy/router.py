"""Where a connection or request is routed: the routers of one snapshot, swapped as one.

A snapshot becomes two routers, built whole before anything changes (a snapshot that does
not decode is NACKed with nothing touched):

- ``Router``, outbound: a captured connection from the app to an address is passed through,
  sent over TCP to an endpoint of the mesh service at that address, handed to the HTTP path
  (which routes each request with it), or sniffed first; pickers and outlier state carry
  over from the previous router for services whose routing did not change;
- ``InboundRouter``: whether a peer may come in (mTLS mode, networks, published ports),
  which path its connection takes, and whether each request is authorized.

``RouterSwitch`` holds the pair in force (``Routers``); ``commit`` replaces it with one
assignment, and every reader (both capture listeners, both HTTP paths) reads it when a
connection is accepted or a request routed. The pure decisions they apply (route matching,
version weights, endpoint picking, faults) are in ``proxy.selection``; retries in
``proxy.retries``; policies in ``model.policy``.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial

from composemesh.ca.tls import MESH_ALPN_HTTP, MESH_ALPN_TCP
from composemesh.model.east_west import sni
from composemesh.model.egress import EgressHostSpec, EgressSettings
from composemesh.model.gateways import BLACK_HOLE_CLUSTER, REGISTRY_ONLY, match_route
from composemesh.model.ingress import IngressPath, IngressSettings
from composemesh.model.policy import Policy, authorize
from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset
from composemesh.model.snapshot import Snapshot, SnapshotError
from composemesh.model.wellknown import EGRESS_GATEWAY, EGRESS_PORT
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.original_dst import Address
from composemesh.proxy.retries import Answer
from composemesh.proxy.selection import (
    STRICT,
    Endpoint,
    EndpointPicker,
    LocalNetwork,
    OutlierDetector,
    admits_plaintext,
    pick_endpoint,
    pick_version,
)
from composemesh.proxy.stats import (
    BAD_REQUEST,
    INBOUND,
    MUTUAL_TLS,
    NO_SECURITY,
    OUTBOUND,
    RBAC_DENIED,
    REPORTER,
    UNKNOWN,
    PeerLabels,
    TcpLabels,
    passthrough_labels,
)
from composemesh.proxy.table import EMPTY_TABLE, HTTP, TCP, RoutingTable, ServiceProtocols
from composemesh.proxy.tcp import Destination, Handoff, Refused, Route, Sniff

HttpEntry = Callable[[str, int], Handoff]  # (mesh service, port) -> the HTTP path's handoff
# (original destination, peer's mesh service or None, mTLS or not) -> the inbound HTTP handoff
InboundHttpEntry = Callable[[Address, "str | None", bool, PeerLabels], Handoff]

@dataclass(frozen=True)
class EgressTable:
    """The external hosts of one snapshot by the addresses an app calls them at (the VIP its
    name resolves to, and its own address if the file gives one), and the policy."""

    by_address: Mapping[tuple[str, int], EgressHostSpec] = field(default_factory=dict)
    registry_only: bool = False
    hosts: Mapping[tuple[str, int], EgressHostSpec] = field(default_factory=dict)  # by name


def egress_table(settings: EgressSettings | None) -> EgressTable:
    if settings is None:
        return NO_EGRESS
    by_address: dict[tuple[str, int], EgressHostSpec] = {}
    for entry in settings.hosts:
        by_address[(entry.vip, entry.port)] = entry
        if entry.address is not None:
            by_address.setdefault((entry.address, entry.port), entry)
    return EgressTable(by_address, settings.policy == REGISTRY_ONLY,
                       {(e.host, e.port): e for e in settings.hosts})


NO_EGRESS = EgressTable()


class ServiceState:
    """What the data path keeps about one mesh service between connections and requests."""

    __slots__ = ("routing", "picker", "outlier", "needs_headers")

    def __init__(self, routing: ServiceRouting, rng: random.Random) -> None:
        self.routing = routing
        self.picker = EndpointPicker(routing.load_balancer, rng)
        self.outlier = OutlierDetector(routing.outlier)
        # Only routes that match on headers need the request's headers as a dict.
        self.needs_headers = any(m.headers for r in routing.routes for m in r.matches)


class Router:
    """One snapshot's outbound decisions: which path a connection takes, which endpoint.

    Built in full when a snapshot is prepared, swapped in on commit. Pickers and outlier
    state carry over from ``previous`` for services whose routing did not change.
    """

    def __init__(self, table: RoutingTable, me: PeerLabels, *, rng: random.Random | None = None,
                 http: HttpEntry | None = None, previous: Router | None = None,
                 tls: MeshTls | None = None, egress: EgressTable | None = None,
                 networks: tuple[LocalNetwork, ...] = (),
                 black_hole: HttpEntry | None = None) -> None:
        self.table = table
        self.me = me
        self.egress = egress or NO_EGRESS
        self.networks = networks  # this namespace's own (their subnets)
        self.black_hole = black_hole  # the HTTP path answering REGISTRY_ONLY's refusals
        self.tls = tls  # None: endpoints are reached in plaintext
        self.rng = rng or random.Random()
        self.http = http
        self.passthrough = passthrough_labels(OUTBOUND, me)
        self.services: dict[str, ServiceState] = {}
        old = previous.services if previous is not None else {}
        for service, routing in table.routing.items():
            state = old.get(service)
            if state is None or state.routing != routing:
                state = ServiceState(routing, self.rng)
            else:
                state.outlier.retain(table.service_endpoints.get(service, ()))
            self.services[service] = state
        self._tcp_labels: dict[tuple[str, Endpoint], TcpLabels] = {}

    def choose(self, original: Address) -> Route | None:
        """The outbound chooser: pass-through, TCP to an endpoint, HTTP, or sniff first."""
        host, port = original[0], original[1]
        table = self.table
        service = table.service_at(host)
        if service is None:
            return self.outside(host, port)
        protocol = table.protocol(service, port)
        http = self.http
        if protocol == TCP or http is None:
            return self.tcp_destination(service, port, host)
        if protocol == HTTP:
            return http(service, port)
        return Sniff(http(service, port), partial(self.tcp_destination, service, port, host),
                     (service, port))

    def outside(self, host: str, port: int) -> Route:
        """A call to an address of no mesh service: a listed external host (its VIP or its
        address) goes to the egress gateway over mTLS, the target named first inside it (a
        CONNECT line, as Istio's HBONE names it); under REGISTRY_ONLY anything else that is
        not on this namespace's own networks is refused (HTTP 502 saying why, other TCP
        closed; counted as BlackHoleCluster); else it passes through as without the mesh."""
        egress = self.egress
        entry = egress.by_address.get((host, port))
        if entry is not None:
            to = self.tcp_destination(EGRESS_GATEWAY, EGRESS_PORT)
            if to is None:
                return Refused("no_egress_gateway")
            return replace(to, labels=self.egress_labels(entry), preamble=b"CONNECT %s:%d "
                           b"HTTP/1.1\r\n\r\n" % (entry.host.encode(), entry.port))
        if egress.registry_only and not self.is_local(host):
            refused = Refused(BLACK_HOLE_CLUSTER)
            if self.black_hole is None:
                return refused
            return Sniff(self.black_hole(host, port), lambda: refused, (BLACK_HOLE_CLUSTER, port))
        return Destination(host, port, self.passthrough)

    def is_local(self, host: str) -> bool:
        """Whether ``host`` is on one of this namespace's networks, or loopback: not outside
        (non-meshed containers of the project stay reachable under REGISTRY_ONLY)."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address.is_loopback or any(address in n.subnet for n in self.networks)

    def egress_labels(self, entry: EgressHostSpec) -> TcpLabels:
        me = self.me
        return TcpLabels(
            reporter=REPORTER[OUTBOUND], source=me,
            destination=PeerLabels(workload=EGRESS_GATEWAY, namespace=me.namespace,
                                   app=EGRESS_GATEWAY,
                                   principal=(self.tls.expected(EGRESS_GATEWAY)
                                              if self.tls is not None else UNKNOWN)),
            destination_service=entry.host, destination_service_name=entry.host,
            destination_service_namespace=me.namespace, connection_security_policy=MUTUAL_TLS)

    def tcp_destination(self, service: str, port: int, host: str = "") -> Destination | None:
        """An endpoint of ``service`` for one TCP connection to ``host``. An address of a
        compose service that has a name of its own (``reviews-v2``, a pinned name) means that
        compose service: one of its instances, as an HTTP request with that ``Host`` would
        go. Else a version drawn by the weights of the default (last) route, then an
        endpoint of it by the load balancer."""
        state = self.services.get(service)
        if state is None:
            return None
        routes = state.routing.routes
        table = self.table
        pinned = table.pinned_at(host) if host and table.pinned_services else None
        if pinned:
            endpoints = pinned
        elif routes:
            version = pick_version(routes[-1], self.rng, table.serving_versions(service))
            endpoints = table.endpoints.get((service, version), ()) if version else ()
        else:
            endpoints = table.service_endpoints.get(service, ())
        endpoint = pick_endpoint(state.picker, endpoints, state.outlier.available(endpoints),
                                 local=table.local_of(endpoints)) if endpoints else None
        if endpoint is None:
            return None
        tls = self.tls
        peer = endpoint_peer(tls, service, endpoint) if tls is not None else None
        if not endpoint.remote:
            return Destination(endpoint.address, port, self.tcp_labels(service, endpoint), peer)
        # on another host: its east-west gateway, the target (the app's port) in the SNI;
        # or, outside the mesh, the instance itself in plain TCP
        return Destination(endpoint.address, endpoint.port or port,
                           self.tcp_labels(service, endpoint), peer,
                           sni=sni(port, endpoint.sni) if endpoint.sni and peer else None)

    def tcp_labels(self, service: str, endpoint: Endpoint) -> TcpLabels:
        key = (service, endpoint)
        labels = self._tcp_labels.get(key)
        if labels is None:
            me = self.me
            tls = self.tls
            namespace = me.namespace
            principal = tls.expected(service) if tls else UNKNOWN
            if endpoint.remote:
                principal = endpoint.peer or (UNKNOWN if endpoint.plaintext else principal)
                namespace = spiffe_namespace(endpoint.peer) or UNKNOWN
            labels = self._tcp_labels[key] = TcpLabels(
                reporter=REPORTER[OUTBOUND],
                source=me,
                destination=PeerLabels(workload=self.table.workload(endpoint),
                                       namespace=namespace, app=service,
                                       version=endpoint.version, principal=principal),
                destination_service=service,
                destination_service_name=service,
                destination_service_namespace=namespace,
            )
        return labels


def endpoint_peer(tls: MeshTls, service: str, endpoint: Endpoint) -> str | None:
    """The SPIFFE ID ``endpoint`` of ``service`` must prove: this project's ID of the service,
    or a remote instance's own; None for an instance outside the mesh (plain TCP)."""
    if not endpoint.remote:
        return tls.expected(service)
    return None if endpoint.plaintext else endpoint.peer or tls.expected(service)


def spiffe_namespace(spiffe: str) -> str:
    """The namespace (compose project) of ``spiffe://<td>/ns/<ns>/sa/<service>``; "" if none."""
    _, found, rest = spiffe.partition("/ns/")
    return rest.partition("/")[0] if found else ""


EMPTY_ROUTER = Router(EMPTY_TABLE, PeerLabels())




_BY_ALPN = {MESH_ALPN_HTTP: HTTP, MESH_ALPN_TCP: TCP}  # what a client proxy says it carries

# Inbound requests go to the one local app: one try, no timeout of the proxy's own.
INBOUND_ROUTE = HttpRoute(name="inbound", matches=(), destinations=(WeightedSubset("local", 1),))
_BAD_PATH = Answer(400, b"", BAD_REQUEST)


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

    def __init__(self, config: InboundConfig, http: InboundHttpEntry | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.me = config.me
        self.http = http
        self.state = ServiceState(
            ServiceRouting(service=config.me.app, routes=(INBOUND_ROUTE,), outlier=None),
            rng or random.Random())
        self.paths_checked = config.paths_checked
        self._labels: dict[tuple[PeerLabels, bool], TcpLabels] = {}
        self._sources: dict[tuple[str, tuple[str, str] | None], PeerLabels] = {}

    def admits(self, port: int, source: str) -> bool:
        c = self.config
        return admits_plaintext(c.mode, port, source, c.published, c.networks)

    def decide(self, original: Address, peer: str | None, secure: bool,
               offered: str | None = None, source: PeerLabels | None = None) -> Route:
        """Where a let-in connection from ``peer`` (its mesh service; None: unauthenticated)
        to ``original`` goes: TCP (authorized here, whole), HTTP (per request), or sniff.
        ``offered``: the ALPN protocol of its mTLS, what the client proxy says it carries
        (the port's declared protocol, where there is one, comes first). ``source``: how the
        metrics name the peer (``source``; by default from ``peer`` alone)."""
        if source is None:
            source = self.source(peer)
        port = original[1]
        protocol = self.config.protocols.at(port)
        if protocol is None and offered is not None:
            protocol = _BY_ALPN.get(offered)
        http = self.http
        if protocol == TCP or http is None:
            return self.tcp(original, peer, secure, source)
        handoff = http(original, peer, secure, source)
        if protocol == HTTP:
            return handoff
        return Sniff(handoff, partial(self.tcp, original, peer, secure, source), original)

    def refuses(self, peer: str | None, method: str, path: str) -> Answer | None:
        """The answer to an HTTP request from ``peer`` that may not come in, or None: 400 for
        a path ``request_path`` refused (""), 403 with the reason a policy denied it."""
        if not path:  # an escaped slash, a fragment, an encoded NUL
            return _BAD_PATH
        verdict = authorize(self.config.policies, peer, method, path)
        if not verdict.allowed:
            return Answer(403, verdict.reason.encode(), RBAC_DENIED)
        return None

    def tcp(self, original: Address, peer: str | None, secure: bool,
            source: PeerLabels | None = None) -> Destination | Refused:
        if not authorize(self.config.policies, peer, None, None).allowed:
            return Refused("rbac_denied")
        return Destination(original[0], original[1],
                           self.labels(source if source is not None else self.source(peer),
                                       secure))

    def labels(self, source: PeerLabels, secure: bool) -> TcpLabels:
        key = (source, secure)
        labels = self._labels.get(key)
        if labels is None:
            me = self.me
            labels = self._labels[key] = TcpLabels(
                reporter=REPORTER[INBOUND],
                source=source,
                destination=me,
                destination_service=me.app,
                destination_service_name=me.app,
                destination_service_namespace=me.namespace,
                connection_security_policy=MUTUAL_TLS if secure else NO_SECURITY,
            )
        return labels

    def source(self, peer: str | None, workload: tuple[str, str] | None = None) -> PeerLabels:
        """How the metrics name the peer: its mesh service and principal, if it proved them,
        and its workload and version as its certificate names them (``ca.tls.peer_workload``:
        the CA wrote them from what it attested). One value per peer, kept."""
        if peer is None:
            return UNKNOWN_SOURCE
        key = (peer, workload)
        labels = self._sources.get(key)
        if labels is None:
            ns, _, service = peer.rpartition("/")  # another project's: <project>/<service>
            ns = ns or self.me.namespace
            name, version = workload if workload is not None else (UNKNOWN, UNKNOWN)
            labels = self._sources[key] = PeerLabels(
                workload=name, namespace=ns, app=service, version=version,
                principal=f"spiffe://{self.config.trust_domain}/ns/{ns}/sa/{service}")
        return labels


UNKNOWN_SOURCE = PeerLabels()  # a peer that proved nothing (plaintext)
EMPTY_INBOUND = InboundRouter(InboundConfig(me=PeerLabels(), node=""))


@dataclass(frozen=True)
class IngressTable:
    """The ingress gateway's routes of one snapshot: by Host, the longest path prefix wins."""

    hosts: Mapping[str, tuple[IngressPath, ...]] = field(default_factory=dict)
    redirect_to_https: bool = False
    public_https_port: int | None = None

    def route(self, host: str, path: str) -> IngressPath | None:
        """Where a request for ``host`` (lower-case, no port) and ``path`` goes; None: 404."""
        routes = self.hosts.get(host)
        return match_route(routes, path) if routes else None

    def https_url(self, host: str, target: str) -> str:
        """The https URL of ``host`` and ``target`` (the request target), for a redirect."""
        port = self.public_https_port
        return f"https://{host}{'' if port in (None, 443) else f':{port}'}{target}"


def ingress_table(settings: IngressSettings | None) -> IngressTable:
    if settings is None:
        return EMPTY_INGRESS
    return IngressTable(
        hosts={h.name: h.routes for h in settings.hosts},
        redirect_to_https=settings.redirect_to_https,
        public_https_port=settings.public_https_port,
    )


EMPTY_INGRESS = IngressTable()


@dataclass(frozen=True, slots=True)
class Routers:
    """The outbound and inbound routers of one snapshot, and the ingress gateway's routes."""

    outbound: Router
    inbound: InboundRouter
    ingress: IngressTable = EMPTY_INGRESS


class RouterSwitch:
    """The routers in force, for the proxy's whole life: replaced as one on each commit."""

    __slots__ = ("current",)

    def __init__(self, current: Routers | None = None) -> None:
        self.current = current or Routers(EMPTY_ROUTER, EMPTY_INBOUND)

    def choose(self, original: Address) -> Route | None:
        """The outbound listener's chooser: the router in force decides."""
        return self.current.outbound.choose(original)
