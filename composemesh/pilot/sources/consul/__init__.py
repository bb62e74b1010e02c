"""The pilot's Consul source (x-composemesh.consul): exports this project's mesh service
instances to Consul's catalog and imports everyone else's (``controller.ConsulSource``)."""

from composemesh.pilot.sources.consul.controller import ConsulSource

__all__ = ["ConsulSource"]
