"""Checks a loaded compose model's mesh configuration and says exactly what is wrong and where.

Pure: the file to blame comes from a ``locate`` callback (LoadedProject.locate), so the same
checks run on a dict in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composemesh.errors import ConfigError
from composemesh.inject.compose_file import LoadedProject, compose_environment
from composemesh.inject.replicas import collisions
from composemesh.inject.rewrite import inject
from composemesh.model import wellknown as wk
from composemesh.model.ca_config import CAConfig, parse_ca_config
from composemesh.model.consul import CONSUL
from composemesh.model.gateways import Gateways, HostRoute, load_gateways, route_from_labels
from composemesh.model.labels import MeshLabels, normalize_labels, parse_labels
from composemesh.model.policy import Policy, parse_policies
from composemesh.model.routing import ServiceRouting
from composemesh.model.routing_config import build_routing
from composemesh.model.settings import SECTION, MeshSettings, parse_settings

# locate(service, field) -> the file to name in an error; service None: a top-level key.
Locate = Callable[[str | None, str | None], str | None]


@dataclass(frozen=True)
class ValidatedProject:
    """The mesh configuration of a compose model, checked: labels, settings and routing."""

    model: dict[str, Any]
    labels: Mapping[str, MeshLabels]  # every compose service, meshed or not
    settings: MeshSettings
    routing: dict[str, ServiceRouting] = field(default_factory=dict)  # per mesh service
    policies: dict[str, tuple[Policy, ...]] = field(default_factory=dict)  # per destination
    ca: CAConfig | None = None
    gateways: Gateways = field(default_factory=Gateways)  # certificates checked too


def validate_project(loaded: LoadedProject) -> ValidatedProject:
    """Validate what `docker compose config` made of the user's files. CONSUL_HTTP_ADDR and
    CONSUL_HTTP_TOKEN, where ``x-composemesh.consul`` names no address or token file, are
    read from where compose reads them at `up` (the environment, then the ``.env`` file)."""
    base_dir = str(Path(loaded.file_of_key(SECTION)).resolve().parent)
    section = loaded.model.get(SECTION)
    consul = section.get("consul") if isinstance(section, Mapping) else None
    environ = None
    if isinstance(consul, Mapping) and not ("address" in consul and "token_file" in consul):
        environ = compose_environment(loaded)
    return validate_model(loaded.model, locate=loaded.locate, base_dir=base_dir,
                          environ=environ)


def validate_model(
    model: Mapping[str, Any], *, locate: Locate | None = None, base_dir: str = ".",
    environ: Mapping[str, str] | None = None,
) -> ValidatedProject:
    """Validate ``x-composemesh:``, every service's labels, the names the injector needs and
    the routes (``x-composemesh: routes:`` against the mesh services and versions that run).
    ``environ`` (default: this process's) is where ``consul`` falls back to CONSUL_HTTP_ADDR
    and CONSUL_HTTP_TOKEN; its token file is read from ``base_dir``.

    Raises the first ConfigError found, with its file (from ``locate``), service and field.
    """

    def where(service: str | None, field: str | None) -> str | None:
        return locate(service, field) if locate else None

    try:
        settings = parse_settings(model.get(SECTION), environ=environ, base_dir=base_dir)
    except ConfigError as exc:
        raise exc.located(file=where(None, SECTION)) from None

    services = model.get("services") or {}
    if not isinstance(services, Mapping):
        raise ConfigError(
            "must be a mapping of service names to services",
            file=where(None, "services"),
            field="services",
        )
    labels: dict[str, MeshLabels] = {}
    for name, svc in services.items():
        if not isinstance(svc, Mapping):
            raise ConfigError("must be a mapping", file=where(name, None), service=name)
        try:
            raw = normalize_labels(svc.get("labels"), service=name)
            labels[name] = parse_labels(raw, compose_service=name)
        except ConfigError as exc:
            raise exc.located(file=where(name, "labels"), service=name) from None

    clash = collisions(model, labels)
    if clash:
        name, what = clash[0]
        raise ConfigError(
            f"the name is taken: the injector adds {name!r} as the {what}; rename this "
            f"service (or leave its owner out of the mesh with composemesh.enable=false)",
            file=where(name, None),
            service=name,
        )
    _addon_names(model, settings, where)
    routing = _routing(model, labels, settings, where)
    gateways = _gateways(model, labels, settings, routing, base_dir, where)
    _east_west_port_free(model, settings, gateways, where)
    callers = (tuple(routing) + ((wk.INGRESS_GATEWAY,) if gateways.ingress else ())
               + ((wk.EGRESS_GATEWAY,) if gateways.egress.hosts else ())
               + ((wk.EAST_WEST_GATEWAY,) if settings.consul is not None else ()))
    try:
        policies = parse_policies(settings.raw.get("policies"), callers)
        ca = parse_ca_config(settings.raw.get("mtls"), base_dir)
    except ConfigError as exc:
        raise exc.located(file=where(None, SECTION)) from None
    return ValidatedProject(
        model=dict(model),
        labels=labels,
        settings=settings,
        routing=routing,
        policies=policies,
        ca=ca,
        gateways=gateways,
    )


def service_ports(model: Mapping[str, Any], labels: Mapping[str, MeshLabels]
                  ) -> dict[str, frozenset[int]]:
    """Each mesh service's container ports that its compose services declare (``expose``,
    the targets of ``ports``); empty where none is declared (any port goes)."""
    out: dict[str, set[int]] = {}
    for name, svc in (model.get("services") or {}).items():
        own = labels.get(name)
        if own is None or not own.enabled or not isinstance(svc, Mapping):
            continue
        ports = out.setdefault(own.service, set())
        for item in svc.get("expose") or ():
            text = str(item).split("/", 1)[0]
            if text.isdecimal():
                ports.add(int(text))
        for item in svc.get("ports") or ():
            target = item.get("target") if isinstance(item, Mapping) else None
            if isinstance(target, int):
                ports.add(target)
    return {service: frozenset(ports) for service, ports in out.items()}


def _gateways(
    model: Mapping[str, Any],
    labels: Mapping[str, MeshLabels],
    settings: MeshSettings,
    routing: Mapping[str, ServiceRouting],
    base_dir: str,
    where: Locate,
) -> Gateways:
    """``x-composemesh: gateways:``/``egress:`` with the ``composemesh.ingress.*`` label
    routes merged in, each route checked against the mesh services and their ports, every
    certificate read and checked; errors name the file, service and field."""
    known = service_ports(model, labels)
    ports = {service: known.get(service, frozenset()) for service in routing}
    label_routes: list[HostRoute] = []
    for name, own in labels.items():
        host, path, port = own.ingress
        if (host, path, port) == (None, None, None):
            continue
        try:
            found = route_from_labels(own.service, host, path, port,
                                      ports=ports.get(own.service, frozenset()))
        except ConfigError as exc:
            raise ConfigError(exc.message, file=where(name, "labels"), service=name,
                              field=exc.field) from None
        if found is not None and found not in label_routes:  # replicas say it once each
            label_routes.append(found)
    networks = tuple((model.get("networks") or {}).keys())
    try:
        gateways = load_gateways(settings.raw, base_dir=Path(base_dir), services=ports,
                                 label_routes=label_routes, networks=networks)
    except ConfigError as exc:
        raise exc.located(file=where(None, SECTION)) from None
    added = [(wk.INGRESS_GATEWAY, "ingress")] if gateways.ingress is not None else []
    if gateways.egress.hosts:
        added.append((wk.EGRESS_GATEWAY, "egress"))
    if settings.consul is not None:
        added.append((wk.EAST_WEST_GATEWAY, "east-west"))
    for gateway, what in added:
        taken = (wk.netns_service(gateway), wk.proxy_service(gateway))
        for name in (gateway, *taken):
            svc = (model.get("services") or {}).get(name)
            if svc is not None and not (name in taken and isinstance(svc, Mapping) and (
                    svc.get("labels") or {}).get(wk.LABEL_GATEWAY)):
                raise ConfigError(
                    f"the name is taken: the {what} gateway is {gateway!r} (its services "
                    f"{', '.join(taken)}); rename this service",
                    file=where(name, None), service=name)
    return gateways


def _east_west_port_free(model: Mapping[str, Any], settings: MeshSettings,
                         gateways: Gateways, where: Locate) -> None:
    """``consul.east_west_port`` is published on every interface of the host: no other
    service of the file (nor the ingress gateway, nor the monitoring add-on) may publish the
    same TCP port. The gateways an earlier injection added are not counted (they are
    regenerated)."""
    if settings.consul is None:
        return
    port = settings.consul.east_west_port
    taken: list[tuple[str, str]] = []  # (who, how it publishes the port)
    for name, svc in (model.get("services") or {}).items():
        if not isinstance(svc, Mapping) or (svc.get("labels") or {}).get(wk.LABEL_GATEWAY):
            continue
        for item in svc.get("ports") or ():
            text = _publishes(item, port)
            if text:
                taken.append((f"service {name!r}", text))
    ingress = gateways.ingress
    if ingress is not None:
        for key, published in (("http_port", ingress.http_port),
                               ("https_port", ingress.https_port)):
            if published == port:
                taken.append((f"the ingress gateway (x-composemesh.gateways.ingress.{key})",
                              f"{ingress.bind}:{published}"))
    monitoring = settings.monitoring
    for key, addon in (("prometheus", monitoring.prometheus), ("grafana", monitoring.grafana)):
        if addon is not None and getattr(addon, "port", None) == port:
            taken.append((f"x-composemesh.monitoring.{key}", f"{addon.bind}:{port}"))
    if taken:
        who, text = taken[0]
        raise ConfigError(
            f"{port} is published on the host by {who} already ({text}); the east-west "
            f"gateway needs it on every interface: choose another port",
            file=where(None, SECTION), field=f"{CONSUL}.east_west_port")


def _publishes(item: object, port: int) -> str:
    """How a ``ports:`` entry publishes TCP ``port`` on the host ("" if it does not): the
    long form compose prints, or the short one."""
    if isinstance(item, Mapping):
        if str(item.get("protocol") or "tcp").lower() != "tcp":
            return ""
        published = str(item.get("published") or "")
        text = f"{published}:{item.get('target')}"
    else:
        text = str(item)
        spec, _, proto = text.partition("/")
        if (proto or "tcp").lower() != "tcp":
            return ""
        parts = spec.rsplit(":", 2)
        published = parts[-2] if len(parts) >= 2 else ""
    low, _, high = published.partition("-")
    if not low.isdecimal() or not (high or low).isdecimal():
        return ""
    return text if int(low) <= port <= int(high or low) else ""


def _addon_names(model: Mapping[str, Any], settings: MeshSettings, where: Any) -> None:
    """The monitoring add-on's services need their names: a user service that has one (and
    is not an earlier injection's, by its role label) is named, with its file."""
    monitoring = settings.monitoring
    added = ([(wk.PROMETHEUS_SERVICE, wk.ROLE_PROMETHEUS, "prometheus")]
             if monitoring.prometheus is not None else [])
    if monitoring.grafana is not None:
        added.append((wk.GRAFANA_SERVICE, wk.ROLE_GRAFANA, "grafana"))
    services = model.get("services") or {}
    for name, role, key in added:
        svc = services.get(name)
        if svc is not None and not (isinstance(svc, Mapping)
                                    and (svc.get("labels") or {}).get(wk.LABEL_ROLE) == role):
            raise ConfigError(
                f"the name is taken: x-composemesh.monitoring.{key} adds {name!r}; rename "
                f"this service", file=where(name, None), service=name)


def _routing(
    model: Mapping[str, Any],
    labels: Mapping[str, MeshLabels],
    settings: MeshSettings,
    where: Locate,
) -> dict[str, ServiceRouting]:
    """Build every mesh service's routing; errors name the file with the offending part."""
    # Which compose services run a mesh service (and which version) is the injector's call.
    versions: dict[str, dict[str, int | None]] = {}
    weighed_by: dict[tuple[str, str], str] = {}  # (service, version) -> compose service
    owners: dict[str, list[str]] = {}  # mesh service -> its compose services
    for row in inject(model, labels).services:
        if row.mesh_service is None or row.version is None:
            continue
        if row.proxy != wk.proxy_service(row.service):  # shares another service's proxy
            continue
        owners.setdefault(row.mesh_service, []).append(row.service)
        of_version = versions.setdefault(row.mesh_service, {})
        own = labels.get(row.service)  # None: a replica the injector expanded
        weight = own.weight if own is not None else None
        key = (row.mesh_service, row.version)
        if weight is not None and of_version.get(row.version) not in (None, weight):
            first = weighed_by[key]
            raise ConfigError(
                f"{weight} contradicts the weight {of_version[row.version]} that service "
                f"{first!r} gives version {row.version!r} of mesh service {row.mesh_service!r}",
                file=where(row.service, "labels"),
                service=row.service,
                field=f"label {wk.LABEL_WEIGHT}",
            )
        if of_version.get(row.version) is None:
            of_version[row.version] = weight
            if weight is not None:
                weighed_by[key] = row.service
    try:
        return build_routing(versions, settings.raw.get("routes"))
    except ConfigError as exc:
        if exc.field and exc.field.startswith(SECTION):
            raise exc.located(file=where(None, SECTION)) from None
        # The label split of a mesh service: blame its first compose service with a weight.
        mesh_service = exc.service or ""
        compose = owners.get(mesh_service, [mesh_service])
        blamed = next((c for c in compose if c in labels and labels[c].weight is not None), None)
        blamed = blamed or compose[0]
        raise ConfigError(
            exc.message, file=where(blamed, "labels"), service=blamed, field=exc.field
        ) from None
