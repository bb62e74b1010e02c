"""The ingress gateway's part of the pilot–proxy contract: the hosts it serves and where each
request goes, as the pilot sends it (``SnapshotSettings.ingress``). The file's form and its
checks are in ``model.gateways``; the certificates never travel (they are mounted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1)]


@dataclass(frozen=True, slots=True)
class IngressPath:
    """Requests to one host whose path starts with ``path`` go to ``service:port``."""

    path: str
    service: Name
    port: int


@dataclass(frozen=True, slots=True)
class IngressHostSpec:
    """One host the ingress gateway serves: with a certificate of its own (``tls``; the
    files are mounted into the gateway, never sent) or plain HTTP only, and its routes."""

    name: str
    tls: bool = False
    routes: tuple[IngressPath, ...] = ()


@dataclass(frozen=True, slots=True)
class IngressSettings:
    """The ingress gateway's part of its snapshot: what it listens for and where it sends it.

    ``public_https_port``: the host port HTTPS is published on, for the redirect's
    ``Location`` (the gateway itself listens on its own container ports)."""

    http: bool = False
    https: bool = False
    redirect_to_https: bool = False
    public_https_port: int | None = None
    hosts: tuple[IngressHostSpec, ...] = ()
