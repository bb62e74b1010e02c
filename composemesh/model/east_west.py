"""How a call crosses hosts: the SNI an east-west gateway routes by, and the VIPs of imported names.

A sidecar calling an instance on another host dials that host's east-west gateway (the address
and port the instance has in Consul) and names the target in its TLS ClientHello, as Istio's
east-west gateway reads it (``AUTO_PASSTHROUGH``)::

    outbound_.<port>_.<version>_.<service>.<project>.svc.<trust domain>

The gateway never ends the TLS: it reads the name, picks a local endpoint of that service and
version and splices the bytes to ``<endpoint>:<port>``, where that endpoint's sidecar ends
the mTLS and sees the caller's own certificate. Pure: no socket here.

An imported service with no instance in this project has no name in Docker's DNS; each proxy
answers its name with a VIP from ``IMPORTED_VIP_NETWORK`` (``imported_vips``), and routes
what is sent to that VIP as that service, as Istio's DNS proxy does for ServiceEntries.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

IMPORTED_VIP_NETWORK = "240.241.0.0/16"  # beside the egress hosts' 240.240.0.0/16

_SNI = re.compile(
    r"outbound_\.(?P<port>[1-9][0-9]{0,4})_\.(?P<version>[A-Za-z0-9][A-Za-z0-9._-]*)_\."
    r"(?P<service>[A-Za-z0-9][A-Za-z0-9._-]*)\.(?P<project>[a-z0-9][a-z0-9_-]*)"
    r"\.svc\.(?P<trust_domain>[a-z0-9][a-z0-9.-]*)")


@dataclass(frozen=True, slots=True)
class GatewayTarget:
    """What an SNI of the east-west form names."""

    port: int
    version: str
    service: str
    project: str
    trust_domain: str


def sni_tail(version: str, service: str, project: str, trust_domain: str) -> str:
    """The SNI of a remote instance without its port: ``sni(port, tail)`` completes it."""
    return f"{version}_.{service}.{project}.svc.{trust_domain}"


def sni(port: int, tail: str) -> str:
    """The SNI naming port ``port`` of the instance ``tail`` (``sni_tail``) names."""
    return f"outbound_.{port}_.{tail}"


def parse_sni(name: str | None) -> GatewayTarget | None:
    """The target an east-west SNI names; None for any other name (or none)."""
    if not name or len(name) > 253:
        return None
    match = _SNI.fullmatch(name.lower() if name.isascii() else "")
    if match is None:
        return None
    port = int(match["port"])
    if port > 65535:
        return None
    # lower() above: DNS names are case-insensitive; versions and services are matched
    # case-insensitively by the gateway too
    return GatewayTarget(port, match["version"], match["service"], match["project"],
                         match["trust_domain"])


def imported_vips(names: Iterable[str]) -> dict[str, str]:
    """A VIP per name, stable: a name keeps its VIP whatever other names come and go, unless
    two hash alike (then the one first in sorted order keeps it, the next takes the following
    free address)."""
    network = ipaddress.ip_network(IMPORTED_VIP_NETWORK)
    size = network.num_addresses - 2  # neither the network's nor its broadcast address
    taken: dict[int, str] = {}
    vips: dict[str, str] = {}
    for name in sorted(set(names)):
        slot = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % size
        while slot in taken:
            slot = (slot + 1) % size
        taken[slot] = name
        vips[name] = str(network.network_address + 1 + slot)
    return vips
