"""Decodes ``x-composemesh: gateways:``/``egress:`` and decides ingress routes and egress verdicts.

Everything here is pure except ``read_file`` (the one edge that reads a PEM file) and
``check_certificates``/``load_gateways`` that call it. The format::

    x-composemesh:
      gateways:
        ingress:
          bind: 127.0.0.1          # default 0.0.0.0
          http_port: 8080          # absent: no plain port
          https_port: 8443         # absent: no HTTPS port; set: every host needs tls
          redirect_to_https: true  # default false; needs both ports
          hosts:
            www.example.com:
              tls: {cert: certs/www.crt, key: certs/www.key}   # relative to the compose file
              routes:
                - {path: /api/, service: api, port: 8000}      # longest path prefix wins
                - {path: /, service: web}                      # port: the service's only port
      egress:
        policy: REGISTRY_ONLY      # or ALLOW_ANY (the default)
        networks: [outside]
        hosts:
          - {host: api.partner.example, port: 443, protocol: tls}
          - {host: legacy.partner.example, port: 80, protocol: http,
             tls_origination: {port: 443, ca: certs/partner-ca.pem}}   # also cert, key
          - {host: db.partner.example, port: 5432, protocol: tcp, address: 10.1.2.3}

Decisions made here: host names are exact lower-case DNS names (no wildcards yet); a
route's ``path`` defaults to ``/`` and its ``port`` to the service's only known port;
``tls_origination`` is for ``protocol: http`` only, its ``port`` defaults to 443 and
without ``ca`` the system's trust store verifies the server.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.egress import EgressHostSpec, EgressOrigination, EgressSettings
from composemesh.model.ingress import IngressHostSpec, IngressPath, IngressSettings
from composemesh.model.settings import SECTION

GATEWAYS = f"{SECTION}.gateways"
INGRESS = f"{GATEWAYS}.ingress"
EGRESS = f"{SECTION}.egress"
INGRESS_GATEWAY = wk.INGRESS_GATEWAY  # the mesh service names of the gateways (fixed)
EGRESS_GATEWAY = wk.EGRESS_GATEWAY
BLACK_HOLE_CLUSTER = "BlackHoleCluster"  # Istio's destination for refused outbound calls
PASSTHROUGH_CLUSTER = "PassthroughCluster"  # Istio's destination for unlisted calls let out
REGISTRY_ONLY = "REGISTRY_ONLY"
ALLOW_ANY = "ALLOW_ANY"
POLICIES = (ALLOW_ANY, REGISTRY_ONLY)
PROTOCOLS = ("tls", "http", "tcp")
LABEL_HOST = wk.LABEL_INGRESS_HOST
LABEL_PATH = wk.LABEL_INGRESS_PATH
LABEL_PORT = wk.LABEL_INGRESS_PORT

GATEWAYS_KEYS = ("ingress",)
INGRESS_KEYS = ("bind", "http_port", "https_port", "redirect_to_https", "hosts")
HOST_KEYS = ("tls", "routes")
TLS_KEYS = ("cert", "key")
ROUTE_KEYS = ("path", "service", "port")
EGRESS_KEYS = ("policy", "networks", "hosts")
EGRESS_HOST_KEYS = ("host", "port", "protocol", "address", "tls_origination")
ORIGINATION_KEYS = ("port", "ca", "cert", "key")
DEFAULT_BIND = "0.0.0.0"
DEFAULT_ORIGINATION_PORT = 443

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_DNS = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_PATH = re.compile(r"^/[\x21-\x7e]*$")


@dataclass(frozen=True)
class TLSFiles:
    """A certificate chain and its private key, PEM files on the host."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class IngressRoute:
    """Requests whose path starts with ``path`` go to ``service:port`` in the mesh."""

    path: str
    service: str
    port: int
    origin: str = field(default="", compare=False)  # where it was written, for errors


@dataclass(frozen=True)
class HostRoute:
    """One route of one ingress host, as a label gives it."""

    host: str
    route: IngressRoute


@dataclass(frozen=True)
class IngressHost:
    """A host name the ingress serves, its certificate (None: plain HTTP only) and routes."""

    name: str
    tls: TLSFiles | None
    routes: tuple[IngressRoute, ...]


@dataclass(frozen=True)
class IngressGateway:
    """The ingress gateway: where it listens on the host and the hosts it serves, in order."""

    bind: str = DEFAULT_BIND
    http_port: int | None = None
    https_port: int | None = None
    redirect_to_https: bool = False
    hosts: tuple[IngressHost, ...] = ()

    def host(self, name: str) -> IngressHost | None:
        """The host a Host header or SNI names (case, a trailing dot and a port ignored)."""
        wanted = normal_host(name)
        return next((h for h in self.hosts if h.name == wanted), None)


@dataclass(frozen=True)
class TLSOrigination:
    """The egress gateway speaks TLS to the external host on ``port``, verifying with ``ca``."""

    port: int = DEFAULT_ORIGINATION_PORT
    ca: Path | None = None  # None: the system's trust store
    cert: Path | None = None  # client certificate and key: both or neither
    key: Path | None = None


@dataclass(frozen=True)
class EgressHost:
    """An external host the mesh may call through the egress gateway."""

    host: str
    port: int
    protocol: Literal["tls", "http", "tcp"]
    address: str | None = None  # None: the gateway resolves ``host`` by DNS
    tls_origination: TLSOrigination | None = None


@dataclass(frozen=True)
class Egress:
    """The outbound policy, the egress gateway's extra networks and the listed hosts."""

    policy: str = ALLOW_ANY
    networks: tuple[str, ...] = ()
    hosts: tuple[EgressHost, ...] = ()


@dataclass(frozen=True)
class Gateways:
    """Both gateways' config; ``ingress`` None when the file declares no ingress."""

    ingress: IngressGateway | None = None
    egress: Egress = Egress()


@dataclass(frozen=True)
class EgressVerdict:
    """What a sidecar does with an outbound call to a host outside the mesh.

    ``action``: ``egress`` (send it to the egress gateway, ``host`` says how it goes on),
    ``passthrough`` (ALLOW_ANY: straight out) or ``refuse`` (REGISTRY_ONLY, not listed).
    ``destination`` is the destination_service the call is counted with.
    """

    action: Literal["egress", "passthrough", "refuse"]
    destination: str
    host: EgressHost | None = None


@dataclass(frozen=True)
class CertificateInfo:
    """What ``check_certificates`` found in one certificate file, for status and check."""

    path: Path
    subject: str
    not_after: datetime
    dns_names: tuple[str, ...]


# --------------------------------------------------------------------------- parsing


def parse_gateways(
    section: Mapping[str, object] | None,
    *,
    base_dir: Path,
    services: Mapping[str, frozenset[int]],
    networks: Collection[str] | None = None,
) -> Gateways:
    """``gateways`` and ``egress`` of the whole ``x-composemesh`` mapping -> Gateways.

    ``services``: each mesh service and its known ports (empty: unknown, any port goes).
    ``networks``: the project's networks, to check ``egress.networks`` (None: unchecked).
    Pure: no file is read (``check_certificates`` does that). ConfigError naming the field.
    """
    if section is None:
        return Gateways()
    gateways = _mapping(section.get("gateways"), GATEWAYS, GATEWAYS_KEYS)
    ingress = None
    if gateways.get("ingress") is not None:
        ingress = _ingress(gateways["ingress"], base_dir, services)
    return Gateways(
        ingress=ingress, egress=_egress(section.get("egress"), base_dir, services, networks)
    )


def _ingress(
    value: object, base_dir: Path, services: Mapping[str, frozenset[int]]
) -> IngressGateway:
    raw = _mapping(value, INGRESS, INGRESS_KEYS)
    bind = raw.get("bind", DEFAULT_BIND)
    if not isinstance(bind, str) or not _is_ip(bind):
        raise ConfigError(f"{bind!r} is not an IP address of the host", field=f"{INGRESS}.bind")
    http_port = _optional_port(raw.get("http_port"), f"{INGRESS}.http_port")
    https_port = _optional_port(raw.get("https_port"), f"{INGRESS}.https_port")
    if http_port is None and https_port is None:
        raise ConfigError("publishes nothing; give http_port, https_port or both", field=INGRESS)
    if http_port is not None and http_port == https_port:
        raise ConfigError(f"is {https_port}, the same as http_port", field=f"{INGRESS}.https_port")
    redirect = raw.get("redirect_to_https", False)
    if not isinstance(redirect, bool):
        raise ConfigError("must be true or false", field=f"{INGRESS}.redirect_to_https")
    if redirect and (http_port is None or https_port is None):
        raise ConfigError(
            "needs both http_port and https_port", field=f"{INGRESS}.redirect_to_https"
        )
    hosts_raw = raw.get("hosts") or {}
    if not isinstance(hosts_raw, Mapping):
        raise ConfigError(
            "must be a mapping of host name to its tls and routes", field=f"{INGRESS}.hosts"
        )
    hosts: list[IngressHost] = []
    for name, spec in hosts_raw.items():
        where = f"{INGRESS}.hosts.{name}"
        host = _host_name(name, where)
        if any(h.name == host for h in hosts):
            raise ConfigError(f"names the host {host!r} a second time", field=where)
        hosts.append(_ingress_host(host, spec, where, base_dir, services, https_port))
    return IngressGateway(
        bind=bind,
        http_port=http_port,
        https_port=https_port,
        redirect_to_https=redirect,
        hosts=tuple(hosts),
    )


def _ingress_host(
    name: str,
    value: object,
    where: str,
    base_dir: Path,
    services: Mapping[str, frozenset[int]],
    https_port: int | None,
) -> IngressHost:
    raw = _mapping(value, where, HOST_KEYS)
    tls = None
    if raw.get("tls") is not None:
        tls_raw = _mapping(raw["tls"], f"{where}.tls", TLS_KEYS)
        cert = _path(tls_raw.get("cert"), f"{where}.tls.cert", base_dir, required=True)
        key = _path(tls_raw.get("key"), f"{where}.tls.key", base_dir, required=True)
        assert cert is not None and key is not None
        tls = TLSFiles(cert=cert, key=key)
    elif https_port is not None:
        raise ConfigError(
            f"is missing; https_port is set, so {name} needs tls: {{cert, key}}",
            field=f"{where}.tls",
        )
    routes_raw = raw.get("routes") or []
    if not isinstance(routes_raw, Sequence) or isinstance(routes_raw, str):
        raise ConfigError("must be a list of {path, service, port}", field=f"{where}.routes")
    routes: list[IngressRoute] = []
    for i, item in enumerate(routes_raw):
        rwhere = f"{where}.routes[{i}]"
        r = _mapping(item, rwhere, ROUTE_KEYS)
        service = r.get("service")
        if not isinstance(service, str) or service not in services:
            known = ", ".join(sorted(services)) or "none"
            raise ConfigError(
                f"{service!r} is not a mesh service; the mesh services are {known}",
                field=f"{rwhere}.service",
            )
        route = IngressRoute(
            path=_route_path(r.get("path", "/"), f"{rwhere}.path"),
            service=service,
            port=_service_port(r.get("port"), services[service], service, f"{rwhere}.port"),
            origin=rwhere,
        )
        routes = _add_route(routes, route, name)
    return IngressHost(name=name, tls=tls, routes=tuple(routes))


def route_from_labels(
    service: str, host: str | None, path: str | None, port: str | None, *, ports: frozenset[int]
) -> HostRoute | None:
    """The route the ``composemesh.ingress.*`` labels of ``service`` give (None: no host label).

    ``ports``: the service's known ports (empty: unknown); ``port`` may be left out when
    it has exactly one. ``path`` defaults to ``/``. ConfigError naming the service and label.
    """
    if host is None:
        for label, value in ((LABEL_PATH, path), (LABEL_PORT, port)):
            if value is not None:
                raise ConfigError(
                    f"needs {LABEL_HOST} beside it", service=service, field=f"label {label}"
                )
        return None

    def located(label: str, check: Callable[[], object]) -> object:
        try:
            return check()
        except ConfigError as err:
            raise ConfigError(err.message, service=service, field=f"label {label}") from None

    name = str(located(LABEL_HOST, lambda: _host_name(host, "")))
    route_path = str(located(LABEL_PATH, lambda: _route_path("/" if path is None else path, "")))
    given: object = None
    if port is not None:
        given = int(port) if port.strip().isdigit() else port
    number = located(LABEL_PORT, lambda: _service_port(given, ports, service, ""))
    assert isinstance(number, int)
    origin = f"the labels of service {service!r}"
    return HostRoute(host=name, route=IngressRoute(route_path, service, number, origin))


def merge_routes(
    ingress: IngressGateway | None, label_routes: Iterable[HostRoute]
) -> IngressGateway | None:
    """The file's ingress with the label routes added; a label host not in the file is new.

    ConfigError for two routes with the same host and path (naming both), a label route
    without a ``gateways.ingress`` section, a host without tls under https_port, a host
    without any route.
    """
    label_routes = tuple(label_routes)
    if ingress is None:
        if label_routes:
            first = label_routes[0].route
            raise ConfigError(
                f"{first.origin} route into the ingress, but there is no "
                f"{INGRESS} (give it http_port or https_port)",
                field=INGRESS,
            )
        return None
    hosts = {h.name: h for h in ingress.hosts}
    for item in label_routes:
        where = f"{INGRESS}.hosts.{item.host}"
        host = hosts.get(item.host)
        if host is None:
            if ingress.https_port is not None:
                raise ConfigError(
                    f"is missing; {item.route.origin} route {item.host} and https_port is set, "
                    f"so {item.host} needs tls: {{cert, key}}",
                    field=f"{where}.tls",
                )
            host = IngressHost(name=item.host, tls=None, routes=())
        hosts[item.host] = replace(
            host, routes=tuple(_add_route(list(host.routes), item.route, item.host))
        )
    for host in hosts.values():
        if not host.routes:
            raise ConfigError(
                "has no routes; every request to it would get 404",
                field=f"{INGRESS}.hosts.{host.name}.routes",
            )
    return replace(ingress, hosts=tuple(hosts.values()))


def _add_route(routes: list[IngressRoute], route: IngressRoute, host: str) -> list[IngressRoute]:
    for other in routes:
        if other.path == route.path:
            raise ConfigError(
                f"host {host} has two routes for the path {route.path}: "
                f"{other.origin} and {route.origin}",
                field=route.origin or None,
            )
    return [*routes, route]


def _egress(
    value: object,
    base_dir: Path,
    services: Mapping[str, frozenset[int]],
    networks: Collection[str] | None,
) -> Egress:
    if value is None:
        return Egress()
    raw = _mapping(value, EGRESS, EGRESS_KEYS)
    policy = raw.get("policy", ALLOW_ANY)
    if not isinstance(policy, str) or policy.upper() not in POLICIES:
        raise ConfigError(
            f"{policy!r} is not one of {', '.join(POLICIES)}", field=f"{EGRESS}.policy"
        )
    nets_raw = raw.get("networks") or []
    if not isinstance(nets_raw, Sequence) or isinstance(nets_raw, str):
        raise ConfigError("must be a list of network names", field=f"{EGRESS}.networks")
    nets: list[str] = []
    for i, net in enumerate(nets_raw):
        where = f"{EGRESS}.networks[{i}]"
        if not isinstance(net, str) or not net.strip():
            raise ConfigError("must be a network name", field=where)
        if networks is not None and net not in networks:
            known = ", ".join(sorted(networks)) or "none"
            raise ConfigError(
                f"{net!r} is not a network of this project; they are {known}", field=where
            )
        if net in nets:
            raise ConfigError(f"names {net!r} a second time", field=where)
        nets.append(net)
    hosts_raw = raw.get("hosts") or []
    if not isinstance(hosts_raw, Sequence) or isinstance(hosts_raw, str):
        raise ConfigError("must be a list of {host, port, protocol}", field=f"{EGRESS}.hosts")
    hosts: list[EgressHost] = []
    for i, item in enumerate(hosts_raw):
        where = f"{EGRESS}.hosts[{i}]"
        host = _egress_host(item, where, base_dir, services)
        for j, other in enumerate(hosts):
            if (other.host, other.port) == (host.host, host.port):
                raise ConfigError(
                    f"lists {host.host}:{host.port} again; {EGRESS}.hosts[{j}] has it", field=where
                )
        hosts.append(host)
    return Egress(policy=policy.upper(), networks=tuple(nets), hosts=tuple(hosts))


def _egress_host(
    value: object, where: str, base_dir: Path, services: Mapping[str, frozenset[int]]
) -> EgressHost:
    raw = _mapping(value, where, EGRESS_HOST_KEYS)
    if "host" not in raw:
        raise ConfigError("is missing; the external host's DNS name", field=f"{where}.host")
    host = _host_name(raw["host"], f"{where}.host")
    if host in services:
        raise ConfigError(
            f"{host!r} is a mesh service, not an external host", field=f"{where}.host"
        )
    if "port" not in raw:
        raise ConfigError("is missing; the port the apps call", field=f"{where}.port")
    port = _port(raw["port"], f"{where}.port")
    protocol = raw.get("protocol")
    if not isinstance(protocol, str) or protocol.lower() not in PROTOCOLS:
        said = "is missing" if protocol is None else f"{protocol!r} is not a protocol"
        raise ConfigError(
            f"{said}; the protocols are {', '.join(PROTOCOLS)}", field=f"{where}.protocol"
        )
    proto: Literal["tls", "http", "tcp"] = protocol.lower()  # type: ignore[assignment]
    address = raw.get("address")
    if address is not None and (
        not isinstance(address, str) or not (_is_ip(address) or _DNS.match(address.lower()))
    ):
        raise ConfigError(
            f"{address!r} is not an IP address or a DNS name", field=f"{where}.address"
        )
    origination = None
    if raw.get("tls_origination") is not None:
        owhere = f"{where}.tls_origination"
        if proto != "http":
            raise ConfigError(f"is for protocol http only; {host} is {proto}", field=owhere)
        o = _mapping(raw["tls_origination"], owhere, ORIGINATION_KEYS)
        cert = _path(o.get("cert"), f"{owhere}.cert", base_dir)
        key = _path(o.get("key"), f"{owhere}.key", base_dir)
        if (cert is None) != (key is None):
            missing = "key" if key is None else "cert"
            raise ConfigError(
                "is missing; a client certificate needs both cert and key",
                field=f"{owhere}.{missing}",
            )
        origination = TLSOrigination(
            port=_port(o.get("port", DEFAULT_ORIGINATION_PORT), f"{owhere}.port"),
            ca=_path(o.get("ca"), f"{owhere}.ca", base_dir),
            cert=cert,
            key=key,
        )
    return EgressHost(
        host=host,
        port=port,
        protocol=proto,
        address=address.lower() if isinstance(address, str) else None,
        tls_origination=origination,
    )


def _mapping(value: object, where: str, keys: tuple[str, ...]) -> Mapping[str, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be a mapping with {', '.join(keys)}", field=where)
    for key in value:
        if key not in keys:
            raise ConfigError(f"unknown key {key!r}; the keys are {', '.join(keys)}", field=where)
    return value


def _port(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{value!r} is not a port (1 to 65535)", field=where)
    return value


def _optional_port(value: object, where: str) -> int | None:
    return None if value is None else _port(value, where)


def _service_port(value: object, known: frozenset[int], service: str, where: str) -> int:
    if value is None:
        if len(known) == 1:
            return next(iter(known))
        raise ConfigError(
            f"is missing; {service} has "
            + (f"ports {_ports(known)}" if known else "no known port"),
            field=where,
        )
    port = _port(value, where)
    if known and port not in known:
        raise ConfigError(
            f"{service} has no port {port}; its ports are {_ports(known)}", field=where
        )
    return port


def _ports(ports: frozenset[int]) -> str:
    return ", ".join(str(p) for p in sorted(ports))


def _route_path(value: object, where: str) -> str:
    if not isinstance(value, str) or not _PATH.match(value):
        raise ConfigError(f"{value!r} is not a path prefix (starts with /, no spaces)", field=where)
    return value


def _host_name(value: object, where: str) -> str:
    name = normal_host(value) if isinstance(value, str) else None
    if name is None or not _DNS.match(name) or _is_ip(name):
        raise ConfigError(f"{value!r} is not a DNS host name", field=where)
    return name


def _path(value: object, where: str, base_dir: Path, *, required: bool = False) -> Path | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("must be the path of a PEM file", field=where)
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else base_dir / p


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def normal_host(value: str) -> str:
    """A Host header, SNI or host name as compared: lower case, no trailing dot, no port."""
    name = value.strip().lower()
    if name.startswith("["):  # [v6]:port
        return name[1 : name.find("]")] if "]" in name else name
    if name.count(":") == 1:
        name = name.split(":", 1)[0]
    return name.rstrip(".") if name.endswith(".") and not name.endswith("..") else name


# --------------------------------------------------------------------------- decisions


class _Pathed(Protocol):
    @property
    def path(self) -> str: ...


R = TypeVar("R", bound=_Pathed)


def match_route(host_routes: Iterable[R], path: str) -> R | None:
    """The route whose path prefix is the longest that ``path`` starts with (None: 404)."""
    best: R | None = None
    for route in host_routes:
        if path.startswith(route.path) and (best is None or len(route.path) > len(best.path)):
            best = route
    return best


def ingress_settings(ingress: IngressGateway) -> IngressSettings:
    """What the pilot tells the ingress gateway (its snapshot's part): the hosts, whether each
    has a certificate (the files themselves are mounted into the gateway), and their routes."""
    return IngressSettings(
        http=ingress.http_port is not None,
        https=ingress.https_port is not None,
        redirect_to_https=ingress.redirect_to_https,
        public_https_port=ingress.https_port,
        hosts=tuple(
            IngressHostSpec(host.name, tls=host.tls is not None, routes=tuple(
                IngressPath(r.path, r.service, r.port) for r in host.routes))
            for host in ingress.hosts),
    )


def ingress_urls(ingress: IngressGateway) -> list[tuple[str, str, str]]:
    """Where the user reaches each ingress host from this machine: (host, URL, the curl line
    that reaches it before DNS names the host: ``--resolve`` to the bound address)."""
    rows = []
    address = "127.0.0.1" if ingress.bind in ("0.0.0.0", "::") else ingress.bind  # noqa: S104
    for host in ingress.hosts:
        for scheme, port, default in (("https", ingress.https_port, 443),
                                      ("http", ingress.http_port, 80)):
            if port is None or (scheme == "https" and host.tls is None):
                continue
            if scheme == "http" and ingress.redirect_to_https and host.tls is not None:
                continue  # answered with a redirect to the https one
            url = f"{scheme}://{host.name}{'' if port == default else f':{port}'}/"
            rows.append((host.name, url, f"curl --resolve {host.name}:{port}:{address} {url}"))
    return rows


def egress_vip(index: int) -> str:
    """The address the ``index``-th listed host's name has in every meshed namespace: in
    240.240.0.0/16, as Istio's auto-allocated ServiceEntry addresses (never routed)."""
    network = ipaddress.ip_network(wk.EGRESS_VIP_NETWORK)
    return str(network.network_address + 1 + index)


def egress_files(index: int, origination: TLSOrigination) -> dict[str, Path]:
    """The host paths of the ``index``-th host's origination files by their mount target in
    the egress gateway."""
    folder = f"{wk.EGRESS_FILES_DIR}/{index}"
    pairs = (("ca.pem", origination.ca), ("tls.crt", origination.cert),
             ("tls.key", origination.key))
    return {f"{folder}/{name}": path for name, path in pairs if path is not None}


def egress_settings(egress: Egress) -> EgressSettings:
    """What the pilot tells every proxy of the external hosts: their VIPs and protocols, and
    for the gateway where each is and the mounted paths of its origination files."""
    hosts = []
    for i, entry in enumerate(egress.hosts):
        o = entry.tls_origination
        origination = None
        if o is not None:
            folder = f"{wk.EGRESS_FILES_DIR}/{i}"
            origination = EgressOrigination(
                port=o.port,
                ca=f"{folder}/ca.pem" if o.ca is not None else None,
                cert=f"{folder}/tls.crt" if o.cert is not None else None,
                key=f"{folder}/tls.key" if o.key is not None else None)
        hosts.append(EgressHostSpec(entry.host, entry.port, entry.protocol, egress_vip(i),
                                    entry.address, origination))
    return EgressSettings(policy=egress.policy, hosts=tuple(hosts))  # type: ignore[arg-type]


def egress_lookup(egress: Egress, host: str, port: int) -> EgressHost | None:
    """The listed external host an outbound call to ``host:port`` is for (by name or address)."""
    name = normal_host(host)
    for entry in egress.hosts:
        if entry.port == port and (entry.host == name or entry.address == name):
            return entry
    return None


def egress_verdict(egress: Egress, host: str | None, port: int) -> EgressVerdict:
    """What the caller's sidecar does with a call to ``host:port`` outside the mesh.

    ``host``: the SNI, Host header or destination address (None: none known).
    """
    entry = egress_lookup(egress, host, port) if host else None
    if entry is not None:
        return EgressVerdict("egress", EGRESS_GATEWAY, entry)
    if egress.policy == REGISTRY_ONLY:
        return EgressVerdict("refuse", BLACK_HOLE_CLUSTER)
    return EgressVerdict("passthrough", PASSTHROUGH_CLUSTER)


# --------------------------------------------------------------------------- certificates


def read_file(path: Path, where: str) -> bytes:
    """The edge: the bytes of ``path``, or ConfigError naming the field when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist", field=where) from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror})", field=where) from None


def check_serving_pair(
    cert_pem: bytes,
    key_pem: bytes,
    *,
    cert_path: Path,
    cert_field: str,
    key_field: str,
    now: datetime,
    host: str | None = None,
) -> CertificateInfo:
    """A certificate chain and key that parse, are valid at ``now``, match each other and,
    given ``host``, name it. Pure; ConfigError naming the field."""
    certs = _certificates(cert_pem, cert_path, cert_field)
    leaf = certs[0]
    _check_valid(leaf, cert_path, cert_field, now)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            "is encrypted; give the key without a passphrase", field=key_field
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"is not a PEM private key ({_first_line(exc)})", field=key_field
        ) from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise ConfigError(f"does not match the certificate {cert_path}", field=key_field)
    names = _dns_names(leaf)
    if host is not None and not any(_name_matches(n, host) for n in names):
        raise ConfigError(
            f"{cert_path} is for {', '.join(names) or 'no DNS name'}, not {host}", field=cert_field
        )
    return CertificateInfo(
        cert_path, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc, names
    )


def check_ca_bundle(pem: bytes, *, path: Path, where: str, now: datetime) -> CertificateInfo:
    """CA certificates that parse, are valid at ``now`` and each say CA:TRUE. Pure."""
    certs = _certificates(pem, path, where)
    for cert in certs:
        _check_valid(cert, path, where, now)
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise ConfigError(
                f"{path} holds {cert.subject.rfc4514_string()}, which is not a CA "
                "(its basicConstraints do not say CA:TRUE)",
                field=where,
            )
    first = certs[0]
    return CertificateInfo(
        path, first.subject.rfc4514_string(), first.not_valid_after_utc, _dns_names(first)
    )


def check_certificates(
    gateways: Gateways,
    *,
    now: datetime | None = None,
    read: Callable[[Path, str], bytes] = read_file,
) -> tuple[CertificateInfo, ...]:
    """Reads and checks every certificate, key and CA the gateways name (ConfigError: the first
    bad one); what it found, for status."""
    when = now or datetime.now(UTC)
    found: list[CertificateInfo] = []
    if gateways.ingress is not None:
        for host in gateways.ingress.hosts:
            if host.tls is None:
                continue
            where = f"{INGRESS}.hosts.{host.name}.tls"
            found.append(
                check_serving_pair(
                    read(host.tls.cert, f"{where}.cert"),
                    read(host.tls.key, f"{where}.key"),
                    cert_path=host.tls.cert,
                    cert_field=f"{where}.cert",
                    key_field=f"{where}.key",
                    now=when,
                    host=host.name,
                )
            )
    for i, entry in enumerate(gateways.egress.hosts):
        o = entry.tls_origination
        if o is None:
            continue
        where = f"{EGRESS}.hosts[{i}].tls_origination"
        if o.ca is not None:
            found.append(
                check_ca_bundle(read(o.ca, f"{where}.ca"), path=o.ca, where=f"{where}.ca", now=when)
            )
        if o.cert is not None and o.key is not None:
            found.append(
                check_serving_pair(
                    read(o.cert, f"{where}.cert"),
                    read(o.key, f"{where}.key"),
                    cert_path=o.cert,
                    cert_field=f"{where}.cert",
                    key_field=f"{where}.key",
                    now=when,
                )
            )
    return tuple(found)


def load_gateways(
    section: Mapping[str, object] | None,
    *,
    base_dir: Path,
    services: Mapping[str, frozenset[int]],
    label_routes: Iterable[HostRoute] = (),
    networks: Collection[str] | None = None,
    now: datetime | None = None,
) -> Gateways:
    """parse_gateways, the label routes merged in, every certificate checked: all ``check`` does."""
    parsed = parse_gateways(section, base_dir=base_dir, services=services, networks=networks)
    gateways = replace(parsed, ingress=merge_routes(parsed.ingress, label_routes))
    check_certificates(gateways, now=now)
    return gateways


def _certificates(pem: bytes, path: Path, where: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ConfigError(
            f"{path} is not a PEM certificate ({_first_line(exc)})", field=where
        ) from None
    return certs


def _check_valid(cert: x509.Certificate, path: Path, where: str, now: datetime) -> None:
    if cert.not_valid_after_utc <= now:
        raise ConfigError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC", field=where
        )
    if cert.not_valid_before_utc > now:
        raise ConfigError(
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            field=where,
        )


def _dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))


def _name_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
