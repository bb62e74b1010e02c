"""Pure rendering of proxies' snapshots: the mesh indexed once per push, each proxy's part
rendered from that index and from what that proxy alone needs.

Like Istio's PushContext: ``PushIndex.build`` reads the mesh state once (the running
endpoints, the idle addresses, the routing, the protocols, the policies by destination, and
their digests); ``PushIndex.render`` then costs one proxy only its own parts (its identity,
mTLS mode, policies, published ports and networks) and the endpoints as seen from its
networks, which proxies on the same networks share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from composemesh.model.mesh import MeshState, Workload
from composemesh.model.policy import Policy
from composemesh.model.routing import ServiceRouting
from composemesh.model.snapshot import (
    DeclaredProtocols,
    ProxyIdentity,
    ServiceEndpoint,
    Snapshot,
    SnapshotSettings,
)
from composemesh.model.wellknown import INGRESS_GATEWAY
from composemesh.model.wire import content_version
from composemesh.pilot.federation import NOTHING, Imported, imported

Endpoints = Mapping[str, tuple[ServiceEndpoint, ...]]


@dataclass
class PushIndex:
    """One push's view of the mesh, indexed for rendering every proxy's snapshot from it."""

    state: MeshState
    trust_bundle: str  # the CA's PEM roots (public); a new bundle is a new version
    signing_root: str  # fingerprint of the root that signs now
    running: tuple[Workload, ...]  # by node
    idle_addresses: Mapping[str, tuple[str, ...]]
    routing: Mapping[str, ServiceRouting]
    protocols: Mapping[str, DeclaredProtocols]
    shared_digest: str  # of everything above that every proxy is sent alike
    imported: Imported = NOTHING  # what the Consul catalog adds: remote endpoints, VIPs
    _endpoints: dict[frozenset[str], tuple[Endpoints, str]] = field(default_factory=dict)

    @classmethod
    def build(cls, state: MeshState, trust_bundle: str = "", signing_root: str = "") -> PushIndex:
        by_node = sorted(state.workloads, key=lambda w: w.node)
        idle: dict[str, tuple[str, ...]] = {}
        for w in by_node:
            if not w.running:
                idle[w.service] = (*idle.get(w.service, ()), *w.addresses)
        routing = dict(sorted(state.routing.items()))
        protocols = _protocols(by_node)
        found = imported(state)
        return cls(
            imported=found,
            state=state,
            trust_bundle=trust_bundle,
            signing_root=signing_root,
            running=tuple(w for w in by_node if w.running),
            idle_addresses=idle,
            routing=routing,
            protocols=protocols,
            shared_digest=content_version(
                (state.settings.trust_domain, idle, routing, protocols, trust_bundle,
                 signing_root, state.settings.egress, found.endpoints, found.vips,
                 federated(state))),
        )

    def render(self, workload: Workload) -> Snapshot:
        """The snapshot for ``workload``'s proxy. Same view, same version: no needless push.

        Nothing secret is ever in a snapshot: a root rotation reaches every proxy as an
        ordinary push of the new bundle (public) or signing root (a fingerprint).
        """
        state = self.state
        identity = ProxyIdentity(
            node=workload.node,
            project=state.project,
            compose_service=workload.compose_service,
            service=workload.service,
            version=workload.version,
        )
        mtls_mode = state.settings.mtls_overrides.get(workload.service, state.settings.mtls_mode)
        mine = state.policies.get(workload.service)
        policies: dict[str, tuple[Policy, ...]] = {workload.service: mine} if mine else {}
        services, services_digest = self._endpoints_from(workload)
        settings = SnapshotSettings(
            trust_domain=state.settings.trust_domain,
            mtls_mode=mtls_mode,  # type: ignore[arg-type]  # parse_settings checked it
            services=services,
            idle_addresses=self.idle_addresses,
            routing=self.routing,
            protocols=self.protocols,
            trust_bundle=self.trust_bundle,
            signing_root=self.signing_root,
            policies=policies,
            published_ports=workload.published_ports,
            networks=workload.attachments,
            ingress=state.settings.ingress if workload.service == INGRESS_GATEWAY else None,
            egress=state.settings.egress,
            telemetry=state.settings.monitoring.telemetry(workload.service),
            dns=self.imported.vips,
            federated=federated(state),
        )
        own = (identity, mtls_mode, policies, workload.published_ports, workload.attachments,
               settings.ingress, settings.telemetry)
        version = content_version((own, services_digest, self.shared_digest))
        return Snapshot(version=version, identity=identity, settings=settings)

    def _endpoints_from(self, me: Workload) -> tuple[Endpoints, str]:
        """Each mesh service's running endpoints, each with the one address ``me`` can reach,
        and their digest: one for every set of networks proxies are on."""
        key = frozenset(name for name, _ in me.networks)
        found = self._endpoints.get(key)
        if found is None:
            services: dict[str, tuple[ServiceEndpoint, ...]] = {}
            for w in self.running:
                address = reachable_address(me, w)
                if address is None:
                    continue
                endpoint = ServiceEndpoint(node=w.node, version=w.version, address=address,
                                           addresses=w.addresses)
                services[w.service] = (*services.get(w.service, ()), endpoint)
            for service, remote in self.imported.endpoints.items():  # after the local ones
                services[service] = (*services.get(service, ()), *remote)
            found = self._endpoints[key] = (services, content_version(services))
        return found


def federated(state: MeshState) -> bool:
    """Whether the mesh spans hosts (``x-composemesh.consul`` set): its proxies then let in
    callers of other projects of the trust domain, which policies name ``<project>/<service>``."""
    return state.settings.consul is not None


def render_snapshot(
    state: MeshState, workload: Workload, trust_bundle: str = "", signing_root: str = ""
) -> Snapshot:
    """The snapshot for ``workload``'s proxy, from an index of ``state`` made for it alone
    (the pilot keeps one index per push: ``pilot.push_context``)."""
    return PushIndex.build(state, trust_bundle, signing_root).render(workload)


def reachable_address(me: Workload, other: Workload) -> str | None:
    """``other``'s address on the first network both are on (by name), else its first one."""
    mine = {name for name, _ in me.networks}
    for name, address in other.networks:
        if name in mine:
            return address
    return other.addresses[0] if other.addresses else None


def _protocols(by_node: list[Workload]) -> dict[str, DeclaredProtocols]:
    """Declared protocols per service: the service-wide one and per port (None: detect); the
    first workload (by node) to declare one wins."""
    defaults: dict[str, str | None] = {}
    ports: dict[str, dict[str, str]] = {}
    for w in by_node:
        if defaults.get(w.service) is None:
            defaults[w.service] = w.protocol or None
        service_ports = ports.setdefault(w.service, {})
        for port, proto in w.port_protocols:
            service_ports.setdefault(str(port), proto)
    return {
        service: DeclaredProtocols(default=default, ports=ports[service])  # type: ignore[arg-type]
        for service, default in defaults.items()
    }
