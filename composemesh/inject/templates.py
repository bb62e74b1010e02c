"""The services the mesh adds, as compose service definitions: each app's netns holder and
proxy, and the one pilot; what they run, mount, may do and are labelled with.

Each is built from its app (the pilot: from the holders already built) and returned as a
fresh dict. No I/O: the one thing read besides the model is the working directory, which the
user's root cert and key paths are made absolute against.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from composemesh.inject.classify import labels_of, role_of
from composemesh.inject.compose_syntax import attached_networks, dependency, with_aliases
from composemesh.inject.replicas import replicas_of
from composemesh.model import wellknown as wk
from composemesh.model.ca_config import (
    ENV_CA_CERT_FILE,
    ENV_CA_KEY_FILE,
    PILOT_ROOT_CERT,
    PILOT_ROOT_KEY,
    CAConfig,
)
from composemesh.model.consul import ENV_ADDRESS, ENV_TOKEN
from composemesh.model.egress import EgressSettings
from composemesh.model.gateways import Egress, IngressGateway, egress_files
from composemesh.model.ingress import IngressSettings
from composemesh.model.labels import MeshLabels
from composemesh.model.limits import limits_to_env
from composemesh.model.wire import encode

PILOT_URL = wk.PILOT_URL
# What each injected container may do: every capability dropped but what it needs, and no
# gaining more (setuid binaries, file capabilities). The holder installs iptables rules
# (nf_tables: NET_ADMIN alone); the proxy and the pilot need none. No NET_RAW anywhere: it is
# what forging addresses and ARP answers takes.
HOLDER_CAPS = ("NET_ADMIN",)
DROP_ALL = ["ALL"]
NO_NEW_PRIVILEGES = ["no-new-privileges:true"]
SOCKET_VOLUME = "composemesh-pilot-socket"  # the pilot's API socket: mesh containers only
PILOT_VOLUME = "composemesh-pilot-state"  # the pilot's state (route overrides)
PROXY_HEALTHCHECK = {
    "test": ["CMD", "python3", "-m", "composemesh.healthcheck", str(wk.PORT_HEALTH)],
    "interval": "2s",
    "timeout": "2s",
    "retries": 30,
    "start_period": "30s",
}
PILOT_HEALTHCHECK = {
    "test": ["CMD", "python3", "-m", "composemesh.healthcheck", f"unix:{wk.PILOT_SOCKET}"],
    "interval": "2s",
    "timeout": "2s",
    "retries": 30,
    "start_period": "30s",
}
DOCKER_SOCKET = "/var/run/docker.sock"
# Keys of a holder that the injector writes itself; the rest was the app's and is kept.
# Its depends_on is derived each time (its app's start order, links, static addresses).
HOLDER_OWN_KEYS = ("image", "command", "cap_add", "cap_drop", "security_opt", "restart",
                   "labels", "profiles", "deploy", "depends_on")


def make_holder(
    app_name: str,
    names: Iterable[str],
    app: Mapping[str, Any],
    ns: Mapping[str, Any],
    labels: MeshLabels,
    image: str,
    capture_dns: bool = False,
) -> dict[str, Any]:
    """The service that owns ``app_name``'s network namespace, answering to ``names`` on
    each of its networks; with ``capture_dns`` (a federated mesh), its rules send the app's
    DNS queries to the sidecar, which answers the names imported from Consul."""
    holder: dict[str, Any] = {
        "image": image,
        "command": ["composemesh", "netns"],
        "cap_drop": list(DROP_ALL),
        "cap_add": list(HOLDER_CAPS),
        "security_opt": list(NO_NEW_PRIVILEGES),
        "restart": "unless-stopped",
    }
    holder.update(copy.deepcopy(dict(ns)))
    if "network_mode" not in holder:
        holder["networks"] = with_aliases(holder.get("networks") or {"default": None}, names)
    holder["labels"] = injected_labels(wk.ROLE_NETNS, app_name, app, labels)
    if capture_dns:
        environment = holder.get("environment")
        holder["environment"] = {**(environment if isinstance(environment, dict) else {}),
                                 wk.ENV_CAPTURE_DNS: "true"}
    _follow_app(holder, app)
    return holder


def make_proxy(
    app_name: str, app: Mapping[str, Any], labels: MeshLabels, image: str
) -> dict[str, Any]:
    """The sidecar of ``app_name``, in its namespace, running as the uid iptables lets out."""
    proxy: dict[str, Any] = {
        "image": image,
        "command": ["composemesh", "proxy"],
        "network_mode": f"service:{wk.netns_service(app_name)}",
        "user": f"{wk.PROXY_UID}:{wk.PROXY_UID}",
        "cap_drop": list(DROP_ALL),
        "security_opt": list(NO_NEW_PRIVILEGES),
        "restart": "unless-stopped",
        # read-only: a proxy can reach the pilot's socket, never put one of its own there
        "volumes": [{"type": "volume", "source": SOCKET_VOLUME, "target": wk.PILOT_SOCKET_DIR,
                     "read_only": True}],
        "environment": {
            "COMPOSEMESH_PILOT_URL": PILOT_URL,
            "COMPOSEMESH_SERVICE": labels.service,
            "COMPOSEMESH_VERSION": labels.version,
            "COMPOSEMESH_COMPOSE_SERVICE": app_name,
            **limits_to_env(labels.limits),  # the app's composemesh.proxy.* labels
        },
        "healthcheck": copy.deepcopy(PROXY_HEALTHCHECK),
        "depends_on": {
            wk.netns_service(app_name): dependency("service_started", restart=True),
            wk.PILOT_SERVICE: dependency("service_healthy"),
        },
        "labels": injected_labels(wk.ROLE_PROXY, app_name, app, labels),
    }
    _follow_app(proxy, app)
    return proxy


def injected_labels(
    role: str, app_name: str, app: Mapping[str, Any], labels: MeshLabels
) -> dict[str, str]:
    """The labels of ``app_name``'s holder or proxy: its role, its app, the app's mesh
    service, version and instance; the holder's also say how the pilot routes to it."""
    out = {
        wk.LABEL_ROLE: role,
        wk.LABEL_OF: app_name,
        wk.LABEL_SERVICE: labels.service,
        wk.LABEL_VERSION: labels.version,
    }
    instance = labels_of(app, app_name).get(wk.LABEL_INSTANCE)
    if instance:
        out[wk.LABEL_INSTANCE] = instance
    if role == wk.ROLE_NETNS:  # what the pilot reads to route to this instance
        if labels.weight is not None:
            out[wk.LABEL_WEIGHT] = str(labels.weight)
        if labels.protocol is not None:
            out[wk.LABEL_PROTOCOL] = labels.protocol
        for port, proto in sorted(labels.port_protocols.items()):
            out[f"{wk.LABEL_PORT_PREFIX}{port}.protocol"] = proto
    return out


def _follow_app(injected: dict[str, Any], app: Mapping[str, Any]) -> None:
    """Holder and proxy come and go with their app: same profiles, none if it has none."""
    if app.get("profiles"):
        injected["profiles"] = copy.deepcopy(app["profiles"])
    if replicas_of(app) == 0:
        injected["deploy"] = {"replicas": 0}


def own_networks(services: Mapping[str, Any], external: frozenset[str]) -> list[str]:
    """The project's own networks that a holder is on (none of the ``external`` ones, which
    other projects' containers are on); ``default`` if there is none and it is not external."""
    networks: set[str] = set()
    for name, svc in services.items():
        if role_of(svc, name) == wk.ROLE_NETNS:
            networks.update(attached_networks(svc))
    own = sorted(networks - external)
    if not own and "default" not in external:
        own = ["default"]
    return own


INGRESS_LABELS = MeshLabels(enabled=True, service=wk.INGRESS_GATEWAY, version=wk.DEFAULT_VERSION,
                            weight=None, protocol=None)


def make_ingress_gateway(
    ingress: IngressGateway, services: Mapping[str, Any], image: str,
    external: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """The ingress gateway: a holder (its namespace and identity, like any workload's) that
    publishes the ingress ports on the host, only it, and a proxy in the gateway role in that
    namespace, the hosts' certificate files mounted read-only. Inbound capture leaves the
    ingress ports alone (the gateway itself listens there). On every network of the
    project's own that a holder is on, so that it reaches each mesh service."""
    app = wk.INGRESS_GATEWAY
    ports = []
    for target, published in ((wk.INGRESS_HTTP_PORT, ingress.http_port),
                              (wk.INGRESS_HTTPS_PORT, ingress.https_port)):
        if published is not None:
            ports.append({"target": target, "published": str(published),
                          "host_ip": ingress.bind, "protocol": "tcp", "mode": "ingress"})
    networks = own_networks(services, external)
    ns: dict[str, Any] = {
        "ports": ports,
        "environment": {wk.ENV_EXCLUDE_INBOUND: f"{wk.INGRESS_HTTP_PORT},{wk.INGRESS_HTTPS_PORT}"},
        **({"networks": dict.fromkeys(networks)} if networks else {"network_mode": "none"}),
    }
    holder = make_holder(app, (app,), {}, ns, INGRESS_LABELS, image)
    holder["labels"][wk.LABEL_GATEWAY] = wk.GATEWAY_INGRESS
    proxy = make_proxy(app, {}, INGRESS_LABELS, image)
    proxy["labels"][wk.LABEL_GATEWAY] = wk.GATEWAY_INGRESS
    proxy["environment"][wk.ENV_GATEWAY] = wk.GATEWAY_INGRESS
    for host in ingress.hosts:
        if host.tls is None:
            continue
        for source, name in ((host.tls.cert, "tls.crt"), (host.tls.key, "tls.key")):
            proxy["volumes"].append({
                "type": "bind", "source": os.path.abspath(source),
                "target": f"{wk.INGRESS_CERT_DIR}/{host.name}/{name}", "read_only": True})
    return {wk.netns_service(app): holder, wk.proxy_service(app): proxy}


EGRESS_LABELS = MeshLabels(enabled=True, service=wk.EGRESS_GATEWAY, version=wk.DEFAULT_VERSION,
                           weight=None, protocol=None)


def make_egress_gateway(
    egress: Egress, services: Mapping[str, Any], image: str,
    external: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """The egress gateway: a holder on the project's own networks (the sidecars reach it
    there) and on ``egress.networks`` (the outside it alone reaches), and a proxy in the
    gateway role listening for the sidecars' mTLS on EGRESS_PORT, which the holder's
    inbound capture leaves alone; the origination files mounted read-only."""
    app = wk.EGRESS_GATEWAY
    networks = sorted(set(own_networks(services, external)) | set(egress.networks))
    ns: dict[str, Any] = {
        "environment": {wk.ENV_EXCLUDE_INBOUND: str(wk.EGRESS_PORT)},
        "networks": dict.fromkeys(networks),
    }
    holder = make_holder(app, (app,), {}, ns, EGRESS_LABELS, image)
    holder["labels"][wk.LABEL_GATEWAY] = wk.GATEWAY_EGRESS
    proxy = make_proxy(app, {}, EGRESS_LABELS, image)
    proxy["labels"][wk.LABEL_GATEWAY] = wk.GATEWAY_EGRESS
    proxy["environment"][wk.ENV_GATEWAY] = wk.GATEWAY_EGRESS
    for i, entry in enumerate(egress.hosts):
        if entry.tls_origination is None:
            continue
        for target, source in egress_files(i, entry.tls_origination).items():
            proxy["volumes"].append({"type": "bind", "source": os.path.abspath(source),
                                     "target": target, "read_only": True})
    return {wk.netns_service(app): holder, wk.proxy_service(app): proxy}


# With x-composemesh.consul, the pilot resolves host.docker.internal to the host (on Linux
# too), so that `address: http://host.docker.internal:8500` reaches an agent on the host.
CONSUL_HOST_GATEWAY = "host.docker.internal:host-gateway"
EAST_WEST_LABELS = MeshLabels(enabled=True, service=wk.EAST_WEST_GATEWAY,
                              version=wk.DEFAULT_VERSION, weight=None, protocol=None)


def east_west_port(consul: Mapping[str, Any]) -> int:
    """The host port of ``x-composemesh.consul`` (validated before; the default if unset)."""
    port = consul.get("east_west_port", wk.PORT_EAST_WEST)
    return port if isinstance(port, int) and not isinstance(port, bool) else wk.PORT_EAST_WEST


def make_east_west_gateway(
    consul: Mapping[str, Any], services: Mapping[str, Any], image: str,
    external: frozenset[str] = frozenset(),
) -> dict[str, dict[str, Any]]:
    """The east-west gateway (``x-composemesh.consul``): a holder on every network of the
    project's own that a holder is on (it reaches each sidecar there), publishing
    ``east_west_port`` on every interface of the host to PORT_EAST_WEST in its namespace (the
    inbound capture leaves that port alone: the gateway listens there itself), and a proxy
    in the east-west role, which routes other hosts' mTLS by SNI."""
    app = wk.EAST_WEST_GATEWAY
    networks = own_networks(services, external)
    ns: dict[str, Any] = {
        "ports": [{"target": wk.PORT_EAST_WEST, "published": str(east_west_port(consul)),
                   "protocol": "tcp", "mode": "ingress"}],
        "environment": {wk.ENV_EXCLUDE_INBOUND: str(wk.PORT_EAST_WEST)},
        **({"networks": dict.fromkeys(networks)} if networks else {"network_mode": "none"}),
    }
    holder = make_holder(app, (app,), {}, ns, EAST_WEST_LABELS, image)
    holder["labels"][wk.LABEL_GATEWAY] = wk.GATEWAY_EAST_WEST
    proxy = make_proxy(app, {}, EAST_WEST_LABELS, image)
    proxy["labels"][wk.LABEL_GATEWAY] = wk.GATEWAY_EAST_WEST
    proxy["environment"][wk.ENV_GATEWAY] = wk.GATEWAY_EAST_WEST
    return {wk.netns_service(app): holder, wk.proxy_service(app): proxy}


def consul_for_pilot(
    section: Mapping[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, None]]:
    """What the pilot is given of ``x-composemesh.consul`` (validated before): the section as
    its pilot reads it, its mounts and its environment. The token never gets into the file:
    a ``token_file`` is mounted read-only at PILOT_CONSUL_TOKEN, which the pilot's copy names;
    without one, CONSUL_HTTP_TOKEN is passed by name only, so that compose takes its value
    from the environment of `up`. The same for CONSUL_HTTP_ADDR when ``address`` is unset."""
    consul = dict(section.get("consul") or {})
    mounts: list[dict[str, Any]] = []
    environment: dict[str, None] = {}
    token_file = consul.get("token_file")
    if isinstance(token_file, str) and token_file.strip():
        source = os.path.abspath(os.path.expanduser(token_file.strip()))
        mounts.append({"type": "bind", "source": source, "target": wk.PILOT_CONSUL_TOKEN,
                       "read_only": True})
        consul["token_file"] = wk.PILOT_CONSUL_TOKEN
    else:
        environment[ENV_TOKEN] = None
    if consul.get("address") is None:
        environment[ENV_ADDRESS] = None
    return {**section, "consul": consul}, mounts, environment


def add_egress_names(services: dict[str, Any], egress: EgressSettings) -> None:
    """Every meshed namespace resolves each listed external host to its VIP (the holder's
    ``extra_hosts``: the apps in its namespace share its /etc/hosts), so that an app calls
    it by name as without the mesh and its sidecar knows the call by that address."""
    for name, svc in services.items():
        if role_of(svc, name) != wk.ROLE_NETNS or labels_of(svc, name).get(wk.LABEL_GATEWAY):
            continue
        current = svc.get("extra_hosts")
        if isinstance(current, Mapping):
            extra = dict(current)
            for entry in egress.hosts:
                extra.setdefault(entry.host, entry.vip)
            svc["extra_hosts"] = extra
        else:
            listed = [str(item) for item in current or ()]
            named = {item.replace("=", ":").split(":", 1)[0] for item in listed}
            listed += [f"{e.host}:{e.vip}" for e in egress.hosts if e.host not in named]
            svc["extra_hosts"] = listed


def make_pilot(
    services: Mapping[str, Any],
    settings: Any,
    image: str,
    root: tuple[str, str] | None = None,
    external: frozenset[str] = frozenset(),
    ingress: IngressSettings | None = None,
    egress: EgressSettings | None = None,
) -> dict[str, Any]:
    """The control plane: on every network of the project's own that a holder is on (it
    scrapes the proxies' metrics there), never on an ``external`` one (another project's
    containers are there: the pilot has no business with them), and listening on none: its
    API is on the Unix socket in the socket volume, which only the proxies mount. With no
    network of the project's own it has none (``network_mode: none``). It runs in the host's
    PID namespace, so that the PID the kernel gives for a caller of that socket names the same
    process as on the host (``pilot.attest``).

    ``root``: the host paths of the user's own root cert and key, mounted read-only where
    the pilot's CA looks for them (named in its environment). ``settings``' ``consul``
    section reaches the pilot as ``consul_for_pilot`` makes it: the token file mounted,
    the token's and the address's variables passed by name, never a token in the file.
    """
    own = own_networks(services, external)
    pilot: dict[str, Any] = {
        "image": image,
        "command": ["composemesh", "pilot"],
        "restart": "unless-stopped",
        "pid": "host",
        "cap_drop": list(DROP_ALL),
        "security_opt": list(NO_NEW_PRIVILEGES),
        "volumes": [
            {"type": "bind", "source": DOCKER_SOCKET, "target": DOCKER_SOCKET},
            {"type": "volume", "source": PILOT_VOLUME, "target": "/var/lib/composemesh"},
            {"type": "volume", "source": SOCKET_VOLUME, "target": wk.PILOT_SOCKET_DIR},
        ],
        **({"networks": dict.fromkeys(own)} if own else {"network_mode": "none"}),
        "healthcheck": copy.deepcopy(PILOT_HEALTHCHECK),
        "labels": {wk.LABEL_ROLE: wk.ROLE_PILOT},
    }
    consul_mounts: list[dict[str, Any]] = []
    consul_env: dict[str, None] = {}
    federated = isinstance(settings, Mapping) and isinstance(settings.get("consul"), Mapping)
    if federated:
        settings, consul_mounts, consul_env = consul_for_pilot(settings)
    if settings is not None:
        # Not $-escaped again: the model is compose's resolved one, a literal `$` in it
        # written `$$` already, so compose reads this copy at `up` as it reads the section.
        pilot["environment"] = {
            "COMPOSEMESH_SETTINGS": json.dumps(settings, sort_keys=True, default=str)
        }
    if ingress is not None:  # as `check` resolved it: the file's routes and the labels'
        pilot.setdefault("environment", {})[wk.ENV_INGRESS] = encode(ingress).decode()
    if egress is not None:  # with each host's VIP
        pilot.setdefault("environment", {})[wk.ENV_EGRESS] = encode(egress).decode()
    if root is not None:
        for source, target in zip(root, (PILOT_ROOT_CERT, PILOT_ROOT_KEY), strict=True):
            pilot["volumes"].append(
                {"type": "bind", "source": source, "target": target, "read_only": True}
            )
        pilot.setdefault("environment", {}).update(
            {ENV_CA_CERT_FILE: PILOT_ROOT_CERT, ENV_CA_KEY_FILE: PILOT_ROOT_KEY}
        )
    pilot["volumes"].extend(consul_mounts)
    if federated and "networks" in pilot:  # an agent on the host, by Docker Desktop's name
        pilot["extra_hosts"] = [CONSUL_HOST_GATEWAY]
    if consul_env:  # names only: compose takes each value from the environment of `up`
        pilot.setdefault("environment", {}).update(consul_env)
    if federated:  # a catalog name never takes the place of one Docker's DNS answers here
        pilot.setdefault("environment", {})[wk.ENV_LOCAL_NAMES] = ",".join(local_names(services))
    return pilot


def local_names(services: Mapping[str, Any]) -> list[str]:
    """Every name Docker's DNS answers in the project: its services' names, container names
    and network aliases, sorted."""
    names: set[str] = set()
    for name, svc in services.items():
        names.add(str(name))
        if not isinstance(svc, Mapping):
            continue
        if svc.get("container_name"):
            names.add(str(svc["container_name"]))
        networks = svc.get("networks")
        if isinstance(networks, Mapping):
            for attachment in networks.values():
                if isinstance(attachment, Mapping):
                    names.update(str(a) for a in attachment.get("aliases") or ())
    return sorted(names)


def user_root_files(
    ca: CAConfig | None, services: Mapping[str, Any]
) -> tuple[str, str] | None:
    """The host paths (absolute) of the user's root cert and key, None when the CA makes its
    own: from ``ca``, else from the mounts of the pilot of an already meshed file."""
    if ca is not None:
        if ca.root_cert_path is None or ca.root_key_path is None:
            return None
        return os.path.abspath(ca.root_cert_path), os.path.abspath(ca.root_key_path)
    for name, svc in services.items():
        if role_of(svc, name) == wk.ROLE_PILOT:
            sources = {
                v.get("target"): v.get("source")
                for v in svc.get("volumes") or ()
                if isinstance(v, Mapping) and v.get("type") == "bind"
            }
            cert, key = sources.get(PILOT_ROOT_CERT), sources.get(PILOT_ROOT_KEY)
            if cert and key:
                return str(cert), str(key)
    return None
