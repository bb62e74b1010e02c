"""Consul, the catalog a fleet of Docker hosts shares: a client of its HTTP API and the pure
conversions between its JSON and the mesh's values (the pilot's Consul source sits on these)."""

from composemesh.consul.client import ConsulClient, ConsulError
from composemesh.consul.convert import (
    blocking_index,
    catalog_instance,
    check_id,
    health_instance,
    health_instances,
    registration,
    service_id,
    service_names,
)

__all__ = [
    "ConsulClient",
    "ConsulError",
    "blocking_index",
    "catalog_instance",
    "check_id",
    "health_instance",
    "health_instances",
    "registration",
    "service_id",
    "service_names",
]
