"""SPIFFE IDs of the mesh's workloads: ``spiffe://<trust domain>/ns/<project>/sa/<service>``.

Parsing is strict (the SPIFFE ID spec, narrowed to the one path shape the mesh issues): the
scheme is ``spiffe`` in lower case; the trust domain is lower-case letters, digits, ``.``,
``-`` and ``_`` with no port and no user info; the path is exactly ``/ns/<namespace>/sa/<name>``
whose segments are letters, digits, ``.``, ``-`` and ``_`` (no percent-encoding, no ``.`` or
``..``); no query, no fragment; at most MAX_LENGTH bytes in all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe"
PREFIX = "spiffe://"
MAX_LENGTH = 2048  # the spec's limit for the whole URI
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """One workload identity; building one validates every part (ValueError otherwise)."""

    trust_domain: str
    namespace: str  # the compose project
    service: str  # the mesh service (the "service account")

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_segment(self.namespace, "namespace")
        _check_segment(self.service, "service")
        if len(self.uri) > MAX_LENGTH:
            raise ValueError(f"the SPIFFE ID is longer than {MAX_LENGTH} characters")

    @property
    def uri(self) -> str:
        return f"{PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service}"

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True, slots=True)
class WorkloadName:
    """What a workload certificate says beside its SPIFFE ID: the compose service (Istio's
    workload) and the version, attested as the SPIFFE ID is (ValueError if a part is invalid).
    Several versions share one SPIFFE ID; the peer's metrics tell them apart by these."""

    namespace: str  # the compose project
    workload: str  # the compose service
    version: str

    def __post_init__(self) -> None:
        _check_segment(self.namespace, "namespace")
        _check_segment(self.workload, "workload")
        _check_segment(self.version, "version")


def spiffe_id(trust_domain: str, project: str, service: str) -> str:
    """``spiffe://<trust_domain>/ns/<project>/sa/<service>``; ValueError if a part is invalid."""
    return SpiffeId(trust_domain, project, service).uri


def trust_domain_uri(trust_domain: str) -> str:
    """``spiffe://<trust_domain>``: the ID of the trust domain itself (what a root carries)."""
    _check_trust_domain(trust_domain)
    return PREFIX + trust_domain


def parse_spiffe(uri: object) -> SpiffeId:
    """The SpiffeId that ``uri`` names; ValueError saying why it is not a mesh SPIFFE ID."""
    if not isinstance(uri, str):
        raise ValueError(f"a SPIFFE ID is a string, not {type(uri).__name__}")
    if not uri:
        raise ValueError("the SPIFFE ID is empty")
    if len(uri.encode()) > MAX_LENGTH:
        raise ValueError(f"the SPIFFE ID is longer than {MAX_LENGTH} bytes")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() != SCHEME:
        raise ValueError(f"{uri!r} does not start with {PREFIX}")
    if scheme != SCHEME:
        raise ValueError(f"{uri!r}: the scheme must be lower-case {SCHEME!r}")
    if "?" in rest:
        raise ValueError(f"{uri!r}: a SPIFFE ID has no query")
    if "#" in rest:
        raise ValueError(f"{uri!r}: a SPIFFE ID has no fragment")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        raise ValueError(f"{uri!r}: a SPIFFE ID has no user info")
    if ":" in authority:
        raise ValueError(f"{uri!r}: a SPIFFE ID has no port")
    try:
        _check_trust_domain(authority)
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None
    if not slash or not path:
        raise ValueError(f"{uri!r} names a trust domain, not a workload (no path)")
    segments = path.split("/")
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise ValueError(f"{uri!r}: the path must be /ns/<namespace>/sa/<service>")
    try:
        return SpiffeId(authority, segments[1], segments[3])
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None


def _check_trust_domain(value: str) -> None:
    if not value:
        raise ValueError("the trust domain is empty")
    if len(value) > MAX_TRUST_DOMAIN_LENGTH:
        raise ValueError(f"the trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters")
    if not _TRUST_DOMAIN.fullmatch(value):
        raise ValueError(
            f"the trust domain {value!r} may hold only lower-case letters, digits, '.', '-', '_'"
        )


def _check_segment(value: str, what: str) -> None:
    if not value:
        raise ValueError(f"the {what} is empty")
    if value in (".", ".."):
        raise ValueError(f"the {what} may not be {value!r}")
    if not _SEGMENT.fullmatch(value):
        raise ValueError(f"the {what} {value!r} may hold only letters, digits, '.', '-', '_'")
