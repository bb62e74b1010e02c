"""Pure rendering of one proxy's snapshot from the mesh state: only what that proxy needs."""

from __future__ import annotations

from dataclasses import asdict

from composemesh.model.mesh import MeshState, Workload, content_version
from composemesh.model.policy import policies_to_json
from composemesh.model.routing import routing_to_json
from composemesh.model.snapshot import ProxyIdentity, Snapshot


def render_snapshot(
    state: MeshState, workload: Workload, trust_bundle: str = "", signing_root: str = ""
) -> Snapshot:
    """The snapshot for ``workload``'s proxy. Same view, same version: no needless push.

    ``trust_bundle`` is the CA's PEM roots (public): a new bundle is a new version, so a root
    rotation reaches every proxy as an ordinary push. ``signing_root`` is the fingerprint of
    the root that signs certificates now: a proxy whose certificate another root issued
    renews it at once. Nothing secret is ever in a snapshot.
    """
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
        "services": _services(state, workload),
        "idle_addresses": _idle_addresses(state),
        "routing": {name: routing_to_json(r) for name, r in sorted(state.routing.items())},
        "protocols": _protocols(state),
        "trust_bundle": trust_bundle,
        "signing_root": signing_root,
        "policies": _policies(state, workload),
        "published_ports": list(workload.published_ports),
        "networks": [
            {"name": a.name, "address": a.address, "subnet": a.subnet, "gateway": a.gateway}
            for a in workload.attachments
        ],
    }
    version = content_version({"identity": asdict(identity), "settings": settings})
    return Snapshot(version=version, identity=identity, settings=settings)


def _policies(state: MeshState, me: Workload) -> dict[str, object]:
    """The authorization policies ``me`` enforces: its own service's, as the destination."""
    mine = state.policies.get(me.service)
    return policies_to_json({me.service: mine}) if mine else {}


def _services(state: MeshState, me: Workload) -> dict[str, list[dict[str, object]]]:
    """Each mesh service's running endpoints, each with the one address ``me`` can reach."""
    services: dict[str, list[dict[str, object]]] = {}
    for w in sorted(state.workloads, key=lambda w: w.node):
        if not w.running:
            continue
        address = reachable_address(me, w)
        if address is None:
            continue
        services.setdefault(w.service, []).append(
            {
                "node": w.node,
                "version": w.version,
                "address": address,
                "addresses": list(w.addresses),
            }
        )
    return services


def _idle_addresses(state: MeshState) -> dict[str, list[str]]:
    """Addresses of instances that take no traffic: DNS may still hand them to an app."""
    idle: dict[str, list[str]] = {}
    for w in sorted(state.workloads, key=lambda w: w.node):
        if not w.running:
            idle.setdefault(w.service, []).extend(w.addresses)
    return idle


def reachable_address(me: Workload, other: Workload) -> str | None:
    """``other``'s address on the first network both are on (by name), else its first one."""
    mine = {name for name, _ in me.networks}
    for name, address in other.networks:
        if name in mine:
            return address
    return other.addresses[0] if other.addresses else None


def _protocols(state: MeshState) -> dict[str, dict[str, object]]:
    """Declared protocols per service: the service-wide one and per port (None: detect)."""
    out: dict[str, dict[str, object]] = {}
    for w in sorted(state.workloads, key=lambda w: w.node):
        entry = out.setdefault(w.service, {"default": None, "ports": {}})
        if entry["default"] is None and w.protocol:
            entry["default"] = w.protocol
        ports = entry["ports"]
        assert isinstance(ports, dict)
        for port, proto in w.port_protocols:
            ports.setdefault(str(port), proto)
    return out
