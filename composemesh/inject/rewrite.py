"""The pure rewrite of a compose model into a meshed one: a netns holder and a proxy per app.

No I/O here: a dict comes in, a new dict goes out, the input is never mutated, and injecting
an injected model changes nothing.

For every meshed compose service ``S`` (Kubernetes' pause container, in compose terms):

- ``S-netns`` owns the network namespace: it carries everything of ``S`` that belongs to the
  namespace (ports, networks and their aliases, hostname, dns, ...), installs the iptables
  capture rules and sleeps;
- ``S-proxy`` joins that namespace as uid 1337 and talks to the pilot;
- ``S`` itself joins it too (``network_mode: service:S-netns``) and keeps everything else.

One ``composemesh-pilot`` is added when anything is meshed.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.ca_config import (
    ENV_CA_CERT_FILE,
    ENV_CA_KEY_FILE,
    PILOT_ROOT_CERT,
    PILOT_ROOT_KEY,
    CAConfig,
)
from composemesh.model.labels import MeshLabels, normalize_labels, parse_labels
from composemesh.model.limits import limits_to_env
from composemesh.model.settings import SECTION

# Keys of a service that belong to its network namespace: Docker refuses them on a container
# that joins another's namespace, so they move to the holder. (net.* sysctls move too.)
NETNS_KEYS = (
    "ports",
    "expose",
    "networks",
    "hostname",
    "domainname",
    "dns",
    "dns_search",
    "dns_opt",
    "extra_hosts",
    "mac_address",
    "links",
    "external_links",
)
PILOT_URL = wk.PILOT_URL
# What each injected container may do: every capability dropped but what it needs, and no
# gaining more (setuid binaries, file capabilities). The holder installs iptables rules
# (nf_tables: NET_ADMIN alone); the proxy and the pilot need none. No NET_RAW anywhere: it is
# what forging addresses and ARP answers takes.
HOLDER_CAPS = ("NET_ADMIN",)
DROP_ALL = ["ALL"]
NO_NEW_PRIVILEGES = ["no-new-privileges:true"]
SOCKET_VOLUME = "composemesh-pilot-socket"  # the pilot's API socket: mesh containers only
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
# Roles of the services this module adds and regenerates; other roles are left alone.
OWN_ROLES = (wk.ROLE_NETNS, wk.ROLE_PROXY, wk.ROLE_PILOT)
# Keys of a holder that the injector writes itself; the rest was the app's and is kept.
# Its depends_on is derived each time (its app's start order, links, static addresses).
_HOLDER_OWN_KEYS = ("image", "command", "cap_add", "cap_drop", "security_opt", "restart",
                    "labels", "profiles", "deploy", "depends_on")


@dataclass(frozen=True)
class AddedService:
    """A service the injector put into the model: its name, role and the app it serves."""

    name: str
    role: str  # wk.ROLE_NETNS | wk.ROLE_PROXY | wk.ROLE_PILOT
    of: str | None  # the app compose service; None for the pilot


@dataclass(frozen=True)
class ServicePlan:
    """What happens to one user compose service: one row of the plan shown to the user."""

    service: str  # compose service name
    mesh_service: str | None  # None: not in the mesh
    version: str | None
    netns: str | None  # the service that owns its network namespace
    proxy: str | None  # the proxy it sits beside
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class InjectResult:
    """The meshed model, what was said about it, and what it holds."""

    model: dict[str, Any]
    warnings: tuple[str, ...] = ()
    added: tuple[AddedService, ...] = ()  # every injected service in ``model``
    services: tuple[ServicePlan, ...] = field(default=())  # one per user service, in order


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class _Decision:
    """How the injector treats one user service."""

    kind: str  # owner | meshed | joiner | left_out | disabled | foreign
    holder: str | None = None  # joiner/meshed: the holder whose namespace it is in
    owner: str | None = None  # joiner/meshed: the app that holder serves
    note: str | None = None  # left_out: why (a warning); joiner: what (a warning)


def _labels_of(svc: Mapping[str, Any], name: str) -> dict[str, str]:
    return normalize_labels(svc.get("labels"), service=name)


def _role(svc: Any, name: str) -> str | None:
    if not isinstance(svc, Mapping):
        return None
    return _labels_of(svc, name).get(wk.LABEL_ROLE)


def _classify(
    services: Mapping[str, Any], mesh: Mapping[str, MeshLabels]
) -> dict[str, _Decision]:
    """Decide, for every user (not injected) service, whether and how it joins the mesh."""
    roles = {name: _role(svc, name) for name, svc in services.items()}
    out: dict[str, _Decision] = {}

    def decide(name: str, seen: tuple[str, ...]) -> _Decision:
        if name in out:
            return out[name]
        svc = services[name]
        mode = svc.get("network_mode")
        mode = None if mode is None else str(mode)
        target = mode[len("service:") :] if mode and mode.startswith("service:") else None
        if target is not None and roles.get(target) == wk.ROLE_NETNS:
            of = _labels_of(services[target], target).get(wk.LABEL_OF, "")
            if of == name and target == wk.netns_service(name):
                return _Decision("meshed", holder=target, owner=name)
            return _Decision(
                "joiner",
                holder=target,
                owner=of,
                note=f"network_mode {mode}: shares the network namespace and the proxy "
                f"of meshed service {of!r} (no sidecar of its own)",
            )
        if not mesh[name].enabled:
            return _Decision("disabled")
        if mode is None:
            return _Decision("owner")
        if mode in ("host", "none"):
            return _Decision(
                "left_out",
                note=f"network_mode {mode}: left out of the mesh "
                "(a sidecar needs the service's own network namespace)",
            )
        if mode.startswith("container:"):
            return _Decision(
                "left_out",
                note=f"network_mode {mode}: left out of the mesh "
                "(its namespace belongs to a container outside the project)",
            )
        if target is not None:
            base: _Decision | None = None
            if target in services and roles.get(target) is None and target not in seen:
                base = decide(target, (*seen, name))
                out[target] = base
            if base is not None and base.kind in ("owner", "meshed"):
                return _Decision(
                    "joiner",
                    holder=wk.netns_service(target),
                    owner=target,
                    note=f"network_mode {mode}: shares the network namespace and the proxy "
                    f"of meshed service {target!r} (no sidecar of its own)",
                )
            if base is not None and base.kind == "joiner":
                return _Decision(
                    "joiner",
                    holder=base.holder,
                    owner=base.owner,
                    note=f"network_mode {mode}: shares the network namespace and the proxy "
                    f"of meshed service {base.owner!r} (no sidecar of its own)",
                )
            return _Decision(
                "left_out",
                note=f"network_mode {mode}: left out of the mesh "
                f"(service {target!r} is not in the mesh)",
            )
        return _Decision("owner")

    for name in services:
        if roles[name] is None:
            out[name] = decide(name, ())
        elif roles[name] not in OWN_ROLES:
            out[name] = _Decision("foreign")  # someone else's role: kept as it is
    return out


def _replicas(svc: Mapping[str, Any]) -> int | str | None:
    """``scale`` or ``deploy.replicas``: an int, the raw text if not a number, None if unset."""
    value = svc.get("scale")
    if value is None:
        deploy = svc.get("deploy")
        value = deploy.get("replicas") if isinstance(deploy, Mapping) else None
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.isdigit() else text


def _instance_names(name: str, replicas: int | str | None) -> list[str]:
    count = replicas if isinstance(replicas, int) and replicas > 1 else 1
    return [wk.instance_service(name, i) for i in range(1, count + 1)]


def injected_names(
    model: Mapping[str, Any], labels: Mapping[str, MeshLabels] | None = None
) -> dict[str, str]:
    """Every service name the injector would add, each with a phrase saying what it is for.

    Only services it would newly create count: an injected model yields nothing new.
    """
    services = _services(model)
    mesh = _mesh_labels(services, labels)
    decisions = _classify(services, mesh)
    names: dict[str, str] = {}
    for name, decision in decisions.items():
        if decision.kind != "owner":
            continue
        instances = _instance_names(name, _replicas(services[name]))
        for index, inst in enumerate(instances, start=1):
            if index > 1:
                names[inst] = f"instance {index} of replicated service {name!r}"
            names[wk.netns_service(inst)] = f"network namespace holder of service {inst!r}"
            names[wk.proxy_service(inst)] = f"proxy of service {inst!r}"
    if any(d.kind in ("owner", "meshed") for d in decisions.values()):
        names[wk.PILOT_SERVICE] = "mesh's pilot"
    return names


def collisions(
    model: Mapping[str, Any], labels: Mapping[str, MeshLabels] | None = None
) -> list[tuple[str, str]]:
    """User services whose name the injector needs: (name, what the injector adds there)."""
    services = _services(model)
    return [
        (name, what)
        for name, what in injected_names(model, labels).items()
        if name in services and _role(services[name], name) not in OWN_ROLES
    ]


# --------------------------------------------------------------------------- the rewrite


def inject(
    model: Mapping[str, Any],
    labels: Mapping[str, MeshLabels] | None = None,
    *,
    image: str = wk.MESH_IMAGE,
    ca: CAConfig | None = None,
) -> InjectResult:
    """Return ``model`` with every meshed service given a netns holder and a proxy.

    ``labels`` are the validated MeshLabels per compose service; a service missing from it
    has its labels parsed here. ``ca`` is the validated ``x-composemesh: mtls:``: a root the
    user brings is mounted into the pilot, read-only; without ``ca``, the root the pilot of
    an already meshed ``model`` mounts stays. Raises ConfigError if a user service already
    has a name the injector needs (validate_project says so with the file first).
    """
    src: dict[str, Any] = copy.deepcopy(dict(model))
    services = _services(src)
    mesh = _mesh_labels(services, labels)
    clash = collisions(src, mesh)
    if clash:
        name, what = clash[0]
        raise ConfigError(
            f"the name is taken: the injector adds {name!r} as the {what}", service=name
        )
    decisions = _classify(services, mesh)
    ctx = _Context(services=services, mesh=mesh, decisions=decisions, image=image)

    out_services: dict[str, Any] = {}
    for name, svc in services.items():
        decision = decisions.get(name)
        if decision is None:  # injected: emitted beside its app, or dropped as an orphan
            continue
        if decision.kind == "owner":
            ctx.expand_owner(name, svc, out_services)
        elif decision.kind == "meshed":
            ctx.keep_meshed(name, svc, out_services)
        elif decision.kind == "joiner":
            ctx.join(name, svc, decision, out_services)
        else:
            if decision.note:
                ctx.warn(name, decision.note)
            elif decision.kind == "disabled":
                ctx.note(name, f"{wk.LABEL_ENABLE}=false: not in the mesh")
            out_services[name] = svc
            ctx.rows[name] = ServicePlan(name, None, None, None, None)

    _rewrite_links(out_services, ctx.link_targets())
    _extend_instance_dependencies(out_services)
    _follow_start_order(out_services)

    if ctx.meshed_any:
        root = _user_root_files(ca, services)
        external = _external_networks(src.get("networks"))
        out_services[wk.PILOT_SERVICE] = _pilot(
            out_services, src.get(SECTION), image, root, external
        )
        ctx.added.append(AddedService(wk.PILOT_SERVICE, wk.ROLE_PILOT, None))
        for name in _unscraped(out_services, external):
            ctx.warn(name, "on external networks only: the pilot joins none of them, so "
                     "this proxy's metrics are not scraped (its traffic is meshed as usual)")
        for name, text in _protect_static_addresses(out_services):
            ctx.warn(name, text)
    else:
        ctx.warnings.append("no service is in the mesh: nothing was injected")
    for name, svc in services.items():
        if name not in out_services and _role(svc, name) in OWN_ROLES:
            of = _labels_of(svc, name).get(wk.LABEL_OF)
            why = f"its app {of!r} is gone or out of the mesh" if of else "nothing is meshed"
            ctx.warnings.append(f"service {name!r}: injected earlier, dropped now: {why}")

    result = {key: (out_services if key == "services" else value) for key, value in src.items()}
    if "services" not in result:
        result["services"] = out_services
    if ctx.meshed_any:  # the pilot's state (route overrides) outlives its container
        volumes = dict(result.get("volumes") or {})
        volumes.setdefault(PILOT_VOLUME, None)
        volumes.setdefault(SOCKET_VOLUME, None)
        result["volumes"] = volumes
    rows = tuple(
        ServicePlan(
            row.service, row.mesh_service, row.version, row.netns, row.proxy,
            tuple(ctx.notes.get(row.service, ())),
        )
        for row in ctx.rows.values()
    )
    return InjectResult(
        model=result, warnings=tuple(ctx.warnings), added=tuple(ctx.added), services=rows
    )


@dataclass
class _Context:
    """The state of one inject() call: inputs, and what has been said and added so far."""

    services: dict[str, Any]
    mesh: Mapping[str, MeshLabels]
    decisions: Mapping[str, _Decision]
    image: str
    warnings: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    added: list[AddedService] = field(default_factory=list)
    rows: dict[str, ServicePlan] = field(default_factory=dict)
    meshed_any: bool = False

    def warn(self, service: str, text: str) -> None:
        self.warnings.append(f"service {service!r}: {text}")
        self.notes.setdefault(service, []).append(text)

    def note(self, service: str, text: str) -> None:
        self.notes.setdefault(service, []).append(text)

    def emit(
        self,
        out: dict[str, Any],
        app_name: str,
        app: dict[str, Any],
        holder: dict[str, Any],
        labels: MeshLabels,
    ) -> None:
        """Put an app, its holder and its proxy into ``out``, in that order."""
        holder_name, proxy_name = wk.netns_service(app_name), wk.proxy_service(app_name)
        escape = capture_escape(app)
        if escape:
            self.warn(app_name, escape)
        udp = _udp_ports(holder)
        if udp:
            self.note(app_name, f"UDP {', '.join(udp)} not captured: it passes the mesh as it "
                      "is (plaintext, no policy, no metrics), as with Istio and Consul")
        out[app_name] = app
        out[holder_name] = holder
        out[proxy_name] = _proxy(app_name, app, labels, self.image)
        self.added.append(AddedService(holder_name, wk.ROLE_NETNS, app_name))
        self.added.append(AddedService(proxy_name, wk.ROLE_PROXY, app_name))
        self.rows[app_name] = ServicePlan(
            app_name, labels.service, labels.version, holder_name, proxy_name
        )
        self.meshed_any = True

    def expand_owner(self, name: str, svc: dict[str, Any], out: dict[str, Any]) -> None:
        """A service meshed for the first time: one app/holder/proxy triple per replica."""
        labels = self.mesh[name]
        replicas = _replicas(svc)
        instances = _instance_names(name, replicas)
        if isinstance(replicas, str):
            self.warn(
                name,
                f"replicas {replicas!r} is not a number: not expanded, so every replica "
                f"shares the network namespace (and proxy) of its first container",
            )
        mode = svc.get("network_mode")
        if mode is not None:
            why = "network aliases do not work there, " if mode == "bridge" else ""
            self.warn(
                name,
                f"network_mode {mode}: kept on its holder {wk.netns_service(name)!r}; "
                f"{why}so other services may not reach it by name and its proxy may not "
                f"reach the pilot",
            )
        dropped: list[str] = []
        for index, inst in enumerate(instances, start=1):
            app = copy.deepcopy(svc)
            ns = _take_netns(app)
            if len(instances) > 1:
                _make_instance(app, labels.service, index)
                if index > 1 and "ports" in ns:
                    kept = [p for p in ns["ports"] if not _fixed_host_port(p)]
                    if index == 2:
                        dropped = [_port_text(p) for p in ns["ports"] if _fixed_host_port(p)]
                    if kept:
                        ns["ports"] = kept
                    else:
                        del ns["ports"]
                self.note(inst, f"instance {index} of {len(instances)} of service {name!r}")
            _join_holder(app, wk.netns_service(inst), wk.proxy_service(inst))
            names = self.answered_names(inst, name, app, labels)
            holder = _holder(inst, names, app, ns, labels, self.image)
            self.emit(out, inst, app, holder, labels)
        if replicas == 0:
            self.note(name, "0 replicas: its holder and proxy get 0 replicas too")
        if len(instances) > 1:
            self.warn(
                name,
                f"{len(instances)} replicas expanded into services {', '.join(instances)}, "
                "each with its own netns holder and proxy (compose pairs network_mode "
                "service: with the first container of a service only)",
            )
        if dropped:
            self.warn(
                name,
                f"published port{'s' if len(dropped) > 1 else ''} {', '.join(dropped)} "
                f"stay{'' if len(dropped) > 1 else 's'} on the first instance only "
                "(a fixed host port can be bound once)",
            )

    def keep_meshed(self, name: str, svc: dict[str, Any], out: dict[str, Any]) -> None:
        """An app injected before: keep it, regenerate its holder and proxy."""
        labels = self.mesh[name]
        holder_name = wk.netns_service(name)
        existing = self.services[holder_name]
        ns = {k: v for k, v in existing.items() if k not in _HOLDER_OWN_KEYS}
        app_labels = _labels_of(svc, name)
        base = name
        index = app_labels.get(wk.LABEL_INSTANCE, "")
        if index.isdigit() and int(index) > 1 and name.endswith(f"-{index}"):
            base = name[: -len(f"-{index}")]
        _join_holder(svc, holder_name, wk.proxy_service(name))
        names = self.answered_names(name, base, svc, labels)
        holder = _holder(name, names, svc, ns, labels, self.image)
        self.emit(out, name, svc, holder, labels)

    def join(
        self, name: str, svc: dict[str, Any], decision: _Decision, out: dict[str, Any]
    ) -> None:
        """A service that shares a meshed service's namespace (network_mode service:Y)."""
        assert decision.holder is not None and decision.owner is not None
        _join_holder(svc, decision.holder, wk.proxy_service(decision.owner))
        if decision.note:
            self.warn(name, decision.note)
        out[name] = svc
        owner = self.mesh.get(decision.owner)
        self.rows[name] = ServicePlan(
            name,
            owner.service if owner else None,
            owner.version if owner else None,
            decision.holder,
            wk.proxy_service(decision.owner),
        )

    def answered_names(self, app_name: str, base: str, app: Mapping[str, Any],
                       labels: MeshLabels) -> list[str]:
        """Every name the app's container answered to on its networks before it was meshed,
        but its network aliases (they move to the holder with ``networks``): its service name
        (and its base service's, for an instance), its mesh service and its
        ``container_name``. The app now sits in its holder's namespace, so the holder carries
        them as aliases; ``container_name`` itself stays on the app (only one container can
        have it). The name compose derives for a container (``<project>-<service>-1``) is not
        carried: it would pin the file to one project name."""
        names = [app_name, base, labels.service]
        if app.get("container_name"):
            names.append(str(app["container_name"]))
        return list(dict.fromkeys(names))

    def link_targets(self) -> dict[str, str]:
        """Meshed services have no network endpoint of their own: links go to their holder."""
        targets = {}
        for name, decision in self.decisions.items():
            if decision.kind in ("owner", "meshed"):
                targets[name] = wk.netns_service(name)
            elif decision.kind == "joiner" and decision.holder:
                targets[name] = decision.holder
        return targets


# --------------------------------------------------------------------------- building blocks


def _services(model: Mapping[str, Any]) -> dict[str, Any]:
    services = model.get("services") or {}
    if not isinstance(services, dict):
        raise ConfigError("must be a mapping of service names to services", field="services")
    for name, svc in services.items():
        if not isinstance(svc, dict):
            raise ConfigError("must be a mapping", service=name)
    return services


def _mesh_labels(
    services: Mapping[str, Any], labels: Mapping[str, MeshLabels] | None
) -> dict[str, MeshLabels]:
    given = labels or {}
    return {
        name: given[name]
        if name in given
        else parse_labels(_labels_of(svc, name), compose_service=name)
        for name, svc in services.items()
    }


def _take_netns(app: dict[str, Any]) -> dict[str, Any]:
    """Remove from ``app`` (and return) what belongs to its network namespace."""
    ns = {key: app.pop(key) for key in NETNS_KEYS if key in app}
    mode = app.pop("network_mode", None)
    if mode is not None:
        ns["network_mode"] = mode
    if "sysctls" in app:
        net, rest = _split_sysctls(app["sysctls"])
        if net is not None:
            ns["sysctls"] = net
            if rest is None:
                del app["sysctls"]
            else:
                app["sysctls"] = rest
    return ns


def _split_sysctls(value: Any) -> tuple[Any, Any]:
    """(net.* sysctls, the others), each in the form they came in, None if empty."""
    if isinstance(value, Mapping):
        net_map = {k: v for k, v in value.items() if str(k).strip().startswith("net.")}
        rest_map = {k: v for k, v in value.items() if k not in net_map}
        return (net_map or None), (rest_map or None)
    if isinstance(value, list):
        net = [s for s in value if str(s).partition("=")[0].strip().startswith("net.")]
        rest = [s for s in value if s not in net]
        return (net or None), (rest or None)
    return None, value


def _make_instance(app: dict[str, Any], mesh_service: str, index: int) -> None:
    """Turn a copy of a replicated service into instance ``index`` of it."""
    app.pop("scale", None)
    deploy = app.get("deploy")
    if isinstance(deploy, dict):
        deploy.pop("replicas", None)
        if not deploy:
            del app["deploy"]
    labels = _labels_of(app, "")
    labels[wk.LABEL_SERVICE] = mesh_service
    labels[wk.LABEL_INSTANCE] = str(index)
    app["labels"] = labels


def _fixed_host_port(port: Any) -> bool:
    """Whether a ports entry (long or short syntax) publishes one fixed host port."""
    if isinstance(port, Mapping):
        published = port.get("published")
        text = "" if published is None else str(published).strip()
    elif isinstance(port, int):
        return False
    else:
        spec = str(port).rpartition("/")[0] or str(port)
        if spec.startswith("["):  # [ipv6]:host:container
            spec = spec[spec.index("]") + 1 :].lstrip(":")
            parts = spec.split(":")
            text = parts[0] if len(parts) == 2 else ""
        else:
            parts = spec.split(":")
            text = parts[-2] if len(parts) >= 2 else ""
    return bool(text) and "-" not in text and text != "0"


def _udp_ports(holder: Mapping[str, Any]) -> list[str]:
    """The UDP ports a holder publishes or exposes, as ``<container port>/udp``."""
    found = []
    for port in holder.get("ports") or ():
        if isinstance(port, Mapping):
            if str(port.get("protocol", "tcp")).lower() == "udp":
                found.append(f"{port.get('target')}/udp")
        elif str(port).lower().endswith("/udp"):
            found.append(f"{str(port)[:-4].rpartition(':')[2]}/udp")
    for port in holder.get("expose") or ():
        if str(port).lower().endswith("/udp"):
            found.append(str(port).lower())
    return list(dict.fromkeys(found))


def _port_text(port: Any) -> str:
    if not isinstance(port, Mapping):
        return str(port)
    host = f"{port['host_ip']}:" if port.get("host_ip") else ""
    return f"{host}{port.get('published', '')}:{port.get('target')}/{port.get('protocol', 'tcp')}"


def _dependency(condition: str, *, restart: bool = False) -> dict[str, Any]:
    dep: dict[str, Any] = {"condition": condition, "required": True}
    if restart:
        dep["restart"] = True
    return dep


def _depends_on_mapping(svc: dict[str, Any]) -> dict[str, Any]:
    """``depends_on`` of ``svc`` as a mapping (a list becomes service_started entries)."""
    deps = svc.get("depends_on")
    if isinstance(deps, Mapping):
        mapping = dict(deps)
    else:
        mapping = {str(d): _dependency("service_started") for d in deps or ()}
    svc["depends_on"] = mapping
    return mapping


# Capabilities with which an app in the namespace can undo or step past its proxy's capture.
_ESCAPE_CAPS = ("ALL", "NET_ADMIN", "NET_RAW", "SYS_ADMIN")


def capture_escape(app: Mapping[str, Any]) -> str:
    """Why ``app`` could leave its proxy (pure): ``privileged``, or capabilities that rewrite
    the namespace's iptables rules or forge packets; "" when it asks for none of them.

    Every app that runs as root can also ``setuid`` to the proxy's uid, whose traffic is never
    captured (Istio has the same limit); ``cap_drop: [SETUID]`` or a ``user`` closes that.
    """
    added = {str(c).upper().removeprefix("CAP_") for c in app.get("cap_add") or ()}
    dropped = {str(c).upper().removeprefix("CAP_") for c in app.get("cap_drop") or ()}
    risky = [c for c in _ESCAPE_CAPS if c in added and c not in dropped]
    if app.get("privileged") in (True, "true"):
        risky.insert(0, "privileged")
    if not risky:
        return ""
    return (f"{', '.join(risky)}: the app can rewrite its namespace's capture rules or forge "
            f"packets, and so bypass its proxy (mTLS, policies); grant it only if you trust "
            f"the app as much as the mesh")


def _join_holder(svc: dict[str, Any], holder: str, proxy: str) -> None:
    """Put ``svc`` into ``holder``'s namespace, starting once ``proxy`` captures traffic."""
    svc["network_mode"] = f"service:{holder}"
    deps = _depends_on_mapping(svc)
    deps[holder] = _dependency("service_started", restart=True)
    deps[proxy] = _dependency("service_healthy")


def _with_aliases(networks: Any, aliases: Iterable[str]) -> dict[str, Any]:
    """``networks`` as a mapping, each entry's aliases extended with ``aliases``."""
    if isinstance(networks, Mapping):
        entries = dict(networks)
    else:
        entries = {str(n): None for n in networks or ()}
    out: dict[str, Any] = {}
    for net, spec in entries.items():
        spec = dict(spec) if isinstance(spec, Mapping) else {}
        current = list(spec.get("aliases") or [])
        for alias in aliases:
            if alias not in current:
                current.append(alias)
        spec["aliases"] = current
        out[net] = spec
    return out


def _holder(
    app_name: str,
    names: Iterable[str],
    app: Mapping[str, Any],
    ns: Mapping[str, Any],
    labels: MeshLabels,
    image: str,
) -> dict[str, Any]:
    """The service that owns ``app_name``'s network namespace, answering to ``names`` on
    each of its networks."""
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
        holder["networks"] = _with_aliases(holder.get("networks") or {"default": None}, names)
    holder["labels"] = _injected_labels(wk.ROLE_NETNS, app_name, app, labels)
    _follow_app(holder, app)
    return holder


def _proxy(
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
            wk.netns_service(app_name): _dependency("service_started", restart=True),
            wk.PILOT_SERVICE: _dependency("service_healthy"),
        },
        "labels": _injected_labels(wk.ROLE_PROXY, app_name, app, labels),
    }
    _follow_app(proxy, app)
    return proxy


def _injected_labels(
    role: str, app_name: str, app: Mapping[str, Any], labels: MeshLabels
) -> dict[str, str]:
    out = {
        wk.LABEL_ROLE: role,
        wk.LABEL_OF: app_name,
        wk.LABEL_SERVICE: labels.service,
        wk.LABEL_VERSION: labels.version,
    }
    instance = _labels_of(app, app_name).get(wk.LABEL_INSTANCE)
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
    if _replicas(app) == 0:
        injected["deploy"] = {"replicas": 0}


PILOT_VOLUME = "composemesh-pilot-state"


def _user_root_files(
    ca: CAConfig | None, services: Mapping[str, Any]
) -> tuple[str, str] | None:
    """The host paths (absolute) of the user's root cert and key, None when the CA makes its
    own: from ``ca``, else from the mounts of the pilot of an already meshed file."""
    if ca is not None:
        if ca.root_cert_path is None or ca.root_key_path is None:
            return None
        return os.path.abspath(ca.root_cert_path), os.path.abspath(ca.root_key_path)
    for name, svc in services.items():
        if _role(svc, name) == wk.ROLE_PILOT:
            sources = {
                v.get("target"): v.get("source")
                for v in svc.get("volumes") or ()
                if isinstance(v, Mapping) and v.get("type") == "bind"
            }
            cert, key = sources.get(PILOT_ROOT_CERT), sources.get(PILOT_ROOT_KEY)
            if cert and key:
                return str(cert), str(key)
    return None


def _external_networks(networks: Any) -> frozenset[str]:
    """The keys of the top-level networks that the project does not own (``external``)."""
    if not isinstance(networks, Mapping):
        return frozenset()
    return frozenset(
        str(key) for key, spec in networks.items()
        if isinstance(spec, Mapping) and spec.get("external") in (True, "true", "True")
    )


def _holder_networks(svc: Mapping[str, Any]) -> list[str]:
    if "network_mode" in svc:
        return []
    return [str(n) for n in svc.get("networks") or {}]


def _unscraped(services: Mapping[str, Any], external: frozenset[str]) -> list[str]:
    """The apps whose holder is on external networks only (the pilot is on none of them)."""
    return [
        _labels_of(svc, name).get(wk.LABEL_OF, name)
        for name, svc in services.items()
        if _role(svc, name) == wk.ROLE_NETNS
        and (nets := _holder_networks(svc)) and set(nets) <= external
    ]


def _pilot(
    services: Mapping[str, Any],
    settings: Any,
    image: str,
    root: tuple[str, str] | None = None,
    external: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """The control plane: on every network of the project's own that a holder is on (it
    scrapes the proxies' metrics there), never on an ``external`` one (another project's
    containers are there: the pilot has no business with them), and listening on none: its
    API is on the Unix socket in the socket volume, which only the proxies mount. With no
    network of the project's own it has none (``network_mode: none``). It runs in the host's
    PID namespace, so that the PID the kernel gives for a caller of that socket names the same
    process as on the host (``pilot.attest``).

    ``root``: the host paths of the user's own root cert and key, mounted read-only where
    the pilot's CA looks for them (named in its environment).
    """
    networks: set[str] = set()
    for name, svc in services.items():
        if _role(svc, name) == wk.ROLE_NETNS:
            networks.update(_holder_networks(svc))
    own = sorted(networks - external)
    if not own and "default" not in external:
        own = ["default"]
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
    if settings is not None:
        # Not $-escaped again: the model is compose's resolved one, a literal `$` in it
        # written `$$` already, so compose reads this copy at `up` as it reads the section.
        pilot["environment"] = {
            "COMPOSEMESH_SETTINGS": json.dumps(settings, sort_keys=True, default=str)
        }
    if root is not None:
        for source, target in zip(root, (PILOT_ROOT_CERT, PILOT_ROOT_KEY), strict=True):
            pilot["volumes"].append(
                {"type": "bind", "source": source, "target": target, "read_only": True}
            )
        pilot.setdefault("environment", {}).update(
            {ENV_CA_CERT_FILE: PILOT_ROOT_CERT, ENV_CA_KEY_FILE: PILOT_ROOT_KEY}
        )
    return pilot


def _rewrite_links(services: dict[str, Any], targets: Mapping[str, str]) -> None:
    """``links: [T]`` to a meshed T becomes ``T-netns:T``: the holder owns T's endpoint.

    A link implies a dependency; it is written out as compose itself would.
    """
    for svc in services.values():
        links = svc.get("links")
        if not isinstance(links, list):
            continue
        rewritten = []
        for link in links:
            target, _, alias = str(link).partition(":")
            if target in targets:
                target = targets[target]
                link = f"{target}:{alias or link}"
            rewritten.append(link)
            if target in services:
                deps = _depends_on_mapping(svc)
                if target not in deps:
                    deps[target] = _dependency("service_started", restart=True)
        svc["links"] = rewritten


_INSTANCE_SUFFIX = re.compile(r"^(.*)-(\d+)$")


def _extend_instance_dependencies(services: dict[str, Any]) -> None:
    """Whoever depends on a replicated S depends on S-2..S-N too, with the same condition."""
    groups: dict[str, list[str]] = {}
    for name, svc in services.items():
        index = _labels_of(svc, name).get(wk.LABEL_INSTANCE, "")
        if not index.isdigit() or _role(svc, name) is not None:
            continue
        if int(index) == 1:
            groups.setdefault(name, []).insert(0, name)
        else:
            m = _INSTANCE_SUFFIX.match(name)
            if m and m.group(2) == index:
                groups.setdefault(m.group(1), []).append(name)
    groups = {base: members for base, members in groups.items() if len(members) > 1}
    if not groups:
        return
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if not deps:
            continue
        hits = [base for base in groups if base in deps and name not in groups[base]]
        if not hits:
            continue
        mapping = _depends_on_mapping(svc)
        for base in hits:
            for member in groups[base]:
                if member not in mapping:
                    mapping[member] = copy.deepcopy(mapping[base])


def _static_networks(svc: Mapping[str, Any]) -> set[str]:
    """The networks on which ``svc`` asks for a fixed address."""
    nets = svc.get("networks") if "network_mode" not in svc else None
    if not isinstance(nets, Mapping):
        return set()
    return {
        str(net) for net, spec in nets.items()
        if isinstance(spec, Mapping) and (spec.get("ipv4_address") or spec.get("ipv6_address"))
    }


def _start_edges(svc: Mapping[str, Any]) -> set[str]:
    """The services compose starts before ``svc``: depends_on, links, network_mode service:,
    volumes_from."""
    edges = {str(d) for d in svc.get("depends_on") or ()}
    edges.update(str(link).partition(":")[0] for link in svc.get("links") or ())
    mode = str(svc.get("network_mode") or "")
    if mode.startswith("service:"):
        edges.add(mode.removeprefix("service:"))
    for source in svc.get("volumes_from") or ():
        text = str(source)
        if not text.startswith("container:"):
            edges.add(text.partition(":")[0])
    return edges


def _starts_before(services: Mapping[str, Any], first: str, then: str) -> bool:
    """Whether compose must start ``first`` before ``then`` (a path of start edges)."""
    seen, todo = set(), [then]
    while todo:
        name = todo.pop()
        if name == first:
            return True
        if name in seen or not isinstance(services.get(name), Mapping):
            continue
        seen.add(name)
        todo.extend(_start_edges(services[name]))
    return False


def _protect_static_addresses(services: dict[str, Any]) -> list[tuple[str, str]]:
    """A fixed address is taken before any container the injector starts dynamically on
    the same network can be given it: each holder and the pilot, where it has no fixed
    address of its own on a network, starts after every service with one there.

    Docker hands out a network's free addresses in order, so a holder (or the pilot) that
    comes up first can take the address a later one asks for, and that one then fails with
    "address already in use". The edges are order only (``required: false``); one that
    would close a loop (the fixed one starts after the dynamic one already, as its app asked)
    is left out, and said: (the app the warning is about, the warning).
    """
    statics: dict[str, list[str]] = {}
    for name, svc in services.items():
        for net in sorted(_static_networks(svc)):
            statics.setdefault(net, []).append(name)
    if not statics:
        return []
    said: list[tuple[str, str]] = []
    for name, svc in services.items():
        if _role(svc, name) not in (wk.ROLE_NETNS, wk.ROLE_PILOT):
            continue
        fixed = _static_networks(svc)
        for net in sorted(set(_holder_networks(svc)) & set(statics) - fixed):
            for first in statics[net]:
                if first == name:
                    continue
                if _starts_before(services, name, first):
                    whose = _labels_of(svc, name).get(wk.LABEL_OF, name)
                    said.append((whose, f"{name!r} starts before {first!r} (the apps' own "
                                 f"order), so it could take the fixed address {first!r} asks "
                                 f"for on network {net!r}; give it a fixed one too"))
                    continue
                deps = _depends_on_mapping(svc)
                if first not in deps:
                    dependency = _dependency("service_started")
                    dependency["required"] = False
                    deps[first] = dependency
    return said


def _namespace_of(services: Mapping[str, Any], name: str) -> str:
    """The service that owns ``name``'s network namespace: its holder, or itself."""
    mode = str((services.get(name) or {}).get("network_mode") or "")
    target = mode.removeprefix("service:")
    if mode.startswith("service:") and _role(services.get(target), target) == wk.ROLE_NETNS:
        return target
    return name


def _follow_start_order(services: dict[str, Any]) -> None:
    """Each holder starts after the namespace of every service its app waits for (that
    service's holder when it is meshed, else the service itself), so the namespaces come up
    in the order the apps do; ``required`` as the app has it, first in its depends_on."""
    for name, holder in services.items():
        if _role(holder, name) != wk.ROLE_NETNS:
            continue
        app_name = _labels_of(holder, name).get(wk.LABEL_OF, "")
        app = services.get(app_name)
        if not isinstance(app, Mapping) or _namespace_of(services, app_name) != name:
            continue
        deps = app.get("depends_on") or {}
        order: dict[str, Any] = {}
        for dep in deps:
            if _role(services.get(dep), str(dep)) in OWN_ROLES:
                continue
            target = _namespace_of(services, str(dep))
            if target == name:
                continue
            spec = deps[dep] if isinstance(deps, Mapping) else None
            required = spec.get("required", True) if isinstance(spec, Mapping) else True
            order.setdefault(target, {"condition": "service_started", "required": required})
        if order:
            rest = holder.get("depends_on") or {}
            holder["depends_on"] = {**{k: order[k] for k in sorted(order)}, **rest}
