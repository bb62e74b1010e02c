"""The contract between pilot and proxies: every message they exchange, as a typed value.

pilot and proxy never import each other: this module and its codec (``model.wire``) are the
whole of what they share. A snapshot and each of its parts, an ACK/NACK, the certificate
answer and a refusal are frozen dataclasses here (the routing and policy values inside a
snapshot are the model's own ``ServiceRouting`` and ``Policy``); ``wire.encode`` writes any
of them, ``wire.decode`` reads one back as its type, and a field that does not decode is a
ContractError naming its path: the reason a proxy NACKs a snapshot with. A proxy also NACKs a
snapshot whose ``schema`` it does not know. The certificate request is the one message that
is not JSON: a PEM PKCS#10 CSR (``CSR_CONTENT_TYPE``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgspec

from composemesh.model.egress import EgressSettings
from composemesh.model.ingress import IngressSettings
from composemesh.model.mesh import NetworkAttachment
from composemesh.model.monitoring import Telemetry
from composemesh.model.policy import Policy
from composemesh.model.routing import ServiceRouting
from composemesh.model.wire import ContractError, decode, encode

SCHEMA = 1
# The pilot's endpoints for proxies (over its Unix socket) and the one body that is not JSON.
SNAPSHOT_PATH = "/v1/snapshot"  # GET, long poll: a Snapshot (200) or nothing new (304)
ACK_PATH = "/v1/ack"  # POST an Ack
CERTIFICATE_PATH = "/v1/certificate"  # POST a PEM CSR: a CertificateResponse
CSR_CONTENT_TYPE = "application/pkcs10"

Protocol = Literal["http", "tcp"]
MtlsMode = Literal["STRICT", "PERMISSIVE"]
Locality = Literal["local", "remote"]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PortName = Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{0,4}$")]  # a JSON key: a string
Name = Annotated[str, msgspec.Meta(min_length=1)]


class SnapshotError(ContractError):
    """A snapshot that cannot be decoded or applied; the proxy NACKs it with this reason."""


# --------------------------------------------------------------------------- the messages


@dataclass(frozen=True)
class ProxyIdentity:
    """Who a proxy is, as the pilot attested it (never as the proxy claimed)."""

    node: str  # the netns holder's container name: one per app instance
    project: str
    compose_service: str
    service: str  # mesh service
    version: str  # subset


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    """One running instance of a mesh service, as one proxy reaches it."""

    node: Name
    version: Name
    address: Name  # the one address this proxy reaches it at
    addresses: tuple[str, ...] = ()  # all of its addresses: any of them the app may dial
    compose_service: str | None = None  # a metric label; None: read from the node's name
    # An instance outside this project (imported from Consul): dialed at ``address:port``
    # (its host's east-west gateway, or the instance itself) instead of the port the app
    # called; 0 for this project's own, dialed at the app's port.
    port: int = 0
    locality: Locality = "local"  # "remote": used only while no local endpoint is available
    peer: str = ""  # the SPIFFE ID it must prove; "": this project's own ID of the service
    sni: str = ""  # the east-west gateway's target (``model.east_west.sni_tail``), "": none
    plaintext: bool = False  # a catalog instance not in any mesh: plain TCP to address:port


@dataclass(frozen=True, slots=True)
class DeclaredProtocols:
    """The declared protocol of a service's ports; None means "detect from the first bytes"."""

    default: Protocol | None = None
    ports: Mapping[PortName, Protocol] = field(default_factory=dict)  # {"9080": "http"}


@dataclass(frozen=True)
class SnapshotSettings:
    """What one proxy is told, part by part (a part left out is empty)."""

    trust_domain: str = ""
    mtls_mode: MtlsMode = "STRICT"  # for this proxy's own service
    services: Mapping[str, tuple[ServiceEndpoint, ...]] = field(default_factory=dict)
    # addresses of instances that take no traffic now: an app's DNS may still answer them
    idle_addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    routing: Mapping[str, ServiceRouting] = field(default_factory=dict)
    protocols: Mapping[str, DeclaredProtocols] = field(default_factory=dict)
    trust_bundle: str = ""  # the CA's roots (PEM, public); "": keep the current bundle
    signing_root: str = ""  # fingerprint of the root that signs now
    policies: Mapping[str, tuple[Policy, ...]] = field(default_factory=dict)  # this service's
    published_ports: tuple[int, ...] = ()  # container ports the holder publishes
    networks: tuple[NetworkAttachment, ...] = ()  # the holder's networks, with subnets
    ingress: IngressSettings | None = None  # the ingress gateway's alone
    egress: EgressSettings | None = None  # None: no egress section (ALLOW_ANY, no hosts)
    telemetry: Telemetry = Telemetry()  # access logs, tracing: this proxy's service's
    # names the proxy's DNS answers (imported services with no instance here) -> their VIP
    dns: Mapping[str, str] = field(default_factory=dict)
    # callers of other projects of the trust domain are let in (x-composemesh.consul set:
    # other hosts' sidecars, through this project's east-west gateway); False: this one's only
    federated: bool = False


@dataclass(frozen=True)
class Snapshot:
    """Everything one proxy needs, as of one version of the mesh."""

    version: str
    identity: ProxyIdentity
    schema: int = SCHEMA
    settings: SnapshotSettings = field(default_factory=SnapshotSettings)


@dataclass(frozen=True)
class Ack:
    """A proxy's answer to a snapshot: applied (ACK) or rejected with a reason (NACK)."""

    node: str
    version: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class CertificateResponse:
    """The pilot's answer to a proxy's CSR (``POST /v1/certificate``, the body a PEM CSR)."""

    cert_pem: str
    chain_pem: str  # the leaf, then its issuers
    trust_bundle_pem: str
    spiffe: str
    not_after: str  # ISO 8601
    serial: str  # hex


@dataclass(frozen=True)
class ErrorResponse:
    """Any refusal by the pilot (4xx, 5xx): one sentence."""

    error: str


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """``snapshot`` on the wire (``wire.encode``: the same snapshot, the same bytes)."""
    return encode(snapshot)


def decode_snapshot(data: bytes | str) -> Snapshot:
    """Decode a snapshot; raise SnapshotError (the NACK reason) if it is not one we can apply."""
    try:
        snapshot = decode(data, Snapshot, SnapshotError)
    except SnapshotError:
        try:  # a snapshot of another schema is refused for that, not for its fields
            schema = decode(data, _Schema).schema
        except ContractError:
            schema = SCHEMA
        if schema != SCHEMA:
            raise SnapshotError(f"$.schema: unknown snapshot schema {schema!r}") from None
        raise
    if snapshot.schema != SCHEMA:
        raise SnapshotError(f"$.schema: unknown snapshot schema {snapshot.schema!r}")
    return snapshot


@dataclass(frozen=True)
class _Schema:
    """Only the schema of a snapshot, to say why one of another schema is refused."""

    schema: object = SCHEMA
