"""The PromQL behind the mesh's dashboards, as pure functions over metric names and variables.

Every query keeps to three rules, so that it answers on a fresh mesh with nothing but
successful HTTP traffic and some TCP traffic over mTLS:

- a dashboard variable is only ever used in a regex matcher (``=~"$service"``), so that its
  "All" value ``.*`` selects every series, those without the label too;
- counters go through ``rate(...[$__rate_interval])``;
- a ratio's numerator that could be empty (no mTLS, no success) falls back to the
  denominator times zero, so the ratio reads 0 rather than "no data".
"""

from __future__ import annotations

from collections.abc import Iterable

# Istio's standard metrics, as the mesh's proxies expose them.
REQUESTS = "istio_requests_total"
REQUEST_DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
TCP_SENT_BYTES = "istio_tcp_sent_bytes_total"
TCP_RECEIVED_BYTES = "istio_tcp_received_bytes_total"
TCP_OPENED = "istio_tcp_connections_opened_total"

# The pilot's metrics (control plane: discovery, config push, CA).
PILOT_PROXIES = "pilot_xds"
PILOT_PUSHES = "pilot_xds_pushes_total"
PILOT_CONVERGENCE_BUCKET = "pilot_proxy_convergence_time_bucket"
PILOT_ACKS = "pilot_xds_acks_total"
CERTIFICATES = "citadel_server_certificates_total"
PILOT_SERVICES = "pilot_services"
PILOT_WORKLOADS = "pilot_workloads"
DOCKER_EVENTS = "pilot_docker_events_total"

TRAFFIC_METRICS = frozenset({REQUESTS, REQUEST_DURATION_BUCKET, TCP_SENT_BYTES,
                             TCP_RECEIVED_BYTES, TCP_OPENED})
CONTROL_PLANE_METRICS = frozenset({PILOT_PROXIES, PILOT_PUSHES, PILOT_CONVERGENCE_BUCKET,
                                   PILOT_ACKS, CERTIFICATES, PILOT_SERVICES, PILOT_WORKLOADS,
                                   DOCKER_EVENTS})

RATE_INTERVAL = "$__rate_interval"

# The traffic dashboard's variables and the label each one filters.
TRAFFIC_FILTERS = (
    ("destination_service_namespace", "namespace"),
    ("destination_service_name", "service"),
    ("destination_version", "version"),
)
# The control-plane dashboard filters the pilot's scrape target by its project.
CONTROL_PLANE_FILTERS = (("namespace", "namespace"),)

# A service and version, as the destination proxy names itself.
BY_SERVICE_VERSION = ("destination_service_name", "destination_version")
BY_SERVICE = ("destination_service_name",)

QUANTILES = (0.5, 0.9, 0.99)


def selector(metric: str, filters: Iterable[tuple[str, str]], *fixed: str) -> str:
    """``metric{fixed..., label=~"$variable"...}``: the fixed matchers first, as given."""
    matchers = [*fixed, *(f'{label}=~"${variable}"' for label, variable in filters)]
    return f"{metric}{{{', '.join(matchers)}}}"


def inbound(metric: str, *fixed: str) -> str:
    """``metric`` as the destination proxy reports it (``reporter="destination"``), filtered by
    the traffic dashboard's namespace, service and version."""
    return selector(metric, TRAFFIC_FILTERS, 'reporter="destination"', *fixed)


def pilot(metric: str, *fixed: str) -> str:
    """``metric`` from the pilot, filtered by the control-plane dashboard's namespace."""
    return selector(metric, CONTROL_PLANE_FILTERS, *fixed)


def rate(series: str) -> str:
    """The per-second rate of a counter selector over ``$__rate_interval``."""
    return f"rate({series}[{RATE_INTERVAL}])"


def sum_by(by: Iterable[str], expr: str) -> str:
    """``sum by (labels) (expr)``; with no labels, a plain ``sum(expr)``."""
    labels = ", ".join(by)
    return f"sum by ({labels}) ({expr})" if labels else f"sum({expr})"


def quantile(q: float, bucket: str, by: Iterable[str] = ()) -> str:
    """The ``q`` quantile of a histogram's ``_bucket`` selector, per ``by``."""
    return f"histogram_quantile({q}, {sum_by((*by, 'le'), rate(bucket))})"


def share(part: str, whole: str, by: Iterable[str]) -> str:
    """The share (0..1) of the rate of ``part`` in the rate of ``whole``, per ``by``. Where
    ``part`` has no series yet the share is 0, not empty: it falls back to ``whole`` times 0."""
    by = tuple(by)
    total = sum_by(by, rate(whole))
    return f"({sum_by(by, rate(part))} or {total} * 0) / {total}"


# --- Traffic ---------------------------------------------------------------------------------

def request_rate(by: Iterable[str] = BY_SERVICE_VERSION) -> str:
    """Requests per second answered by each destination service and version."""
    return sum_by(by, rate(inbound(REQUESTS)))


def success_rate(by: Iterable[str] = BY_SERVICE_VERSION) -> str:
    """The share of requests answered with anything but a 5xx: 1 while all is well."""
    return share(inbound(REQUESTS, 'response_code!~"5.."'), inbound(REQUESTS), by)


def latency(q: float, by: Iterable[str] = BY_SERVICE_VERSION) -> str:
    """The ``q`` quantile of request duration (milliseconds) at the destination."""
    return quantile(q, inbound(REQUEST_DURATION_BUCKET), by)


def tcp_bytes(metric: str) -> str:
    """Bytes per second of one of the TCP byte counters, per destination service and version."""
    return sum_by(BY_SERVICE_VERSION, rate(inbound(metric)))


def tcp_opened() -> str:
    """TCP connections opened per second, per destination service and version."""
    return sum_by(BY_SERVICE_VERSION, rate(inbound(TCP_OPENED)))


def mtls_share(metric: str, by: Iterable[str] = BY_SERVICE) -> str:
    """The share of ``metric`` (requests or connections) that arrived over mutual TLS, as the
    destination proxy saw it (only it knows how its peer connected)."""
    return share(inbound(metric, 'connection_security_policy="mutual_tls"'), inbound(metric), by)


def top_callers(k: int = 5) -> str:
    """The ``k`` source workloads sending the most requests to each destination service."""
    calls = sum_by(("destination_service_name", "source_workload"), rate(inbound(REQUESTS)))
    return f"topk by (destination_service_name) ({k}, {calls})"


# --- Control plane ---------------------------------------------------------------------------

def connected_proxies() -> str:
    """Proxies holding an xDS stream to the pilot."""
    return sum_by((), pilot(PILOT_PROXIES))


def push_rate() -> str:
    """Config pushes per second, per push type."""
    return sum_by(("type",), rate(pilot(PILOT_PUSHES)))


def convergence(q: float) -> str:
    """The ``q`` quantile of the time (seconds) from a push to the proxy's ACK of it."""
    return quantile(q, pilot(PILOT_CONVERGENCE_BUCKET))


def acks() -> str:
    """ACKs and NACKs per second (both series exist from the start, at 0)."""
    return sum_by(("outcome",), rate(pilot(PILOT_ACKS)))


def certificates_issued() -> str:
    """Workload certificates signed per second, per outcome."""
    return sum_by(("outcome",), rate(pilot(CERTIFICATES)))


def gauge(metric: str) -> str:
    """The current value of one of the pilot's gauges."""
    return sum_by((), pilot(metric))


def docker_events() -> str:
    """Docker engine events the pilot read, per second."""
    return sum_by((), rate(pilot(DOCKER_EVENTS)))
