"""Pure rendering of one proxy's snapshot from the mesh state: only what that proxy needs."""

from __future__ import annotations

from dataclasses import asdict

from composemesh.model.mesh import MeshState, Workload, content_version
from composemesh.model.snapshot import ProxyIdentity, Snapshot


def render_snapshot(state: MeshState, workload: Workload) -> Snapshot:
    """The snapshot for ``workload``'s proxy. Same view, same version: no needless push."""
    identity = ProxyIdentity(
        node=workload.node,
        project=state.project,
        compose_service=workload.compose_service,
        service=workload.service,
        version=workload.version,
    )
    settings = {
        "trust_domain": state.settings.trust_domain,
        "mtls_mode": state.settings.mtls_overrides.get(workload.service, state.settings.mtls_mode),
        "services": _services(state),
    }
    version = content_version({"identity": asdict(identity), "settings": settings})
    return Snapshot(version=version, identity=identity, settings=settings)


def _services(state: MeshState) -> dict[str, list[dict[str, object]]]:
    """Each mesh service's running endpoints: the view every outbound proxy routes over."""
    services: dict[str, list[dict[str, object]]] = {}
    for w in sorted(state.workloads, key=lambda w: w.node):
        if not w.running or not w.addresses:
            continue
        services.setdefault(w.service, []).append(
            {"node": w.node, "version": w.version, "addresses": list(w.addresses)}
        )
    return services
