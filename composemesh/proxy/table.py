"""The outbound routing table, built whole from one snapshot: plain dict lookups for the hot path.

It is built from the snapshot's typed settings (``model.snapshot.SnapshotSettings``), keyed by
mesh service: ``services`` (the running endpoints, each with the one address this proxy
reaches it at, all its addresses and an optional compose service label), ``idle_addresses``,
``routing`` and ``protocols``. ``build_table`` checks what their types cannot say and raises
SnapshotError naming the first field that does not hold, so a snapshot is applied whole or
NACKed; nothing here touches a socket.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset
from composemesh.model.snapshot import (
    DeclaredProtocols,
    Snapshot,
    SnapshotError,
    SnapshotSettings,
)
from composemesh.model.wire import to_builtins
from composemesh.proxy.selection import Endpoint

HTTP = "http"
TCP = "tcp"
PROTOCOLS = (HTTP, TCP)
UNKNOWN = "unknown"

_EMPTY: Mapping[Any, Any] = MappingProxyType({})


_NONE_SERVING: frozenset[str] = frozenset()


def _empty() -> Any:
    """A dataclass default: the one shared empty read-only mapping."""
    return field(default_factory=lambda: _EMPTY)


@dataclass(frozen=True, slots=True)
class ServiceProtocols:
    """The declared protocol of a service's ports; None means "detect from the first bytes"."""

    default: str | None = None
    ports: Mapping[int, str] = _empty()

    def at(self, port: int) -> str | None:
        return self.ports.get(port, self.default)


_DETECT = ServiceProtocols()


@dataclass(frozen=True)
class RoutingTable:
    """What the outbound path looks up, per connection and per request; never mutated."""

    by_address: Mapping[str, str] = _empty()  # endpoint IP -> mesh service
    routing: Mapping[str, ServiceRouting] = _empty()  # mesh service -> its routing
    endpoints: Mapping[tuple[str, str], tuple[Endpoint, ...]] = _empty()  # (service, version)
    service_endpoints: Mapping[str, tuple[Endpoint, ...]] = _empty()  # service -> all versions
    protocols: Mapping[str, ServiceProtocols] = _empty()
    workloads: Mapping[str, str] = _empty()  # endpoint node -> its compose service
    services: tuple[str, ...] = field(default=())  # every mesh service, sorted
    # compose service name (a DNS alias of its own) -> its endpoints, for names that are
    # not a mesh service: `reviews-v2:9080` means that version, `reviews:9080` the split
    pinned: Mapping[str, tuple[Endpoint, ...]] = _empty()
    pinned_services: frozenset[str] = frozenset()  # services with a pinned name: read Host
    # endpoint IP -> the pinned name of its compose service: a TCP connection carries no
    # Host, and its original destination is an instance of that compose service
    pinned_by_address: Mapping[str, str] = _empty()
    serving: Mapping[str, frozenset[str]] = _empty()  # service -> versions with endpoints
    # id of an endpoints tuple of this table that holds remote ones -> its local ones
    locals_by_id: Mapping[int, tuple[Endpoint, ...]] = _empty()
    dns: Mapping[str, str] = _empty()  # imported name (lower case) -> its VIP, for the DNS proxy

    def serving_versions(self, service: str) -> frozenset[str]:
        """The versions of ``service`` that have at least one endpoint (built once)."""
        return self.serving.get(service, _NONE_SERVING)

    def service_at(self, ip: str) -> str | None:
        """The mesh service whose endpoint has address ``ip``; None for the world outside."""
        service = self.by_address.get(ip)
        if service is None and ip.startswith("::ffff:"):  # IPv4 seen on a dual-stack socket
            service = self.by_address.get(ip[7:])
        return service

    def pinned_at(self, ip: str) -> tuple[Endpoint, ...]:
        """The endpoints of the compose service whose instance has address ``ip``, if that
        compose service has a name of its own (pinned); () otherwise."""
        name = self.pinned_by_address.get(ip)
        if name is None and ip.startswith("::ffff:"):
            name = self.pinned_by_address.get(ip[7:])
        return self.pinned.get(name, ()) if name is not None else ()

    @property
    def remote(self) -> frozenset[str]:
        """The services with endpoints on other hosts or outside the mesh (not per request)."""
        return frozenset(s for s, eps in self.service_endpoints.items()
                         if any(ep.remote for ep in eps))

    def local_of(self, endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...] | None:
        """The local ones of ``endpoints`` (a tuple of this table) if some of them are
        remote, None if all are local: one dict lookup per pick, nothing copied."""
        return self.locals_by_id.get(id(endpoints))

    def protocol(self, service: str, port: int) -> str | None:
        """``http``, ``tcp``, or None (detect) for connections to ``service`` on ``port``."""
        return self.protocols.get(service, _DETECT).at(port)

    def workload(self, endpoint: Endpoint) -> str:
        """The compose service behind ``endpoint`` (a metric label), or "unknown"."""
        return self.workloads.get(endpoint.node, UNKNOWN)

    def to_json(self) -> dict[str, Any]:
        """The table as the admin config dump shows it."""
        return {
            service: {
                "endpoints": [
                    {"node": ep.node, "version": ep.version, "address": ep.address,
                     "workload": self.workload(ep),
                     **({"port": ep.port, "locality": "remote", "peer": ep.peer, "sni": ep.sni,
                         "plaintext": ep.plaintext} if ep.remote else {})}
                    for ep in self.service_endpoints.get(service, ())
                ],
                "protocols": {
                    "default": self.protocols.get(service, _DETECT).default,
                    "ports": {str(port): proto for port, proto in
                              sorted(self.protocols.get(service, _DETECT).ports.items())},
                },
                "routing": to_builtins(self.routing[service]),
            }
            for service in self.services
        }


EMPTY_TABLE = RoutingTable()


def table_from_snapshot(snapshot: Snapshot) -> RoutingTable:
    """The routing table of ``snapshot``; SnapshotError (the NACK reason) if it does not hold."""
    return build_table(snapshot.settings, project=snapshot.identity.project)


def build_table(settings: SnapshotSettings, project: str = "") -> RoutingTable:
    """The table of a snapshot's ``services``, ``idle_addresses``, ``routing`` and ``protocols``.

    The codec checked their types; this checks what types cannot say (addresses are IP
    addresses, each an endpoint of one service only, routing listed under its own service,
    port numbers in range) and raises SnapshotError naming the first field that does not
    hold. A snapshot without them (an older pilot) gives the empty table: all passes through.
    """
    try:
        return _build(settings, project)
    except ValueError as exc:
        raise SnapshotError(str(exc)) from None


def _build(settings: SnapshotSettings, project: str) -> RoutingTable:
    by_address: dict[str, str] = {}
    per_version: dict[tuple[str, str], list[Endpoint]] = {}
    per_service: dict[str, tuple[Endpoint, ...]] = {}
    workloads: dict[str, str] = {}
    dialed_by_node: dict[str, set[str]] = {}
    for service, entries in settings.services.items():
        where = f"$.settings.services.{service}"
        endpoints = []
        for i, entry in enumerate(entries):
            ew = f"{where}[{i}]"
            ep = Endpoint(node=entry.node, version=entry.version,
                          address=_ip(entry.address, f"{ew}.address"), port=entry.port,
                          remote=entry.locality == "remote", peer=entry.peer, sni=entry.sni,
                          plaintext=entry.plaintext)
            if ep.port and not 0 < ep.port < 65536:
                raise ValueError(f"{ew}.port: {ep.port} is not a port number")
            if ep.remote:  # dialed at the gateway's address: not the app's destination
                endpoints.append(ep)
                per_version.setdefault((service, ep.version), []).append(ep)
                if entry.compose_service:
                    workloads[ep.node] = entry.compose_service
                continue
            # what the app's DNS may answer
            dialed = {ep.address, *(_ip(a, f"{ew}.addresses[{j}]")
                                    for j, a in enumerate(entry.addresses))}
            dialed_by_node.setdefault(ep.node, set()).update(dialed)
            for address in sorted(dialed):
                owner = by_address.get(address)
                if owner is not None:
                    raise ValueError(f"{ew}.address: {address} is already an endpoint "
                                     f"of {owner!r}")
                by_address[address] = service
            endpoints.append(ep)
            per_version.setdefault((service, ep.version), []).append(ep)
            workload = entry.compose_service or _compose_service_of(ep.node, project)
            if workload:
                workloads[ep.node] = workload
        per_service[service] = tuple(endpoints)

    # Addresses of a service's instances that take no traffic now (app stopped, unhealthy):
    # the app's DNS may still answer them, so they must still be routed as that service.
    for service, addresses in settings.idle_addresses.items():
        for i, address in enumerate(addresses):
            by_address.setdefault(_ip(address, f"$.settings.idle_addresses.{service}[{i}]"),
                                  service)
        per_service.setdefault(service, ())

    # The VIPs the proxy's DNS answers for imported names: what is sent there is that service.
    for imported, vip in settings.dns.items():
        where = f"$.settings.dns.{imported}"
        address = _ip(vip, where)
        owner = by_address.get(address)
        if owner is not None and owner != imported:
            raise ValueError(f"{where}: {address} is already an endpoint of {owner!r}")
        by_address[address] = imported
        per_service.setdefault(imported, ())
    dns = {key.lower().rstrip("."): vip for key, vip in settings.dns.items()}

    routing: dict[str, ServiceRouting] = {}
    for service, decoded in settings.routing.items():
        if decoded.service != service:
            raise ValueError(f"$.settings.routing.{service}.service: {decoded.service!r} "
                             f"is not the service it is listed under")
        routing[service] = decoded
    for service, listed in per_service.items():
        if service not in routing:  # not expected from the pilot: an even split over versions
            routing[service] = default_routing(service, listed)

    protocols: dict[str, ServiceProtocols] = {}
    for service, declared in settings.protocols.items():
        protocols[service] = _protocols(declared, f"$.settings.protocols.{service}")

    pinned: dict[str, list[Endpoint]] = {}
    pinned_services: set[str] = set()
    pinned_by_address: dict[str, str] = {}
    for service, listed in per_service.items():
        for ep in listed:
            if ep.remote:  # reached at its gateway: no name of its own here
                continue
            name = workloads.get(ep.node)
            if name and name not in per_service:
                pinned.setdefault(name, []).append(ep)
                pinned_services.add(service)
                for address in dialed_by_node.get(ep.node, ()):
                    pinned_by_address[address] = name
    by_version = {key: tuple(eps) for key, eps in per_version.items()}
    mixed = [eps for eps in (*by_version.values(), *per_service.values())
             if any(ep.remote for ep in eps)]
    return RoutingTable(
        locals_by_id=MappingProxyType(
            {id(eps): tuple(ep for ep in eps if not ep.remote) for eps in mixed}),
        pinned_by_address=MappingProxyType(pinned_by_address),
        pinned=MappingProxyType({name: tuple(eps) for name, eps in pinned.items()}),
        pinned_services=frozenset(pinned_services),
        serving=MappingProxyType({
            service: frozenset(ep.version for ep in listed)
            for service, listed in per_service.items()
        }),
        by_address=MappingProxyType(by_address),
        routing=MappingProxyType(routing),
        endpoints=MappingProxyType(by_version),
        service_endpoints=MappingProxyType(per_service),
        protocols=MappingProxyType(protocols),
        workloads=MappingProxyType(workloads),
        services=tuple(sorted(routing)),
        dns=MappingProxyType(dns),
    )


def default_routing(service: str, endpoints: tuple[Endpoint, ...]) -> ServiceRouting:
    """One route sending equal shares to every version that has endpoints."""
    versions = sorted({ep.version for ep in endpoints})
    route = HttpRoute(name="default", matches=(),
                      destinations=tuple(WeightedSubset(v, 1) for v in versions))
    return ServiceRouting(service=service, routes=(route,))


def _protocols(declared: DeclaredProtocols, where: str) -> ServiceProtocols:
    ports: dict[int, str] = {}
    for key, proto in declared.ports.items():
        if not 0 < int(key) < 65536:
            raise ValueError(f"{where}.ports.{key}: not a port number")
        ports[int(key)] = proto
    if declared.default is None and not ports:
        return _DETECT
    return ServiceProtocols(default=declared.default, ports=MappingProxyType(ports))


def _compose_service_of(node: str, project: str) -> str:
    """The compose service of a netns holder container named ``<project>-<service>-netns-<n>``."""
    if not project:
        return ""
    match = re.fullmatch(re.escape(project) + r"[-_](.+)[-_]netns[-_]\d+", node)
    return match.group(1) if match else ""


def _ip(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: must be a non-empty string")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not an IP address") from None
