"""HTTP and TCP routing of the mesh as frozen values: matches, weighted subsets, policies.

Like Istio's VirtualService and DestinationRule, flattened per mesh service. Parsing from
``x-composemesh: routes:`` and labels lives in ``model.routing_config``; the decisions
taken on these values (which route, which endpoint, retry or not) live in ``proxy.selection``.
They travel in snapshots as they are (``model.wire``); what their types cannot say (a regex
that compiles, known retry conditions) each checks as it is made, so a decoded one holds too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, get_args

MatchKind = Literal["exact", "prefix", "regex"]
ROUND_ROBIN = "round_robin"
LEAST_REQUEST = "least_request"
LoadBalancer = Literal["round_robin", "least_request"]
LOAD_BALANCERS: tuple[str, ...] = get_args(LoadBalancer)  # the one list of their names
RETRY_ON = ("5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx")
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True)
class StringMatch:
    """How one string (a path or a header value) is matched."""

    kind: MatchKind
    value: str

    def __post_init__(self) -> None:
        if self.kind == "regex":
            try:
                re.compile(self.value)
            except re.error as exc:
                raise ValueError(f"{self.value!r} is not a valid regex: {exc}") from None


@dataclass(frozen=True)
class HttpMatch:
    """All of its conditions must hold (AND); a route matches if any of its matches does (OR)."""

    path: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()  # header names lower-case
    method: str | None = None


@dataclass(frozen=True)
class WeightedSubset:
    """A share of a route's traffic for one version (subset) of the service."""

    version: str
    weight: int


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 0  # retries after the first try; 0 means none
    per_try_timeout_s: float | None = None
    retry_on: frozenset[str] = frozenset({"5xx", "connect-failure", "reset"})
    retry_non_idempotent: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(self.retry_on - frozenset(RETRY_ON))
        if unknown:
            raise ValueError(f"retry_on: {', '.join(map(repr, unknown))} is not one of "
                             f"{', '.join(RETRY_ON)}")


@dataclass(frozen=True)
class FaultDelay:
    seconds: float
    percent: float


@dataclass(frozen=True)
class FaultAbort:
    status: int
    percent: float


@dataclass(frozen=True)
class FaultPolicy:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True)
class HttpRoute:
    """One rule: if a request matches, send it to these weighted subsets with these policies."""

    name: str
    matches: tuple[HttpMatch, ...]  # empty: matches every request
    destinations: tuple[WeightedSubset, ...]
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float | None = None
    fault: FaultPolicy | None = None


@dataclass(frozen=True)
class OutlierPolicy:
    """Eject an endpoint after N consecutive failures for a back-off that grows per ejection."""

    consecutive_errors: int = 5
    base_ejection_s: float = 30.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class ServiceRouting:
    """Everything about how traffic to one mesh service is routed."""

    service: str
    routes: tuple[HttpRoute, ...]  # first match wins; the last one is the default
    load_balancer: LoadBalancer = "round_robin"
    outlier: OutlierPolicy | None = field(default_factory=OutlierPolicy)
    connect_timeout_s: float = 5.0
