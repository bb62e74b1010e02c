"""HTTP and TCP routing of the mesh as frozen values: matches, weighted subsets, policies.

Like Istio's VirtualService and DestinationRule, flattened per mesh service. Parsing from
``x-composemesh: routes:`` and labels lives in ``model.routing_config``; the decisions
taken on these values (which route, which endpoint, retry or not) live in ``proxy.decisions``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

MatchKind = Literal["exact", "prefix", "regex"]
LoadBalancer = Literal["round_robin", "least_request"]
RETRY_ON = ("5xx", "gateway-error", "connect-failure", "reset", "retriable-4xx")
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True)
class StringMatch:
    """How one string (a path or a header value) is matched."""

    kind: MatchKind
    value: str


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


# --------------------------------------------------------------------------- JSON codec
#
# A ServiceRouting travels inside the pilot's snapshots as plain JSON. The decoder checks
# every field and raises ValueError naming the field, which the proxy turns into a NACK.

_MATCH_KINDS = ("exact", "prefix", "regex")
_LOAD_BALANCERS = ("round_robin", "least_request")


def routing_to_json(r: ServiceRouting) -> dict[str, Any]:
    """``r`` as JSON-able values; ``routing_from_json`` gives back an equal ServiceRouting."""
    return {
        "service": r.service,
        "load_balancer": r.load_balancer,
        "connect_timeout_s": r.connect_timeout_s,
        "outlier": None
        if r.outlier is None
        else {
            "consecutive_errors": r.outlier.consecutive_errors,
            "base_ejection_s": r.outlier.base_ejection_s,
            "max_ejection_percent": r.outlier.max_ejection_percent,
        },
        "routes": [_route_to_json(route) for route in r.routes],
    }


def _route_to_json(route: HttpRoute) -> dict[str, Any]:
    fault = route.fault
    return {
        "name": route.name,
        "matches": [
            {
                "path": _string_match_to_json(m.path),
                "headers": [[name, _string_match_to_json(sm)] for name, sm in m.headers],
                "method": m.method,
            }
            for m in route.matches
        ],
        "destinations": [{"version": d.version, "weight": d.weight} for d in route.destinations],
        "retries": {
            "attempts": route.retries.attempts,
            "per_try_timeout_s": route.retries.per_try_timeout_s,
            "retry_on": sorted(route.retries.retry_on),
            "retry_non_idempotent": route.retries.retry_non_idempotent,
        },
        "timeout_s": route.timeout_s,
        "fault": None
        if fault is None
        else {
            "delay": None
            if fault.delay is None
            else {"seconds": fault.delay.seconds, "percent": fault.delay.percent},
            "abort": None
            if fault.abort is None
            else {"status": fault.abort.status, "percent": fault.abort.percent},
        },
    }


def _string_match_to_json(m: StringMatch | None) -> dict[str, str] | None:
    return None if m is None else {"kind": m.kind, "value": m.value}


def routing_from_json(obj: object) -> ServiceRouting:
    """Decode what ``routing_to_json`` wrote; raise ValueError naming the first bad field."""
    d = _obj(obj, "routing")
    lb = _str(d, "load_balancer", "routing")
    if lb not in _LOAD_BALANCERS:
        raise ValueError(
            f"routing.load_balancer: {lb!r} is not one of {', '.join(_LOAD_BALANCERS)}"
        )
    outlier_obj = _get(d, "outlier", "routing")
    outlier = None
    if outlier_obj is not None:
        o = _obj(outlier_obj, "routing.outlier")
        outlier = OutlierPolicy(
            consecutive_errors=_int(o, "consecutive_errors", "routing.outlier"),
            base_ejection_s=_num(o, "base_ejection_s", "routing.outlier"),
            max_ejection_percent=_int(o, "max_ejection_percent", "routing.outlier"),
        )
    routes = _list(_get(d, "routes", "routing"), "routing.routes")
    return ServiceRouting(
        service=_str(d, "service", "routing"),
        routes=tuple(_route_from_json(r, f"routing.routes[{i}]") for i, r in enumerate(routes)),
        load_balancer=lb,  # type: ignore[arg-type]  # checked above
        outlier=outlier,
        connect_timeout_s=_num(d, "connect_timeout_s", "routing"),
    )


def _route_from_json(obj: object, where: str) -> HttpRoute:
    d = _obj(obj, where)
    matches = []
    for i, m_obj in enumerate(_list(_get(d, "matches", where), f"{where}.matches")):
        mw = f"{where}.matches[{i}]"
        m = _obj(m_obj, mw)
        headers = []
        for j, pair in enumerate(_list(_get(m, "headers", mw), f"{mw}.headers")):
            hw = f"{mw}.headers[{j}]"
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], str):
                raise ValueError(f"{hw}: must be a [name, match] pair")
            sm = _string_match_from_json(pair[1], hw)
            assert sm is not None
            headers.append((pair[0], sm))
        method = _get(m, "method", mw)
        if method is not None and not isinstance(method, str):
            raise ValueError(f"{mw}.method: must be a string or null")
        matches.append(
            HttpMatch(
                path=_string_match_from_json(_get(m, "path", mw), f"{mw}.path", optional=True),
                headers=tuple(headers),
                method=method,
            )
        )
    destinations = []
    for i, dest in enumerate(_list(_get(d, "destinations", where), f"{where}.destinations")):
        dw = f"{where}.destinations[{i}]"
        dd = _obj(dest, dw)
        destinations.append(WeightedSubset(_str(dd, "version", dw), _int(dd, "weight", dw)))
    rw = f"{where}.retries"
    rd = _obj(_get(d, "retries", where), rw)
    retry_on = _list(_get(rd, "retry_on", rw), f"{rw}.retry_on")
    for cond in retry_on:
        if cond not in RETRY_ON:
            raise ValueError(f"{rw}.retry_on: {cond!r} is not one of {', '.join(RETRY_ON)}")
    non_idempotent = _get(rd, "retry_non_idempotent", rw)
    if not isinstance(non_idempotent, bool):
        raise ValueError(f"{rw}.retry_non_idempotent: must be true or false")
    retries = RetryPolicy(
        attempts=_int(rd, "attempts", rw),
        per_try_timeout_s=_num(rd, "per_try_timeout_s", rw, optional=True),
        retry_on=frozenset(retry_on),
        retry_non_idempotent=non_idempotent,
    )
    fault = None
    fault_obj = _get(d, "fault", where)
    if fault_obj is not None:
        fw = f"{where}.fault"
        fd = _obj(fault_obj, fw)
        delay = abort = None
        if (delay_obj := _get(fd, "delay", fw)) is not None:
            dd = _obj(delay_obj, f"{fw}.delay")
            delay = FaultDelay(
                _num(dd, "seconds", f"{fw}.delay"), _num(dd, "percent", f"{fw}.delay")
            )
        if (abort_obj := _get(fd, "abort", fw)) is not None:
            ad = _obj(abort_obj, f"{fw}.abort")
            abort = FaultAbort(
                _int(ad, "status", f"{fw}.abort"), _num(ad, "percent", f"{fw}.abort")
            )
        fault = FaultPolicy(delay=delay, abort=abort)
    return HttpRoute(
        name=_str(d, "name", where),
        matches=tuple(matches),
        destinations=tuple(destinations),
        retries=retries,
        timeout_s=_num(d, "timeout_s", where, optional=True),
        fault=fault,
    )


def _string_match_from_json(obj: object, where: str, optional: bool = False) -> StringMatch | None:
    if obj is None and optional:
        return None
    d = _obj(obj, where)
    kind = _str(d, "kind", where)
    if kind not in _MATCH_KINDS:
        raise ValueError(f"{where}.kind: {kind!r} is not one of {', '.join(_MATCH_KINDS)}")
    value = _str(d, "value", where)
    if kind == "regex":
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{where}.value: {value!r} is not a valid regex: {exc}") from None
    return StringMatch(kind, value)  # type: ignore[arg-type]  # checked above


def _obj(obj: object, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: must be an object, not {type(obj).__name__}")
    return obj


def _list(obj: object, where: str) -> list[Any]:
    if not isinstance(obj, list):
        raise ValueError(f"{where}: must be a list, not {type(obj).__name__}")
    return obj


def _get(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"{where}.{key}: missing")
    return d[key]


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    value = _get(d, key, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key}: must be a string, not {type(value).__name__}")
    return value


def _int(d: Mapping[str, Any], key: str, where: str) -> int:
    value = _get(d, key, where)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}.{key}: must be an integer, not {type(value).__name__}")
    return value


@overload
def _num(d: Mapping[str, Any], key: str, where: str) -> float: ...
@overload
def _num(d: Mapping[str, Any], key: str, where: str, optional: bool) -> float | None: ...
def _num(d: Mapping[str, Any], key: str, where: str, optional: bool = False) -> float | None:
    value = _get(d, key, where)
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ValueError(f"{where}.{key}: must be a number, not {type(value).__name__}")
    return float(value)
