"""Pure: the mesh state from the workloads, the mesh settings and the live route overrides.

A service whose routing cannot be built (a route names a version that no longer runs, an
override that no longer fits) keeps its last good routing, and the reason is reported:
the pilot never pushes a routing it could not build.
"""

from __future__ import annotations

from collections.abc import Mapping

from composemesh.errors import ConfigError
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.routing import ServiceRouting
from composemesh.model.routing_config import apply_weights, build_routing
from composemesh.model.settings import MeshSettings


def service_versions(workloads: tuple[Workload, ...]) -> dict[str, dict[str, int | None]]:
    """Each mesh service's versions and their label weights (the first label seen wins)."""
    services: dict[str, dict[str, int | None]] = {}
    for w in sorted(workloads, key=lambda w: w.node):
        versions = services.setdefault(w.service, {})
        if versions.get(w.version) is None:
            versions[w.version] = w.weight
    return services


def build_state(
    project: str,
    workloads: tuple[Workload, ...],
    settings: MeshSettings,
    overrides: Mapping[str, Mapping[str, int]],
    previous: MeshState | None = None,
) -> MeshState:
    routes_section = settings.raw.get("routes") or {}
    routing: dict[str, ServiceRouting] = {}
    errors: list[str] = []
    for service, versions in service_versions(workloads).items():
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
    return MeshState(
        project=project,
        workloads=workloads,
        settings=settings,
        routing=routing,
        route_overrides={k: dict(v) for k, v in overrides.items()},
        errors=tuple(errors),
    )


def default_split(routing: ServiceRouting) -> dict[str, int]:
    """The weights of the default (last, match-less) route: what `composemesh route` changes."""
    if not routing.routes:
        return {}
    return {d.version: d.weight for d in routing.routes[-1].destinations}
