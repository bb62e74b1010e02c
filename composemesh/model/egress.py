"""The egress part of the pilot–proxy contract: the external hosts the mesh may call, as the
pilot sends them to every proxy (``SnapshotSettings.egress``). Sidecars read which calls go
to the egress gateway (a listed host's VIP or address) and what REGISTRY_ONLY refuses; the
egress gateway reads where each host is and how to reach it. The file's form and its
checks are in ``model.gateways``; certificate files never travel (they are mounted)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

Name = Annotated[str, msgspec.Meta(min_length=1)]
EgressProtocol = Literal["tls", "http", "tcp"]
EgressPolicy = Literal["ALLOW_ANY", "REGISTRY_ONLY"]


@dataclass(frozen=True, slots=True)
class EgressOrigination:
    """The gateway adds TLS: to ``port``, verifying with ``ca`` (a path in the gateway; None:
    the system's trust store), presenting ``cert``/``key`` if given."""

    port: int = 443
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True, slots=True)
class EgressHostSpec:
    """One external host the mesh may call on ``port``. ``vip``: the address its name has in
    every meshed namespace (``/etc/hosts``), by which the caller's sidecar knows the call;
    ``address``: where the gateway reaches it (None: by DNS)."""

    host: Name
    port: int
    protocol: EgressProtocol
    vip: str
    address: str | None = None
    origination: EgressOrigination | None = None


@dataclass(frozen=True, slots=True)
class EgressSettings:
    policy: EgressPolicy = "ALLOW_ANY"
    hosts: tuple[EgressHostSpec, ...] = ()
