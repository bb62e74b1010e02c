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

This module is the orchestration; its parts have homes of their own: what each service is to
the mesh (``classify``), replica expansion and the names it adds (``replicas``), compose
syntax (``compose_syntax``) and the services the mesh adds (``templates``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from composemesh.errors import ConfigError
from composemesh.inject.classify import (
    OWN_ROLES,
    Classification,
    ServiceKind,
    classify,
    labels_of,
    mesh_labels,
    role_of,
)
from composemesh.inject.compose_syntax import (
    attached_networks,
    dependency,
    depends_on_mapping,
    external_networks,
    fixed_host_port,
    port_text,
    rewrite_links,
    services_of,
    starts_before,
    static_networks,
    take_netns,
    udp_ports,
)
from composemesh.inject.monitoring import (
    MonitoringAdded,
    add_monitoring,
    drop_monitoring,
    is_monitoring_config,
    monitoring_of,
)
from composemesh.inject.replicas import (
    collisions,
    extend_instance_dependencies,
    instance_names,
    make_instance,
    replicas_of,
)
from composemesh.inject.templates import (
    HOLDER_OWN_KEYS,
    PILOT_VOLUME,
    SOCKET_VOLUME,
    add_egress_names,
    east_west_port,
    make_east_west_gateway,
    make_egress_gateway,
    make_holder,
    make_ingress_gateway,
    make_pilot,
    make_proxy,
    user_root_files,
)
from composemesh.model import wellknown as wk
from composemesh.model.ca_config import CAConfig
from composemesh.model.egress import EgressSettings
from composemesh.model.gateways import (
    ALLOW_ANY,
    Gateways,
    IngressGateway,
    egress_settings,
    ingress_settings,
)
from composemesh.model.labels import MeshLabels
from composemesh.model.monitoring import MonitoringSettings, parse_monitoring
from composemesh.model.settings import SECTION


@dataclass(frozen=True)
class AddedService:
    """A service the injector put into the model: its name, role and the app it serves."""

    name: str
    role: str  # wk.ROLE_NETNS | wk.ROLE_PROXY | wk.ROLE_PILOT | ROLE_PROMETHEUS | ROLE_GRAFANA
    of: str | None  # the app compose service; None for the pilot and the monitoring add-on


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
    ingress: IngressGateway | None = None  # the ingress gateway added, as validated
    egress: EgressSettings | None = None  # what the proxies are told of the outside
    monitoring: MonitoringSettings | None = None  # the add-on's settings, when it was added
    east_west_port: int | None = None  # the host port of the east-west gateway, when added


# --------------------------------------------------------------------------- the rewrite


def inject(
    model: Mapping[str, Any],
    labels: Mapping[str, MeshLabels] | None = None,
    *,
    image: str = wk.MESH_IMAGE,
    ca: CAConfig | None = None,
    gateways: Gateways | None = None,
) -> InjectResult:
    """Return ``model`` with every meshed service given a netns holder and a proxy.

    ``labels`` are the validated MeshLabels per compose service; a service missing from it
    has its labels parsed here. ``ca`` is the validated ``x-composemesh: mtls:``: a root the
    user brings is mounted into the pilot, read-only; without ``ca``, the root the pilot of
    an already meshed ``model`` mounts stays. ``gateways``: the validated gateways (with the
    label routes merged): an ingress adds the ingress gateway's holder and proxy. Raises
    ConfigError if a user service already has a name the injector needs (validate_project
    says so with the file first).
    """
    src: dict[str, Any] = copy.deepcopy(dict(model))
    services = services_of(src)
    mesh = mesh_labels(services, labels)
    clash = collisions(src, mesh)
    if clash:
        name, what = clash[0]
        raise ConfigError(
            f"the name is taken: the injector adds {name!r} as the {what}", service=name
        )
    classified = classify(services, mesh)
    ctx = _Context(services=services, mesh=mesh, classified=classified, image=image,
                   capture_dns=_consul_section(src.get(SECTION)) is not None)

    out_services: dict[str, Any] = {}
    for name, svc in services.items():
        classification = classified.get(name)
        if classification is None:  # injected: emitted beside its app, or dropped as an orphan
            continue
        if classification.kind is ServiceKind.OWNER:
            ctx.expand_owner(name, svc, out_services)
        elif classification.kind is ServiceKind.MESHED:
            ctx.keep_meshed(name, svc, out_services)
        elif classification.kind is ServiceKind.JOINER:
            ctx.join(name, svc, classification, out_services)
        else:  # LEFT_OUT, DISABLED, FOREIGN: kept as it is
            if classification.note:
                ctx.warn(name, classification.note)
            elif classification.kind is ServiceKind.DISABLED:
                ctx.note(name, f"{wk.LABEL_ENABLE}=false: not in the mesh")
            out_services[name] = svc
            ctx.rows[name] = ServicePlan(name, None, None, None, None)

    rewrite_links(out_services, ctx.link_targets())
    extend_instance_dependencies(out_services)
    _follow_start_order(out_services)

    egress_told = None
    east_west: int | None = None
    if ctx.meshed_any:
        root = user_root_files(ca, services)
        external = external_networks(src.get("networks"))
        ingress = gateways.ingress if gateways is not None else None
        if ingress is not None:
            added = make_ingress_gateway(ingress, out_services, image, external)
            out_services.update(added)
            for name, role in zip(added, (wk.ROLE_NETNS, wk.ROLE_PROXY), strict=True):
                ctx.added.append(AddedService(name, role, wk.INGRESS_GATEWAY))
        egress = gateways.egress if gateways is not None else None
        if egress is not None and (egress.hosts or egress.policy != ALLOW_ANY):
            egress_told = egress_settings(egress)
            add_egress_names(out_services, egress_told)
        if egress is not None and egress.hosts:
            added = make_egress_gateway(egress, out_services, image, external)
            out_services.update(added)
            for name, role in zip(added, (wk.ROLE_NETNS, wk.ROLE_PROXY), strict=True):
                ctx.added.append(AddedService(name, role, wk.EGRESS_GATEWAY))
        consul = _consul_section(src.get(SECTION))
        if consul is not None:  # x-composemesh.consul: other hosts come in through it
            added = make_east_west_gateway(consul, out_services, image, external)
            out_services.update(added)
            for name, role in zip(added, (wk.ROLE_NETNS, wk.ROLE_PROXY), strict=True):
                ctx.added.append(AddedService(name, role, wk.EAST_WEST_GATEWAY))
            east_west = east_west_port(consul)
        outside = frozenset(egress.networks) if egress is not None else frozenset()
        out_services[wk.PILOT_SERVICE] = make_pilot(  # the outside is the egress gateway's
            out_services, src.get(SECTION), image, root, external | outside,
            ingress_settings(ingress) if ingress is not None else None, egress_told,
        )
        ctx.added.append(AddedService(wk.PILOT_SERVICE, wk.ROLE_PILOT, None))
        monitoring = _monitoring_settings(src.get(SECTION))
        extras = add_monitoring(out_services, monitoring, external, src.get("configs"))
        ctx.added.extend(AddedService(name, role, None) for name, role in extras.services)
        ctx.warnings.extend(extras.warnings)
        for name in _unscraped(out_services, external):
            ctx.warn(name, "on external networks only: the pilot joins none of them, so "
                     "this proxy's metrics are not scraped (its traffic is meshed as usual)")
        for name, text in _protect_static_addresses(out_services):
            ctx.warn(name, text)
    else:
        extras = MonitoringAdded()
        drop_monitoring(out_services)  # an earlier injection's: there is no pilot to scrape
        ctx.warnings.append("no service is in the mesh: nothing was injected")
    for name in monitoring_of(services):  # an earlier injection's: not a user service
        ctx.rows.pop(name, None)
    for name, svc in services.items():
        gateway = labels_of(svc, name).get(wk.LABEL_GATEWAY)
        if gateway and name not in out_services:
            why = _GATEWAY_GONE.get(gateway, f"x-composemesh has no {gateway} gateway any more")
            ctx.warnings.append(f"service {name!r}: injected earlier, dropped now: {why}")
        elif name not in out_services and role_of(svc, name) in OWN_ROLES:
            of = labels_of(svc, name).get(wk.LABEL_OF)
            why = f"its app {of!r} is gone or out of the mesh" if of else "nothing is meshed"
            ctx.warnings.append(f"service {name!r}: injected earlier, dropped now: {why}")

    result = {key: (out_services if key == "services" else value) for key, value in src.items()}
    if "services" not in result:
        result["services"] = out_services
    if ctx.meshed_any:  # the pilot's state (route overrides) outlives its container
        volumes = dict(result.get("volumes") or {})
        volumes.setdefault(PILOT_VOLUME, None)
        volumes.setdefault(SOCKET_VOLUME, None)
        for volume in extras.volumes:
            volumes.setdefault(volume, None)
        result["volumes"] = volumes
    _put_configs(result, extras)
    rows = tuple(
        ServicePlan(
            row.service, row.mesh_service, row.version, row.netns, row.proxy,
            tuple(ctx.notes.get(row.service, ())),
        )
        for row in ctx.rows.values()
    )
    return InjectResult(
        model=result, warnings=tuple(ctx.warnings), added=tuple(ctx.added), services=rows,
        ingress=gateways.ingress if gateways is not None and ctx.meshed_any else None,
        egress=egress_told,
        monitoring=monitoring if ctx.meshed_any and extras.services else None,
        east_west_port=east_west,
    )


_GATEWAY_GONE = {
    wk.GATEWAY_INGRESS: "x-composemesh.gateways has no ingress any more",
    wk.GATEWAY_EGRESS: "x-composemesh.egress lists no host any more",
    wk.GATEWAY_EAST_WEST: "x-composemesh has no consul section any more",
}


def _consul_section(section: object) -> Mapping[str, Any] | None:
    """``x-composemesh.consul`` of the model (validated before, by validate_model)."""
    consul = section.get("consul") if isinstance(section, Mapping) else None
    return consul if isinstance(consul, Mapping) else None


@dataclass
class _Context:
    """The state of one inject() call: inputs, and what has been said and added so far."""

    services: dict[str, Any]
    mesh: Mapping[str, MeshLabels]
    classified: Mapping[str, Classification]
    image: str
    capture_dns: bool = False  # x-composemesh.consul: the apps' sidecars answer imported names
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
        udp = udp_ports(holder)
        if udp:
            self.note(app_name, f"UDP {', '.join(udp)} not captured: it passes the mesh as it "
                      "is (plaintext, no policy, no metrics), as with Istio and Consul")
        out[app_name] = app
        out[holder_name] = holder
        out[proxy_name] = make_proxy(app_name, app, labels, self.image)
        self.added.append(AddedService(holder_name, wk.ROLE_NETNS, app_name))
        self.added.append(AddedService(proxy_name, wk.ROLE_PROXY, app_name))
        self.rows[app_name] = ServicePlan(
            app_name, labels.service, labels.version, holder_name, proxy_name
        )
        self.meshed_any = True

    def expand_owner(self, name: str, svc: dict[str, Any], out: dict[str, Any]) -> None:
        """A service meshed for the first time: one app/holder/proxy triple per replica."""
        labels = self.mesh[name]
        replicas = replicas_of(svc)
        instances = instance_names(name, replicas)
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
            ns = take_netns(app)
            if len(instances) > 1:
                make_instance(app, labels.service, index)
                if index > 1 and "ports" in ns:
                    kept = [p for p in ns["ports"] if not fixed_host_port(p)]
                    if index == 2:
                        dropped = [port_text(p) for p in ns["ports"] if fixed_host_port(p)]
                    if kept:
                        ns["ports"] = kept
                    else:
                        del ns["ports"]
                self.note(inst, f"instance {index} of {len(instances)} of service {name!r}")
            _join_holder(app, wk.netns_service(inst), wk.proxy_service(inst))
            names = self.answered_names(inst, name, app, labels)
            holder = make_holder(inst, names, app, ns, labels, self.image, self.capture_dns)
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
        ns = {k: v for k, v in existing.items() if k not in HOLDER_OWN_KEYS}
        app_labels = labels_of(svc, name)
        base = name
        index = app_labels.get(wk.LABEL_INSTANCE, "")
        if index.isdigit() and int(index) > 1 and name.endswith(f"-{index}"):
            base = name[: -len(f"-{index}")]
        _join_holder(svc, holder_name, wk.proxy_service(name))
        names = self.answered_names(name, base, svc, labels)
        holder = make_holder(name, names, svc, ns, labels, self.image, self.capture_dns)
        self.emit(out, name, svc, holder, labels)

    def join(
        self,
        name: str,
        svc: dict[str, Any],
        classification: Classification,
        out: dict[str, Any],
    ) -> None:
        """A service that shares a meshed service's namespace (network_mode service:Y)."""
        assert classification.holder is not None and classification.owner is not None
        _join_holder(svc, classification.holder, wk.proxy_service(classification.owner))
        if classification.note:
            self.warn(name, classification.note)
        out[name] = svc
        owner = self.mesh.get(classification.owner)
        self.rows[name] = ServicePlan(
            name,
            owner.service if owner else None,
            owner.version if owner else None,
            classification.holder,
            wk.proxy_service(classification.owner),
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
        for name, classification in self.classified.items():
            if classification.kind in (ServiceKind.OWNER, ServiceKind.MESHED):
                targets[name] = wk.netns_service(name)
            elif classification.kind is ServiceKind.JOINER and classification.holder:
                targets[name] = classification.holder
        return targets


# --------------------------------------------------------------------------- its steps


def _monitoring_settings(section: object) -> MonitoringSettings:
    """``x-composemesh.monitoring`` of the model (validated before, by validate_model)."""
    raw = section.get("monitoring") if isinstance(section, Mapping) else None
    return parse_monitoring(raw)


def _put_configs(result: dict[str, Any], extras: MonitoringAdded) -> None:
    """The model's top-level ``configs:`` with the add-on's entries as of now (an earlier
    injection's that are not wanted any more taken out); none at all if that leaves none."""
    configs = {k: v for k, v in (result.get("configs") or {}).items()
               if not is_monitoring_config(str(k))}
    configs.update(extras.configs)
    if configs:
        result["configs"] = configs
    else:
        result.pop("configs", None)


def _join_holder(svc: dict[str, Any], holder: str, proxy: str) -> None:
    """Put ``svc`` into ``holder``'s namespace, starting once ``proxy`` captures traffic."""
    svc["network_mode"] = f"service:{holder}"
    deps = depends_on_mapping(svc)
    deps[holder] = dependency("service_started", restart=True)
    deps[proxy] = dependency("service_healthy")


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


def _unscraped(services: Mapping[str, Any], external: frozenset[str]) -> list[str]:
    """The apps whose holder is on external networks only (the pilot is on none of them)."""
    return [
        labels_of(svc, name).get(wk.LABEL_OF, name)
        for name, svc in services.items()
        if role_of(svc, name) == wk.ROLE_NETNS
        and (nets := attached_networks(svc)) and set(nets) <= external
    ]


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
        for net in sorted(static_networks(svc)):
            statics.setdefault(net, []).append(name)
    if not statics:
        return []
    said: list[tuple[str, str]] = []
    for name, svc in services.items():
        if role_of(svc, name) not in (wk.ROLE_NETNS, wk.ROLE_PILOT):
            continue
        fixed = static_networks(svc)
        for net in sorted(set(attached_networks(svc)) & set(statics) - fixed):
            for first in statics[net]:
                if first == name:
                    continue
                if starts_before(services, name, first):
                    whose = labels_of(svc, name).get(wk.LABEL_OF, name)
                    said.append((whose, f"{name!r} starts before {first!r} (the apps' own "
                                 f"order), so it could take the fixed address {first!r} asks "
                                 f"for on network {net!r}; give it a fixed one too"))
                    continue
                deps = depends_on_mapping(svc)
                if first not in deps:
                    order_only = dependency("service_started")
                    order_only["required"] = False
                    deps[first] = order_only
    return said


def _namespace_of(services: Mapping[str, Any], name: str) -> str:
    """The service that owns ``name``'s network namespace: its holder, or itself."""
    mode = str((services.get(name) or {}).get("network_mode") or "")
    target = mode.removeprefix("service:")
    if mode.startswith("service:") and role_of(services.get(target), target) == wk.ROLE_NETNS:
        return target
    return name


def _follow_start_order(services: dict[str, Any]) -> None:
    """Each holder starts after the namespace of every service its app waits for (that
    service's holder when it is meshed, else the service itself), so the namespaces come up
    in the order the apps do; ``required`` as the app has it, first in its depends_on."""
    for name, holder in services.items():
        if role_of(holder, name) != wk.ROLE_NETNS:
            continue
        app_name = labels_of(holder, name).get(wk.LABEL_OF, "")
        app = services.get(app_name)
        if not isinstance(app, Mapping) or _namespace_of(services, app_name) != name:
            continue
        deps = app.get("depends_on") or {}
        order: dict[str, Any] = {}
        for dep in deps:
            if role_of(services.get(dep), str(dep)) in OWN_ROLES:
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
