"""The limits a proxy holds hostile HTTP and idle connections to: labels in, environment out.

A compose service sets them with labels ``composemesh.proxy.<field>`` (``parse_limits``);
the injector hands them to the service's proxy in one environment variable,
``COMPOSEMESH_LIMITS`` (``limits_to_env`` / ``limits_from_env``, JSON of the fields that
differ from the defaults). The defaults are Envoy's (or what Envoy's edge best practices
recommend where Envoy has no default), so a proxy without labels behaves like an Istio
sidecar would.

Sizes are in KiB like Envoy's ``max_request_headers_kb``; durations are written ``500ms``,
``10s``, ``5m``, ``1h`` (or a number of seconds), and ``0`` turns a timeout off.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from composemesh.errors import ConfigError
from composemesh.model.policy import ESCAPED_SLASHES_ACTIONS, REJECT_REQUEST
from composemesh.model.routing_config import parse_duration

LABEL_PREFIX = "composemesh.proxy."
ENV_LIMITS = "COMPOSEMESH_LIMITS"
MAX_KB = 8192  # Envoy's upper bound for max_request_headers_kb


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """What one proxy lets a peer (or its own app) do before it answers an error or closes.

    Each field is also the label ``composemesh.proxy.<field>``; the status code and Envoy's
    name for the same setting are given per field.
    """

    # The request line and headers together (bytes before the blank line), counted as they
    # arrive: a longer head is answered 431 and never buffered. Envoy: max_request_headers_kb
    # (60 there); 64 KiB as HAProxy's and Go's defaults.
    max_request_headers_kb: int = 64
    # Header fields in one request (or response) head: more is 431 (502 for a response).
    # Envoy: common_http_protocol_options.max_headers_count.
    max_headers_count: int = 100
    # The request target (path and query, or absolute URL): longer is 414. Envoy has no limit
    # of its own beyond the head's; 16 KiB is above what browsers send (Chrome caps at 2 MB
    # but servers at 8-16 KiB: nginx 8 KiB, IIS 16 KiB), so no real client meets it.
    max_url_kb: int = 16
    # A response head from the upstream: longer is 502 to the client, the upstream connection
    # closed. Envoy: max_response_headers_kb.
    max_response_headers_kb: int = 64
    # Seconds a client has to send a whole request head once it began (the first request's
    # from the connection's accept): 408, then close. Envoy: request_headers_timeout (off by
    # default; 10 s in Envoy's edge best practices).
    request_headers_timeout: float = 10.0
    # Seconds a keep-alive HTTP connection may stay open with no request in flight: closed.
    # Envoy: common_http_protocol_options.idle_timeout.
    idle_timeout: float = 3600.0
    # Seconds a request in flight may go with no byte moving either way: 408 if the request
    # has not fully arrived, 504 if it has, a reset if the response began. Envoy:
    # stream_idle_timeout.
    stream_idle_timeout: float = 300.0
    # Seconds a TCP connection (a tunnel, an upgraded HTTP connection) may carry nothing:
    # closed. Envoy: tcp_proxy idle_timeout.
    tcp_idle_timeout: float = 3600.0
    # Concurrent connections into this proxy's inbound listener from one source address;
    # beyond it a connection is closed at once (counted as ``source_limit``); 0: no limit.
    # Envoy has no per-source default (its per-cluster circuit breaker allows 1024). 256: a
    # peer proxy reuses pooled keep-alive connections, so its connections to one instance
    # are its requests in flight there, and 256 is four times the idle connections a pool
    # keeps per endpoint (64); one source at the cap holds 512 of the proxy's descriptors and
    # 256 of the app's connections (threads, in a threaded server), so a neighbour cannot
    # starve the others. A service published to many clients (whose connections may all come
    # from the network's gateway address) raises it.
    max_connections_per_source: int = 256
    # Escaped slashes and backslashes in a request path that a path policy checks:
    # REJECT_REQUEST (400), KEEP_UNCHANGED or UNESCAPE_AND_FORWARD (see model.policy).
    # Envoy: path_with_escaped_slashes_action; Istio: meshConfig pathNormalization.
    path_with_escaped_slashes_action: str = REJECT_REQUEST

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _problem(f.name, getattr(self, f.name))
            if problem:
                raise ValueError(f"{f.name}: {problem}")

    # ---- what the data path reads (derived once)

    @property
    def max_request_head(self) -> int:
        return self.max_request_headers_kb * 1024

    @property
    def max_url(self) -> int:
        return self.max_url_kb * 1024

    @property
    def max_response_head(self) -> int:
        return self.max_response_headers_kb * 1024


FIELDS = tuple(f.name for f in fields(ProxyLimits))
_KB = frozenset({"max_request_headers_kb", "max_url_kb", "max_response_headers_kb"})
_COUNT = frozenset({"max_headers_count"})
_LIMIT = frozenset({"max_connections_per_source"})
_DURATION = frozenset({"request_headers_timeout", "idle_timeout", "stream_idle_timeout",
                       "tcp_idle_timeout"})
_ACTION = frozenset({"path_with_escaped_slashes_action"})


def _problem(name: str, value: Any) -> str | None:
    """Why ``value`` does not suit field ``name`` (a phrase), or None if it does."""
    if name in _KB:
        if not _is_int(value) or not 1 <= value <= MAX_KB:
            return f"{value!r} is not a size in KiB from 1 to {MAX_KB}"
    elif name in _COUNT:
        if not _is_int(value) or value < 1:
            return f"{value!r} is not a count of at least 1"
    elif name in _LIMIT:
        if not _is_int(value) or value < 0:
            return f"{value!r} is not a number of connections (0: no limit)"
    elif name in _DURATION:
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not math.isfinite(value) or value < 0):
            return f"{value!r} is not a duration in seconds (0: off)"
    elif name in _ACTION and value not in ESCAPED_SLASHES_ACTIONS:
        return f"{value!r} is not one of {', '.join(ESCAPED_SLASHES_ACTIONS)}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_DEFAULTS = ProxyLimits()


def parse_limits(labels: Mapping[str, str], where: str) -> ProxyLimits:
    """The ``composemesh.proxy.*`` labels of compose service ``where`` as ProxyLimits.

    Other labels are ignored; ConfigError naming the service and the label for an unknown
    field or a value that does not suit it.
    """
    values: dict[str, Any] = {}
    for label in sorted(labels):
        if not label.startswith(LABEL_PREFIX):
            continue
        name = label[len(LABEL_PREFIX):]
        raw = labels[label]

        def bad(message: str, label: str = label) -> ConfigError:
            return ConfigError(message, service=where, field=f"label {label}")

        if name not in FIELDS:
            raise bad(f"unknown proxy limit; the limits are {', '.join(FIELDS)}")
        text = str(raw).strip()
        value: Any
        if name in _DURATION:
            try:
                value = parse_duration(text, label)
            except ConfigError:
                raise bad(f"{raw!r} is not a duration (like 500ms, 10s, 5m, 1h; 0 turns it "
                          f"off)") from None
        elif name in _ACTION:
            value = text.upper()
            if value not in ESCAPED_SLASHES_ACTIONS:
                raise bad(f"{raw!r} is not one of {', '.join(ESCAPED_SLASHES_ACTIONS)}")
        else:
            value = int(text) if text.isdigit() else text
        problem = _problem(name, value)
        if problem:
            raise bad(problem)
        values[name] = value
    return ProxyLimits(**values) if values else _DEFAULTS


def limits_to_env(limits: ProxyLimits) -> dict[str, str]:
    """The proxy container's environment for ``limits``: nothing when they are the defaults,
    else ``COMPOSEMESH_LIMITS`` with the fields that differ, as JSON."""
    changed = {name: value for name, value in asdict(limits).items()
               if value != getattr(_DEFAULTS, name)}
    if not changed:
        return {}
    return {ENV_LIMITS: json.dumps(changed, sort_keys=True, separators=(",", ":"))}


def limits_from_env(environ: Mapping[str, str]) -> ProxyLimits:
    """The limits ``limits_to_env`` wrote (the defaults without it); ConfigError naming the
    variable and the field if it does not decode."""
    text = environ.get(ENV_LIMITS, "").strip()
    if not text:
        return _DEFAULTS
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"is not JSON ({exc})", field=ENV_LIMITS) from None
    if not isinstance(obj, dict):
        raise ConfigError("must be a JSON object of limits", field=ENV_LIMITS)
    for name, value in obj.items():
        if name not in FIELDS:
            raise ConfigError(f"unknown limit {name!r}; the limits are {', '.join(FIELDS)}",
                              field=ENV_LIMITS)
        if name in _DURATION and _is_int(value):
            obj[name] = float(value)
    try:
        return ProxyLimits(**obj)
    except ValueError as exc:
        raise ConfigError(str(exc), field=ENV_LIMITS) from None
