"""Builds each mesh service's ServiceRouting from its labels and ``x-composemesh: routes:``.

Pure: plain values in, frozen ServiceRouting values out, ConfigError naming the field on the
first mistake. The format, per mesh service (every key optional)::

    x-composemesh:
      routes:
        reviews:                       # a mesh service
          load_balancer: round_robin   # or least_request
          connect_timeout: 2s
          retries: {attempts: 2}       # retries and timeout here: for every route without its own
          timeout: 10s
          outlier_detection: {consecutive_errors: 5, base_ejection_time: 30s,
                              max_ejection_percent: 50}      # or false: never eject
          http:                        # ordered; the first route that matches wins
            - name: jason-to-v2
              match:                   # a list: any item may match (OR);
                - headers: {end-user: {exact: jason}}    # within one item all must hold (AND)
                  path: {prefix: /reviews}               # exact, prefix or regex (full match)
                  method: GET
              route: {v2: 100}         # version -> weight (relative; versions left out get 0)
              retries: {attempts: 3, per_try_timeout: 2s, retry_on: [5xx, connect-failure, reset],
                        retry_non_idempotent: false}
              timeout: 5s
              fault: {delay: {fixed: 2s, percent: 10}, abort: {status: 503, percent: 5}}
            - route: {v1: 80, v2: 20}  # no match: the default route, which must come last

Rules:

- Durations are ``250ms``, ``2s``, ``1.5s``, ``1m``, ``1h`` or a number of seconds. A
  ``timeout`` or ``per_try_timeout`` of 0 means none.
- A string where a match is expected is an exact match: ``path: /reviews``.
- ``retry_on`` is a list or a comma-separated string of 5xx, gateway-error, connect-failure,
  reset, retriable-4xx. A route without ``retries`` gets the service's ``retries``, else
  DEFAULT_RETRIES; the keys given in a ``retries`` override those it would get otherwise.
  ``timeout`` likewise: the route's, else the service's, else DEFAULT_TIMEOUT_S.
- A fault's ``percent`` defaults to 100.
- A route without ``route`` (the header routes included) sends to the label split below.
- When no route is match-less, a route named ``default`` with the label split, DEFAULT_RETRIES
  and the service's retries and timeout is added last: every request has a route.

The label split (``composemesh.weight`` per version): read as percentages when some versions
have no weight. No version labelled: 100 shared equally (3 versions: 34/33/33; the remainder
goes to the first versions by name). Some labelled: the unlabelled share equally what the
labelled leave of 100 (v1=80 and unlabelled v2, v3: 80/10/10), 0 when nothing is left. Every
version labelled: the labels as they are (relative weights).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.routing import (
    LOAD_BALANCERS,
    RETRY_ON,
    ROUND_ROBIN,
    FaultAbort,
    FaultDelay,
    FaultPolicy,
    HttpMatch,
    HttpRoute,
    OutlierPolicy,
    RetryPolicy,
    ServiceRouting,
    StringMatch,
    WeightedSubset,
)
from composemesh.model.settings import SECTION

ROUTES = f"{SECTION}.routes"
SERVICE_KEYS = (
    "load_balancer",
    "connect_timeout",
    "outlier_detection",
    "retries",
    "timeout",
    "http",
)
ROUTE_KEYS = ("name", "match", "route", "retries", "timeout", "fault")
MATCH_KEYS = ("headers", "path", "method")
STRING_MATCH_KEYS = ("exact", "prefix", "regex")
RETRY_KEYS = ("attempts", "per_try_timeout", "retry_on", "retry_non_idempotent")
FAULT_KEYS = ("delay", "abort")
DELAY_KEYS = ("fixed", "percent")
ABORT_KEYS = ("status", "percent")
OUTLIER_KEYS = ("consecutive_errors", "base_ejection_time", "max_ejection_percent")

DEFAULT_ROUTE = "default"
# Like Istio's default: two retries, where nothing was sent or the upstream said it is unwell.
DEFAULT_RETRIES = RetryPolicy(
    attempts=2, retry_on=frozenset({"connect-failure", "reset", "gateway-error"})
)
DEFAULT_TIMEOUT_S: float | None = None  # like Istio: no overall request timeout unless set

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_METHOD = re.compile(r"^[A-Za-z]+$")
_WEIGHT = re.compile(r"^\d+$")

Destinations = tuple[WeightedSubset, ...]


# --------------------------------------------------------------------------- public API


def build_routing(
    services: Mapping[str, Mapping[str, int | None]], routes_section: object
) -> dict[str, ServiceRouting]:
    """The routing of every mesh service in ``services`` (service -> version -> label weight).

    ``routes_section`` is the value of ``x-composemesh: routes:`` (None: no routes). Raises
    ConfigError naming the field (``x-composemesh.routes.reviews.http[0].route.v3``) on the
    first mistake; a label split where every weight is 0 is reported on the mesh service
    with field ``label composemesh.weight``.
    """
    if routes_section is None:
        section: Mapping[Any, Any] = {}
    elif isinstance(routes_section, Mapping):
        section = routes_section
    else:
        raise ConfigError("must be a mapping of mesh service to its routing", field=ROUTES)
    for name in section:
        if name not in services:
            known = ", ".join(sorted(services)) if services else "none: no service is in the mesh"
            raise ConfigError(
                f"{name!r} is not a mesh service (the mesh services are {known})",
                field=f"{ROUTES}.{name}",
            )
    return {
        name: _service_routing(name, versions, section.get(name))
        for name, versions in services.items()
    }


def label_split(versions: Mapping[str, int | None]) -> dict[str, int]:
    """Each version's weight from its label (None: unlabelled), by the rule in the module doc."""
    names = sorted(versions)
    unlabelled = [v for v in names if versions[v] is None]
    labelled_total = sum(w for w in versions.values() if w is not None)
    if len(unlabelled) == len(names):
        shares = _equal_shares(unlabelled, max(100, len(names)))  # every version gets some
    else:
        shares = _equal_shares(unlabelled, max(0, 100 - labelled_total))
    return {v: shares[v] if versions[v] is None else versions[v] or 0 for v in names}


def apply_weights(
    routing: ServiceRouting, weights: Mapping[str, int], known_versions: Collection[str]
) -> ServiceRouting:
    """``routing`` with the default route's split replaced: what `composemesh route` does.

    Versions of ``known_versions`` not in ``weights`` get 0; the other routes keep theirs.
    Raises ConfigError (field ``route``) for an unknown version, a negative or non-integer
    weight, no weight at all, or weights that are all 0.
    """

    def bad(message: str) -> ConfigError:
        return ConfigError(message, service=routing.service, field="route")

    if not weights:
        raise bad("name at least one VERSION=WEIGHT")
    known = set(known_versions)
    for version, weight in weights.items():
        if version not in known:
            raise bad(
                f"{version!r} is not a version of {routing.service!r} "
                f"(its versions are {', '.join(sorted(known)) or 'none'})"
            )
        if not _is_int(weight) or weight < 0:
            raise bad(f"{weight!r} (for {version}) is not a non-negative integer weight")
    if not any(weights.values()):
        raise bad("every weight is 0, so no request would be routed")
    destinations = tuple(WeightedSubset(v, w) for v, w in weights.items()) + tuple(
        WeightedSubset(v, 0) for v in sorted(known - weights.keys())
    )
    routes = routing.routes
    if routes and not routes[-1].matches:
        routes = (*routes[:-1], replace(routes[-1], destinations=destinations))
    else:
        routes = (*routes, _default_route(destinations))
    return replace(routing, routes=routes)


def parse_weights_args(args: Sequence[str]) -> dict[str, int]:
    """``["v1=80", "v2=20"]`` -> ``{"v1": 80, "v2": 20}``; ConfigError (field ``route``)."""
    if not args:
        raise ConfigError("name at least one VERSION=WEIGHT", field="route")
    weights: dict[str, int] = {}
    for arg in args:
        version, eq, weight = arg.partition("=")
        version, weight = version.strip(), weight.strip()
        if not eq or not version:
            raise ConfigError(f"{arg!r} is not VERSION=WEIGHT (like v1=80)", field="route")
        if not _WEIGHT.match(weight):
            raise ConfigError(
                f"{weight!r} (for {version}) is not a non-negative integer weight", field="route"
            )
        if version in weights:
            raise ConfigError(f"version {version!r} is given twice", field="route")
        weights[version] = int(weight)
    return weights


def parse_duration(value: object, field: str) -> float:
    """``250ms``, ``2s``, ``1.5s``, ``1m``, ``1h`` or a number of seconds -> seconds (>= 0)."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value.strip())
        if m:
            seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(
            f"{value!r} is not a duration (like 250ms, 2s, 1.5s, 1m or a number of seconds)",
            field=field,
        )
    return seconds


# --------------------------------------------------------------------------- one service


def _service_routing(
    service: str, versions: Mapping[str, int | None], spec: object
) -> ServiceRouting:
    where = f"{ROUTES}.{service}"
    spec = _mapping({} if spec is None else spec, SERVICE_KEYS, where)

    cached: list[Destinations] = []

    def label_destinations() -> Destinations:
        if not cached:
            split = label_split(versions)
            if not any(split.values()):
                raise ConfigError(
                    f"every version of mesh service {service!r} has weight 0, "
                    "so no request would be routed",
                    service=service,
                    field=f"label {wk.LABEL_WEIGHT}",
                )
            cached.append(tuple(WeightedSubset(v, w) for v, w in split.items()))
        return cached[0]

    lb = spec.get("load_balancer", ROUND_ROBIN)
    if lb not in LOAD_BALANCERS:
        raise ConfigError(
            f"{lb!r} is not a load balancer (the load balancers are {', '.join(LOAD_BALANCERS)})",
            field=f"{where}.load_balancer",
        )
    connect_timeout = 5.0
    if spec.get("connect_timeout") is not None:
        connect_timeout = parse_duration(spec["connect_timeout"], f"{where}.connect_timeout")
        if connect_timeout <= 0:
            raise ConfigError("must be more than 0", field=f"{where}.connect_timeout")
    outlier = _outlier(spec.get("outlier_detection"), f"{where}.outlier_detection")
    defaults = _policies(spec, where, DEFAULT_RETRIES, DEFAULT_TIMEOUT_S)

    http = spec.get("http")
    if http is None:
        http = []
    if not isinstance(http, list):
        raise ConfigError("must be a list of routes", field=f"{where}.http")
    routes: list[HttpRoute] = []
    for i, item in enumerate(http):
        rw = f"{where}.http[{i}]"
        route = _route(item, i, len(http), rw, service, versions, label_destinations, defaults)
        if not route.matches and i < len(http) - 1:
            raise ConfigError(
                "has no match, so it takes every request and the routes after it would "
                "never be used; move it last",
                field=rw,
            )
        if any(r.name == route.name for r in routes):
            raise ConfigError(f"the route name {route.name!r} is used twice", field=f"{rw}.name")
        routes.append(route)
    if not routes or routes[-1].matches:
        if any(r.name == DEFAULT_ROUTE for r in routes):
            i = next(i for i, r in enumerate(routes) if r.name == DEFAULT_ROUTE)
            raise ConfigError(
                f"{DEFAULT_ROUTE!r} names the route added for the requests no route matches; "
                "give this one another name (or no match)",
                field=f"{where}.http[{i}].name",
            )
        routes.append(_default_route(label_destinations(), *defaults))
    return ServiceRouting(
        service=service,
        routes=tuple(routes),
        load_balancer=lb,  # one of LOAD_BALANCERS, checked above
        outlier=outlier,
        connect_timeout_s=connect_timeout,
    )


def _default_route(
    destinations: Destinations,
    retries: RetryPolicy = DEFAULT_RETRIES,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
) -> HttpRoute:
    return HttpRoute(
        name=DEFAULT_ROUTE,
        matches=(),
        destinations=destinations,
        retries=retries,
        timeout_s=timeout_s,
    )


def _policies(
    spec: Mapping[Any, Any], where: str, retries: RetryPolicy, timeout_s: float | None
) -> tuple[RetryPolicy, float | None]:
    """The ``retries`` and ``timeout`` of ``spec``, over the ones it would get otherwise."""
    if spec.get("retries") is not None:
        retries = _retries(spec["retries"], f"{where}.retries", retries)
    if spec.get("timeout") is not None:
        timeout_s = parse_duration(spec["timeout"], f"{where}.timeout") or None
    return retries, timeout_s


def _outlier(value: object, where: str) -> OutlierPolicy | None:
    if value is None or value is True:
        return OutlierPolicy()
    if value is False:
        return None
    spec = _mapping(value, OUTLIER_KEYS, where, "a mapping or false")
    default = OutlierPolicy()
    errors = spec.get("consecutive_errors", default.consecutive_errors)
    if not _is_int(errors) or errors < 1:
        raise ConfigError(
            f"{errors!r} is not a positive integer", field=f"{where}.consecutive_errors"
        )
    base = default.base_ejection_s
    if "base_ejection_time" in spec:
        base = parse_duration(spec["base_ejection_time"], f"{where}.base_ejection_time")
        if base <= 0:
            raise ConfigError("must be more than 0", field=f"{where}.base_ejection_time")
    percent = spec.get("max_ejection_percent", default.max_ejection_percent)
    if not _is_int(percent) or not 0 <= percent <= 100:
        raise ConfigError(
            f"{percent!r} is not an integer percentage between 0 and 100",
            field=f"{where}.max_ejection_percent",
        )
    return OutlierPolicy(
        consecutive_errors=errors, base_ejection_s=base, max_ejection_percent=percent
    )


# --------------------------------------------------------------------------- one route


def _route(
    item: object,
    index: int,
    count: int,
    where: str,
    service: str,
    versions: Mapping[str, int | None],
    label_destinations: Callable[[], Destinations],
    defaults: tuple[RetryPolicy, float | None],
) -> HttpRoute:
    spec = _mapping(item, ROUTE_KEYS, where)
    matches: tuple[HttpMatch, ...] = ()
    if spec.get("match") is not None:
        matches = _matches(spec["match"], f"{where}.match")
    name = spec.get("name")
    if name is None:
        name = DEFAULT_ROUTE if not matches and index == count - 1 else f"route-{index}"
    elif not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"{name!r} is not a route name (a non-empty string)", field=f"{where}.name"
        )
    if spec.get("route") is None:
        destinations = label_destinations()
    else:
        destinations = _destinations(spec["route"], f"{where}.route", service, versions)
    retries, timeout = _policies(spec, where, *defaults)
    fault = None if spec.get("fault") is None else _fault(spec["fault"], f"{where}.fault")
    return HttpRoute(
        name=name,
        matches=matches,
        destinations=destinations,
        retries=retries,
        timeout_s=timeout,
        fault=fault,
    )


def _destinations(
    value: object, where: str, service: str, versions: Mapping[str, int | None]
) -> Destinations:
    spec = _mapping(value, None, where, "a mapping of version to weight, like {v1: 80, v2: 20}")
    if not spec:
        raise ConfigError("must name at least one version with its weight", field=where)
    out = []
    for version, weight in spec.items():
        if version not in versions:
            raise ConfigError(
                f"{version!r} is not a version of mesh service {service!r} "
                f"(its versions are {', '.join(sorted(versions))})",
                field=f"{where}.{version}",
            )
        if not _is_int(weight) or weight < 0:
            raise ConfigError(
                f"{weight!r} is not a non-negative integer weight", field=f"{where}.{version}"
            )
        out.append(WeightedSubset(version, weight))
    if not any(d.weight for d in out):
        raise ConfigError("every weight is 0, so no request would be routed", field=where)
    return tuple(out)


def _matches(value: object, where: str) -> tuple[HttpMatch, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(
            "must be a non-empty list of conditions (leave match out for a route that "
            "takes every request)",
            field=where,
        )
    out = []
    for i, item in enumerate(value):
        mw = f"{where}[{i}]"
        spec = _mapping(item, MATCH_KEYS, mw)
        if not spec:
            raise ConfigError(f"must hold at least one of {', '.join(MATCH_KEYS)}", field=mw)
        headers: list[tuple[str, StringMatch]] = []
        if spec.get("headers") is not None:
            hspec = _mapping(spec["headers"], None, f"{mw}.headers", "a mapping of header to match")
            for name, match in hspec.items():
                hw = f"{mw}.headers.{name}"
                if not isinstance(name, str) or not _TOKEN.match(name):
                    raise ConfigError(
                        f"{name!r} is not a valid header name "
                        "(letters, digits and !#$%&'*+-.^_`|~)",
                        field=hw,
                    )
                headers.append((name.lower(), _string_match(match, hw)))
        path = None if spec.get("path") is None else _string_match(spec["path"], f"{mw}.path")
        method = spec.get("method")
        if method is not None:
            if not isinstance(method, str) or not _METHOD.match(method):
                raise ConfigError(
                    f"{method!r} is not an HTTP method (like GET)", field=f"{mw}.method"
                )
            method = method.upper()
        out.append(HttpMatch(path=path, headers=tuple(headers), method=method))
    return tuple(out)


def _string_match(value: object, where: str) -> StringMatch:
    if isinstance(value, str):
        return StringMatch("exact", value)
    spec = _mapping(
        value, STRING_MATCH_KEYS, where, "a string or a mapping with exact, prefix or regex"
    )
    if len(spec) != 1:
        raise ConfigError(f"must have exactly one of {', '.join(STRING_MATCH_KEYS)}", field=where)
    ((kind, text),) = spec.items()
    if _is_int(text):
        text = str(text)
    if not isinstance(text, str):
        raise ConfigError(f"{text!r} is not a string", field=f"{where}.{kind}")
    if kind == "regex":
        try:
            re.compile(text)
        except re.error as exc:
            raise ConfigError(
                f"{text!r} is not a valid regular expression: {exc}", field=f"{where}.regex"
            ) from None
    return StringMatch(kind, text)  # a key of STRING_MATCH_KEYS


def _retries(value: object, where: str, policy: RetryPolicy) -> RetryPolicy:
    spec = _mapping(value, RETRY_KEYS, where)
    if "attempts" in spec:
        attempts = spec["attempts"]
        if not _is_int(attempts) or attempts < 0:
            raise ConfigError(
                f"{attempts!r} is not a non-negative integer", field=f"{where}.attempts"
            )
        policy = replace(policy, attempts=attempts)
    if spec.get("per_try_timeout") is not None:
        per_try = parse_duration(spec["per_try_timeout"], f"{where}.per_try_timeout")
        policy = replace(policy, per_try_timeout_s=per_try or None)
    if "retry_on" in spec:
        policy = replace(policy, retry_on=_retry_on(spec["retry_on"], f"{where}.retry_on"))
    if "retry_non_idempotent" in spec:
        flag = spec["retry_non_idempotent"]
        if not isinstance(flag, bool):
            raise ConfigError(
                f"{flag!r} is not true or false", field=f"{where}.retry_non_idempotent"
            )
        policy = replace(policy, retry_non_idempotent=flag)
    return policy


def _retry_on(value: object, where: str) -> frozenset[str]:
    if isinstance(value, str):
        items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list):
        items = value
    else:
        raise ConfigError(f"must be a list of conditions ({', '.join(RETRY_ON)})", field=where)
    for item in items:
        if item not in RETRY_ON:
            raise ConfigError(
                f"{item!r} is not a retry condition (the conditions are {', '.join(RETRY_ON)})",
                field=where,
            )
    return frozenset(str(item) for item in items)


def _fault(value: object, where: str) -> FaultPolicy | None:
    spec = _mapping(value, FAULT_KEYS, where)
    delay = abort = None
    if spec.get("delay") is not None:
        dw = f"{where}.delay"
        dspec = _mapping(spec["delay"], DELAY_KEYS, dw)
        if "fixed" not in dspec:
            raise ConfigError("needs fixed: the delay, like 2s", field=dw)
        delay = FaultDelay(
            seconds=parse_duration(dspec["fixed"], f"{dw}.fixed"),
            percent=_percent(dspec.get("percent", 100), f"{dw}.percent"),
        )
    if spec.get("abort") is not None:
        aw = f"{where}.abort"
        aspec = _mapping(spec["abort"], ABORT_KEYS, aw)
        if "status" not in aspec:
            raise ConfigError("needs status: the HTTP status to answer, like 503", field=aw)
        status = aspec["status"]
        if not _is_int(status) or not 200 <= status <= 599:
            raise ConfigError(
                f"{status!r} is not an HTTP status between 200 and 599", field=f"{aw}.status"
            )
        abort = FaultAbort(
            status=status, percent=_percent(aspec.get("percent", 100), f"{aw}.percent")
        )
    if delay is None and abort is None:
        return None
    return FaultPolicy(delay=delay, abort=abort)


# --------------------------------------------------------------------------- helpers


def _mapping(
    value: object, keys: Sequence[str] | None, where: str, what: str | None = None
) -> Mapping[Any, Any]:
    """``value`` if it is a mapping whose keys are all in ``keys`` (None: any key)."""
    if not isinstance(value, Mapping):
        expected = what or (f"a mapping with keys {', '.join(keys)}" if keys else "a mapping")
        raise ConfigError(f"must be {expected}", field=where)
    if keys is not None:
        for key in value:
            if key not in keys:
                raise ConfigError(
                    f"unknown key {key!r}; the keys are {', '.join(keys)}", field=where
                )
    return value


def _percent(value: object, where: str) -> float:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= 100  # NaN fails this too
    ):
        raise ConfigError(f"{value!r} is not a percentage between 0 and 100", field=where)
    return float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _equal_shares(versions: Sequence[str], total: int) -> dict[str, int]:
    """``total`` split as equally as integers allow; the first versions get the remainder."""
    if not versions:
        return {}
    base, extra = divmod(total, len(versions))
    return {v: base + (1 if i < extra else 0) for i, v in enumerate(versions)}
