"""Pure: the mesh state from the workloads, the mesh settings and the live route overrides.

A service whose routing cannot be built (a route names a version that no longer runs, an
override that no longer fits) keeps its last good routing, and the reason is reported:
the pilot never pushes a routing it could not build. The authorization policies likewise:
policies that do not parse leave the last good ones in force.
"""

from __future__ import annotations

from collections.abc import Mapping

from composemesh.errors import ConfigError
from composemesh.model.consul import ConsulView
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.policy import Policy, parse_policies
from composemesh.model.routing import ServiceRouting
from composemesh.model.routing_config import apply_weights, build_routing
from composemesh.model.settings import MeshSettings
from composemesh.pilot.federation import imported, remote_versions


def service_versions(workloads: tuple[Workload, ...]) -> dict[str, dict[str, int | None]]:
    """Each mesh service's versions and their label weights (the first label seen wins)."""
    services: dict[str, dict[str, int | None]] = {}
    for w in sorted(workloads, key=lambda w: w.node):
        versions = services.setdefault(w.service, {})
        if versions.get(w.version) is None:
            versions[w.version] = w.weight
    return services


def mesh_versions(state: MeshState) -> dict[str, dict[str, int | None]]:
    """``service_versions`` of the workloads, and the versions imported services have on other
    hosts (no label weight: equal shares unless routed): a split may span hosts."""
    known = service_versions(state.workloads)
    for service, elsewhere in remote_versions(imported(state)).items():
        versions_here = known.setdefault(service, {})
        for version in sorted(elsewhere):
            versions_here.setdefault(version, None)
    return known


def build_state(
    project: str,
    workloads: tuple[Workload, ...],
    settings: MeshSettings,
    overrides: Mapping[str, Mapping[str, int]],
    previous: MeshState | None = None,
    consul: ConsulView | None = None,
) -> MeshState:
    routes_section = settings.raw.get("routes") or {}
    routing: dict[str, ServiceRouting] = {}
    errors: list[str] = []
    local_names = previous.local_names if previous is not None else frozenset()
    known = mesh_versions(MeshState(project=project, workloads=workloads, settings=settings,
                                    consul=consul, local_names=local_names))
    for service, versions in known.items():
        section = {service: routes_section[service]} if service in routes_section else {}
        try:
            built = build_routing({service: versions}, section)[service]
            if service in overrides:
                built = apply_weights(built, overrides[service], tuple(versions))
            routing[service] = built
        except ConfigError as exc:
            errors.append(f"{service}: {exc}")
            if previous is not None and service in previous.routing:
                routing[service] = previous.routing[service]
    policies = previous.policies if previous is not None else {}
    try:
        policies = build_policies(workloads, settings)
    except ConfigError as exc:
        errors.append(f"policies: {exc}")
    return MeshState(
        project=project,
        workloads=workloads,
        settings=settings,
        routing=routing,
        route_overrides={k: dict(v) for k, v in overrides.items()},
        errors=tuple(errors),
        policies=policies,
        consul=consul,
        local_names=local_names,
    )


def build_policies(
    workloads: tuple[Workload, ...], settings: MeshSettings
) -> dict[str, tuple[Policy, ...]]:
    """``x-composemesh: policies:`` parsed; ConfigError if it does not parse.

    ``composemesh check`` validated them against the compose file's services. Here the
    known services are every one running plus every name the section itself uses, so a
    policy for (or from) a service that has not started yet is kept, not refused.
    """
    section = settings.raw.get("policies")
    known = {w.service for w in workloads} | _names_in(section)
    return parse_policies(section, known)


def _names_in(section: object) -> set[str]:
    """Every destination and ``from`` source named in a policies section, whatever its shape."""
    if not isinstance(section, Mapping):
        return set()
    names = {str(dest) for dest in section}
    for items in section.values():
        for item in items if isinstance(items, list) else ():
            sources = item.get("from") if isinstance(item, Mapping) else None
            if isinstance(sources, list):
                names.update(s for s in sources if isinstance(s, str))
    return names


def default_split(routing: ServiceRouting) -> dict[str, int]:
    """The weights of the default (last, match-less) route: what `composemesh route` changes."""
    if not routing.routes:
        return {}
    return {d.version: d.weight for d in routing.routes[-1].destinations}
