"""The versioned per-proxy snapshot the pilot pushes, and its JSON wire codec.

pilot and proxy never import each other: this module is the whole contract between them.
Later issues add routes, clusters, policies and the trust bundle as new fields; a proxy
NACKs a snapshot whose ``schema`` it does not know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from composemesh.errors import MeshError

SCHEMA = 1


class SnapshotError(MeshError):
    """A snapshot that cannot be decoded or applied; the proxy NACKs it with this reason."""


@dataclass(frozen=True)
class ProxyIdentity:
    """Who a proxy is, as the pilot attested it (never as the proxy claimed)."""

    node: str  # the netns holder's container name: one per app instance
    project: str
    compose_service: str
    service: str  # mesh service
    version: str  # subset


@dataclass(frozen=True)
class Snapshot:
    """Everything one proxy needs, as of one version of the mesh."""

    version: str
    identity: ProxyIdentity
    schema: int = SCHEMA
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ack:
    """A proxy's answer to a snapshot: applied (ACK) or rejected with a reason (NACK)."""

    node: str
    version: str
    ok: bool
    reason: str = ""


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return json.dumps(asdict(snapshot), sort_keys=True).encode()


def decode_snapshot(data: bytes | str) -> Snapshot:
    """Decode a snapshot; raise SnapshotError (the NACK reason) if it is not one we can apply."""
    try:
        obj = json.loads(data)
        if obj.get("schema") != SCHEMA:
            raise SnapshotError(f"unknown snapshot schema {obj.get('schema')!r}")
        return Snapshot(
            version=str(obj["version"]),
            identity=ProxyIdentity(**obj["identity"]),
            schema=SCHEMA,
            settings=dict(obj.get("settings") or {}),
        )
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"malformed snapshot: {exc}") from None


def encode_ack(ack: Ack) -> bytes:
    return json.dumps(asdict(ack)).encode()


def decode_ack(data: bytes | str) -> Ack:
    try:
        obj = json.loads(data)
        return Ack(
            node=str(obj["node"]),
            version=str(obj["version"]),
            ok=bool(obj["ok"]),
            reason=str(obj.get("reason", "")),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"malformed ack: {exc}") from None
