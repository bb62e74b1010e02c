"""Pure: what the Consul catalog adds to the mesh, as every proxy is told it.

The rules (``labels.md`` documents them for users):

- **Local first.** A service that runs in this project keeps its local endpoints as they are;
  its instances on other hosts are added as ``remote`` endpoints of their versions, which a
  proxy uses only while no local endpoint of that version is available (locality failover,
  as Istio's priorities do it). A version that runs only elsewhere is served from there, so
  a weighted split can span hosts.
- **Only what proves who it is stands in for a mesh service.** An instance registered by
  another host's composemesh carries its SPIFFE ID (``Meta.spiffe``): it is used only if
  that ID is of this trust domain and names the catalog service itself (so a registration
  cannot send ``reviews``'s traffic to another identity), and it is reached through its
  host's east-west gateway over mTLS end to end. A catalog entry without one (a VM, anything
  Consul knows) is plain TCP: it is used only for a name that is no mesh service here, never
  as a plaintext failover of one.
- **Local names win.** A catalog service named like a compose service of this project that
  is not in the mesh (or a container name or alias there) is left out: Docker's DNS answers
  that name here, and it keeps meaning the local one.
- **Names.** An imported service that is no mesh service of this project gets a VIP
  (``model.east_west.imported_vips``), which each proxy's DNS answers for its name.
- Entries whose address is not an IP address are left out (the proxies route by address;
  Consul's DNS names are not resolved by the pilot).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

from composemesh.ca import parse_spiffe
from composemesh.model import wellknown as wk
from composemesh.model.consul import CatalogInstance, ConsulView
from composemesh.model.east_west import imported_vips, sni_tail
from composemesh.model.mesh import MeshState
from composemesh.model.snapshot import ServiceEndpoint

# the mesh's own names: never taken from the catalog
RESERVED = frozenset({wk.INGRESS_GATEWAY, wk.EGRESS_GATEWAY, wk.EAST_WEST_GATEWAY,
                      wk.PILOT_SERVICE, wk.PROMETHEUS_SERVICE, wk.GRAFANA_SERVICE, "consul"})


@dataclass(frozen=True)
class Imported:
    """The catalog's part of one push: remote endpoints by service, and the VIPs of names."""

    endpoints: Mapping[str, tuple[ServiceEndpoint, ...]] = field(default_factory=dict)
    vips: Mapping[str, str] = field(default_factory=dict)  # name -> VIP (no local service)
    left_out: tuple[str, ...] = ()  # why instances were not used, one sentence each


NOTHING = Imported()


def imported(state: MeshState) -> Imported:
    """The remote endpoints and VIPs that ``state``'s Consul view gives (see the rules above).

    One push asks it three times (the routing's versions, the snapshots, ``status``) of the
    same frozen values: the last answer is kept, keyed by what it reads (held, so that their
    ids stay theirs)."""
    view = state.consul
    if view is None or not view.imported:
        return NOTHING
    key = (view, state.workloads, state.local_names, state.settings.trust_domain)
    last = _last.get("imported")
    if last is not None and all(a is b for a, b in zip(last[0], key, strict=True)):
        return last[1]
    found = _imported(state, view)
    _last["imported"] = (key, found)
    return found


_last: dict[str, tuple[tuple[object, ...], Imported]] = {}


def _imported(state: MeshState, view: ConsulView) -> Imported:
    trust_domain = state.settings.trust_domain
    local = {w.service for w in state.workloads}
    endpoints: dict[str, tuple[ServiceEndpoint, ...]] = {}
    left_out: list[str] = []
    for service in sorted(view.imported):
        if service in RESERVED:
            continue
        if service in state.local_names and service not in local:
            left_out.append(f"{service}: a service of this project that is not in the mesh "
                            f"has that name; the local one wins")
            continue
        found = []
        for instance in view.imported[service]:
            endpoint, why = remote_endpoint(instance, trust_domain, service in local)
            if endpoint is None:
                left_out.append(f"{service} instance {instance.id}: {why}")
            else:
                found.append(endpoint)
        if found:
            endpoints[service] = tuple(sorted(found, key=lambda e: e.node))
    vips = imported_vips(name for name in endpoints if name not in local)
    return Imported(endpoints=endpoints, vips=vips, left_out=tuple(left_out))


def remote_endpoint(instance: CatalogInstance, trust_domain: str,
                    local: bool) -> tuple[ServiceEndpoint | None, str]:
    """The endpoint a catalog instance is to every proxy, or None and why it is left out."""
    try:
        ipaddress.ip_address(instance.address)
    except ValueError:
        return None, f"its address {instance.address!r} is not an IP address"
    version = instance.version or wk.DEFAULT_VERSION
    if instance.spiffe is None:
        if local:
            return None, ("it proves no mesh identity (no Meta.spiffe), and the service runs "
                          "here: a plaintext instance is never a failover of a mesh service")
        return ServiceEndpoint(node=instance.id, version=version, address=instance.address,
                               port=instance.port, locality="remote", plaintext=True,
                               compose_service=instance.service), ""
    try:
        spiffe = parse_spiffe(instance.spiffe)
    except ValueError as exc:
        return None, f"Meta.spiffe: {exc}"
    if spiffe.trust_domain != trust_domain:
        return None, (f"Meta.spiffe is of trust domain {spiffe.trust_domain!r}, not "
                      f"{trust_domain!r}")
    if spiffe.service != instance.service:
        return None, f"Meta.spiffe names service {spiffe.service!r}, not {instance.service!r}"
    return ServiceEndpoint(
        node=instance.id, version=version, address=instance.address, port=instance.port,
        locality="remote", peer=instance.spiffe,
        sni=sni_tail(version, instance.service, spiffe.namespace, trust_domain),
        compose_service=instance.service), ""


def remote_versions(found: Imported) -> dict[str, set[str]]:
    """The versions each imported service has elsewhere (its routing covers them)."""
    return {service: {e.version for e in eps} for service, eps in found.endpoints.items()}


def consul_status(state: MeshState) -> dict[str, object] | None:
    """What ``composemesh status`` shows of Consul: whether it answers, what this project
    exports and what it imports, per service (None: no ``x-composemesh.consul``)."""
    settings = state.settings.consul
    if settings is None:
        return None
    view = state.consul
    found = imported(state)
    used = {e.node for eps in found.endpoints.values() for e in eps}
    return {
        "address": settings.address,
        "datacenter": settings.datacenter,
        "host_address": settings.host_address,
        "east_west_port": settings.east_west_port,
        "reachable": bool(view and view.reachable),
        "error": view.error if view else "not asked yet",
        "error_kind": view.error_kind if view else "",
        "exported": {service: list(ids) for service, ids in
                     sorted((view.exported if view else {}).items())},
        "imported": {
            service: [
                {"id": i.id, "address": i.address, "port": i.port,
                 "version": i.version or wk.DEFAULT_VERSION, "project": i.project,
                 "mesh": i.spiffe is not None, "used": i.id in used}
                for i in instances
            ]
            for service, instances in sorted((view.imported if view else {}).items())
        },
        "vips": dict(found.vips),
        "left_out": list(found.left_out),
    }
