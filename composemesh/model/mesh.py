"""The mesh as the pilot sees it at one moment: workloads (app instances) and their proxies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from composemesh.model.consul import ConsulView
from composemesh.model.policy import Policy
from composemesh.model.routing import ServiceRouting
from composemesh.model.settings import MeshSettings


@dataclass(frozen=True)
class NetworkAttachment:
    """A holder's place on one network: its address there, the network's subnet and gateway."""

    name: str
    address: str
    subnet: str  # CIDR, e.g. 172.18.0.0/16
    gateway: str = ""  # "" when the engine names none


@dataclass(frozen=True)
class Workload:
    """One app instance in the mesh, named by the netns holder that owns its network."""

    node: str  # holder container name; the proxy's identity in the mesh
    project: str
    compose_service: str
    service: str  # mesh service
    version: str  # subset
    addresses: tuple[str, ...]  # the holder's addresses on the project's networks
    running: bool
    proxy_container: str | None = None  # the sidecar's container name, once it exists
    proxy_container_id: str | None = None  # ... and its id (what the pilot attests callers by)
    proxy_healthy: bool = False
    networks: tuple[tuple[str, str], ...] = ()  # (network name, address) pairs
    weight: int | None = None  # label weight of its version, None: unset
    protocol: str | None = None  # declared protocol of its ports, None: detect
    port_protocols: tuple[tuple[int, str], ...] = ()
    published_ports: tuple[int, ...] = ()  # container ports the holder publishes on the host
    attachments: tuple[NetworkAttachment, ...] = ()  # the holder's networks, with subnets


@dataclass(frozen=True)
class MeshState:
    """Everything the pilot knows, built anew from its sources after every change."""

    project: str
    workloads: tuple[Workload, ...] = ()
    settings: MeshSettings = field(default_factory=MeshSettings)
    routing: Mapping[str, ServiceRouting] = field(default_factory=dict)
    route_overrides: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    errors: tuple[str, ...] = ()  # why some service kept its last good routing (or policies)
    policies: Mapping[str, tuple[Policy, ...]] = field(default_factory=dict)  # by destination
    consul: ConsulView | None = None  # None: no x-composemesh.consul
    # every name Docker's DNS answers in the project (its compose services, container names,
    # aliases): an imported service of one of these names that is no mesh service is left out
    local_names: frozenset[str] = frozenset()

    def workload_by_node(self, node: str) -> Workload | None:
        for workload in self.workloads:
            if workload.node == node:
                return workload
        return None

