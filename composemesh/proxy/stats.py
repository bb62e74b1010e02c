"""The proxy's counters, kept as plain ints, and their Prometheus and JSON exposition.

The data path adds to plain ints found by one dict lookup; nothing on it knows Prometheus.
At scrape time `ProxyCollector` reads those ints into prometheus_client's metric families, and
`render` writes them in the format the scraper asked for (OpenMetrics or text 0.0.4).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from composemesh.model.snapshot import ProxyIdentity

UNKNOWN = "unknown"
PASSTHROUGH = "PassthroughCluster"  # Istio's destination_service_name for unknown destinations
OUTBOUND = "outbound"
INBOUND = "inbound"
REPORTER = {OUTBOUND: "source", INBOUND: "destination"}  # Istio's reporter per direction
DIRECTION = {reporter: direction for direction, reporter in REPORTER.items()}

# Istio's TCP metrics: name -> (help, TcpCounters field).
TCP_METRICS = (
    ("istio_tcp_connections_opened_total", "Connections opened.", "opened"),
    ("istio_tcp_connections_closed_total", "Connections closed.", "closed"),
    ("istio_tcp_sent_bytes_total",
     "Bytes sent back to the connecting side (response direction).", "sent"),
    ("istio_tcp_received_bytes_total",
     "Bytes received from the connecting side (request direction).", "received"),
)
ERRORS_METRIC = "composemesh_proxy_tcp_errors_total"
ERRORS_HELP = "TCP connections that failed, by direction and kind."

# Istio's HTTP metrics (Envoy's default buckets for durations, Istio's for sizes).
REQUESTS_METRIC = "istio_requests_total"
DURATION_METRIC = "istio_request_duration_milliseconds"
REQUEST_BYTES_METRIC = "istio_request_bytes"
RESPONSE_BYTES_METRIC = "istio_response_bytes"
DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                    60000, 300000, 600000, 1800000, 3600000)
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)
REQUESTS_HELP = "Requests answered, by source and destination."
# name -> (help, HttpSeries field)
HTTP_HISTOGRAMS = (
    (DURATION_METRIC, "Request durations, to the last byte of the response.", "duration"),
    (REQUEST_BYTES_METRIC, "Request sizes, head and body.", "request_bytes"),
    (RESPONSE_BYTES_METRIC, "Response sizes, head and body.", "response_bytes"),
)

# Envoy's response flags, as the HTTP path sets them.
NO_FLAGS = "-"
NO_HEALTHY_UPSTREAM = "UH"
UPSTREAM_TIMEOUT = "UT"
CONNECT_FAILURE = "UF"
UPSTREAM_RESET = "UC"  # the upstream connection ended before the response did
FAULT_ABORT = "FI"
FAULT_DELAY = "DI"
NO_ROUTE = "NR"
RETRIES_EXHAUSTED = "URX"
DOWNSTREAM_CLOSED = "DC"  # the client left before its response was complete
BAD_REQUEST = "DPE"  # the client's request did not parse, or broke a limit (431, 414)
UPSTREAM_PROTOCOL_ERROR = "UPE"  # the upstream's response did not parse, or its head was too large
STREAM_IDLE_TIMEOUT = "SI"  # nothing moved on a request for the stream idle timeout
RBAC_DENIED = "RBAC"  # an authorization policy denied the request (inbound)
MUTUAL_TLS = "mutual_tls"  # Istio's connection_security_policy for an mTLS peer
NO_SECURITY = "none"

# Why a connection failed, as counted per direction.
ERROR_KINDS = (
    "original_dst",  # the kernel had no original destination for a captured connection
    "loop",  # the connection reached a proxy port directly: not redirected, refused
    "no_route",  # the chooser had no destination for it
    "connect_timeout",
    "connect_failed",
    "reset",  # either side ended with an error
    "tls_handshake",  # a TLS handshake failed (an unknown root, no client certificate, ...)
    "tls_peer",  # the peer's certificate named another identity than the one expected
    "plaintext_refused",  # plaintext into a STRICT service, from inside the mesh's networks
    "rbac_denied",  # an authorization policy denied a TCP connection
    "source_limit",  # one source address had max_connections_per_source open already
    "idle_timeout",  # an HTTP connection closed by the idle (or first request's header) timeout
    "tcp_idle_timeout",  # a TCP connection that carried nothing for tcp_idle_timeout, closed
)


@dataclass(frozen=True, slots=True)
class PeerLabels:
    """One end of a connection as Istio's labels name it; "unknown" where we do not know."""

    workload: str = UNKNOWN  # the compose service (one per version), like a Deployment
    namespace: str = UNKNOWN  # the compose project
    principal: str = UNKNOWN  # the SPIFFE id, once mTLS knows it
    app: str = UNKNOWN  # the mesh service
    version: str = UNKNOWN  # the subset
    cluster: str = UNKNOWN


@dataclass(frozen=True, slots=True)
class TcpLabels:
    """The label set of Istio's TCP metrics for one kind of connection."""

    reporter: str
    source: PeerLabels = PeerLabels()
    destination: PeerLabels = PeerLabels()
    destination_service: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = "none"

    @property
    def direction(self) -> str:
        return DIRECTION[self.reporter]

    def items(self) -> Iterator[tuple[str, str]]:
        """(label, value) pairs in Istio's names, in a fixed order."""
        yield "reporter", self.reporter
        for prefix, end in (("source", self.source), ("destination", self.destination)):
            yield f"{prefix}_workload", end.workload
            yield f"{prefix}_workload_namespace", end.namespace
            yield f"{prefix}_principal", end.principal
            yield f"{prefix}_app", end.app
            yield f"{prefix}_version", end.version
            yield f"{prefix}_canonical_service", end.app
            yield f"{prefix}_canonical_revision", end.version
            yield f"{prefix}_cluster", end.cluster
        yield "destination_service", self.destination_service
        yield "destination_service_name", self.destination_service_name
        yield "destination_service_namespace", self.destination_service_namespace
        yield "request_protocol", self.request_protocol
        yield "response_flags", self.response_flags
        yield "connection_security_policy", self.connection_security_policy


class TcpCounters:
    """The counters of one label set; the data path adds to them directly."""

    __slots__ = ("opened", "closed", "sent", "received")

    def __init__(self) -> None:
        self.opened = 0
        self.closed = 0
        self.sent = 0  # back to the connecting side
        self.received = 0  # from the connecting side


def _le(bounds: tuple[float, ...]) -> tuple[str, ...]:
    """The ``le`` label of each bucket as Envoy prints it (``0.5``, ``1``, ``3.6e+06``), then
    ``+Inf``."""
    return (*(f"{bound:g}" for bound in bounds), "+Inf")


_LE = {DURATION_BUCKETS: _le(DURATION_BUCKETS), BYTES_BUCKETS: _le(BYTES_BUCKETS)}


class Histogram:
    """One Prometheus histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """(le, cumulative count) per bucket, ``+Inf`` last (its count is the series' count),
        as prometheus_client's HistogramMetricFamily takes them."""
        out = []
        total = 0
        les = _LE.get(self.bounds) or _le(self.bounds)
        for le, n in zip(les, self.counts[:], strict=True):  # a copy: the counts of one moment
            total += n
            out.append((le, total))
        return out


# (source, destination service, destination version, destination workload, code, flags,
#  destination principal)
HttpKey = tuple[PeerLabels, str, str, str, int, str, str]
# (source, destination (this proxy's workload), code, flags, connection security policy)
InboundKey = tuple[PeerLabels, PeerLabels, int, str, str]


class HttpSeries:
    """The three histograms of one HTTP label set; their count is istio_requests_total."""

    __slots__ = ("duration", "request_bytes", "response_bytes")

    def __init__(self) -> None:
        self.duration = Histogram(DURATION_BUCKETS)
        self.request_bytes = Histogram(BYTES_BUCKETS)
        self.response_bytes = Histogram(BYTES_BUCKETS)

    def observe(self, duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        self.duration.observe(duration_ms)
        self.request_bytes.observe(request_bytes)
        self.response_bytes.observe(response_bytes)


class ProxyStats:
    """Every counter of one proxy: TCP counters per label set, HTTP series, errors."""

    def __init__(self) -> None:
        self._tcp: dict[TcpLabels, TcpCounters] = {}
        self._errors: dict[str, dict[str, int]] = {
            direction: dict.fromkeys(ERROR_KINDS, 0) for direction in (OUTBOUND, INBOUND)
        }
        self._http: dict[HttpKey, HttpSeries] = {}
        self._http_in: dict[InboundKey, HttpSeries] = {}
        self._by_endpoint: dict[tuple[str, str], int] = {}  # (service, node) -> requests
        self.retries = 0  # tries after the first, over all requests
        self.ejections = 0  # endpoints ejected by outlier detection
        # What /stats/prometheus exposes: this proxy's own registry, never the global one.
        self.registry = CollectorRegistry()
        self.registry.register(ProxyCollector(self))

    def http_request(self, source: PeerLabels, service: str, version: str, workload: str,
                     node: str | None, code: int, flags: str, duration_ms: float,
                     request_bytes: int, response_bytes: int, *,
                     principal: str = UNKNOWN) -> None:
        """Count one HTTP request answered to the app (reporter "source"); ``principal`` is
        the SPIFFE id the destination proved over mTLS (or was expected to prove)."""
        key = (source, service, version, workload, code, flags, principal)
        series = self._http.get(key)
        if series is None:
            series = self._http[key] = HttpSeries()
        series.observe(duration_ms, request_bytes, response_bytes)
        if node is not None:
            by_endpoint = self._by_endpoint
            pair = (service, node)
            by_endpoint[pair] = by_endpoint.get(pair, 0) + 1

    def http_inbound_request(self, source: PeerLabels, me: PeerLabels, code: int, flags: str,
                             security: str, duration_ms: float, request_bytes: int,
                             response_bytes: int) -> None:
        """Count one HTTP request this proxy answered for its app (reporter "destination")."""
        key = (source, me, code, flags, security)
        series = self._http_in.get(key)
        if series is None:
            series = self._http_in[key] = HttpSeries()
        series.observe(duration_ms, request_bytes, response_bytes)

    def http_inbound_totals(self) -> dict[str, Any]:
        """Inbound requests by source service, by status code, and by connection security."""
        by_source: dict[str, int] = {}
        by_code: dict[str, int] = {}
        by_security: dict[str, int] = {}
        requests = 0
        for (source, _, code, _, security), series in self._http_in.items():
            n = series.duration.count
            requests += n
            by_source[source.app] = by_source.get(source.app, 0) + n
            by_code[str(code)] = by_code.get(str(code), 0) + n
            by_security[security] = by_security.get(security, 0) + n
        return {"requests": requests, "requests_by_source": by_source,
                "responses_by_code": by_code, "requests_by_security": by_security}

    def http_totals(self) -> dict[str, Any]:
        """Requests by service and version (of the endpoint that answered) and by endpoint,
        responses by status code and by response flags, retries and ejections."""
        by_version: dict[str, dict[str, int]] = {}
        by_code: dict[str, int] = {}
        by_flags: dict[str, int] = {}
        requests = 0
        for (_, service, version, _, code, flags, _), series in self._http.items():
            n = series.duration.count
            requests += n
            if version != UNKNOWN:
                versions = by_version.setdefault(service, {})
                versions[version] = versions.get(version, 0) + n
            by_code[str(code)] = by_code.get(str(code), 0) + n
            by_flags[flags] = by_flags.get(flags, 0) + n
        by_endpoint: dict[str, dict[str, int]] = {}
        for (service, node), n in self._by_endpoint.items():
            by_endpoint.setdefault(service, {})[node] = n
        return {
            "requests": requests,
            "requests_by_version": by_version,
            "requests_by_endpoint": by_endpoint,
            "responses_by_code": by_code,
            "responses_by_flags": by_flags,
            "retries": self.retries,
            "ejections": self.ejections,
        }

    def tcp(self, labels: TcpLabels) -> TcpCounters:
        """The counters for ``labels`` (one dict lookup; created on first use)."""
        counters = self._tcp.get(labels)
        if counters is None:
            counters = self._tcp[labels] = TcpCounters()
        return counters

    def error(self, direction: str, kind: str) -> None:
        self._errors[direction][kind] += 1

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per direction: connections opened, closed, active, bytes each way, errors."""
        out: dict[str, dict[str, Any]] = {}
        for direction in (OUTBOUND, INBOUND):
            opened = closed = sent = received = 0
            for labels, counters in self._tcp.items():
                if labels.direction == direction:
                    opened += counters.opened
                    closed += counters.closed
                    sent += counters.sent
                    received += counters.received
            errors = dict(self._errors[direction])
            out[direction] = {
                "connections_opened": opened,
                "connections_closed": closed,
                "connections_active": opened - closed,
                "bytes_received": received,
                "bytes_sent": sent,
                "errors": sum(errors.values()),
                "errors_by_kind": errors,
            }
        return out

    def prometheus_text(self) -> str:
        """Every counter in the Prometheus text exposition format (version 0.0.4)."""
        return render(self)[0].decode()


class ProxyCollector(Collector):
    """prometheus_client's view of one proxy's counters: at each scrape, the families of
    Istio's metrics built from the plain ints; it only reads them."""

    def __init__(self, stats: ProxyStats) -> None:
        self.stats = stats

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what the registry checks for duplicate names."""
        yield from _tcp_families()
        yield CounterMetricFamily(REQUESTS_METRIC, REQUESTS_HELP, labels=HTTP_LABEL_NAMES)
        yield from _histogram_families()
        yield CounterMetricFamily(ERRORS_METRIC, ERRORS_HELP, labels=("direction", "kind"))

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        # Copies of the dicts first: a scrape in another thread sees series added meanwhile
        # at the next scrape, never a dict changing size under it.
        tcp = [(_values(labels.items()), c) for labels, c in list(stats._tcp.items())]
        families = _tcp_families()
        for family, (_, _, attr) in zip(families, TCP_METRICS, strict=True):
            for values, counters in tcp:
                family.add_metric(values, getattr(counters, attr))
        yield from families

        http = [(_values(http_label_items(key)), s) for key, s in list(stats._http.items())]
        http += [(_values(inbound_label_items(key)), s)
                 for key, s in list(stats._http_in.items())]
        series = [(values, s.duration.buckets(), s) for values, s in http]
        requests = CounterMetricFamily(REQUESTS_METRIC, REQUESTS_HELP, labels=HTTP_LABEL_NAMES)
        for values, durations, _ in series:
            requests.add_metric(values, durations[-1][1])  # the +Inf bucket: every request
        yield requests
        for histograms, (_, _, attr) in zip(_histogram_families(), HTTP_HISTOGRAMS, strict=True):
            for values, durations, s in series:
                histogram = getattr(s, attr)
                buckets = durations if attr == "duration" else histogram.buckets()
                histograms.add_metric(values, buckets, histogram.sum)
            yield histograms

        errors = CounterMetricFamily(ERRORS_METRIC, ERRORS_HELP, labels=("direction", "kind"))
        for direction, kinds in stats._errors.items():
            for kind, value in list(kinds.items()):
                errors.add_metric((direction, kind), value)
        yield errors


def render(source: ProxyStats | CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    """The exposition of ``source`` (a proxy's counters, or any registry) in the format the
    ``Accept`` header asks for: (body, Content-Type). OpenMetrics 1.0 when the scraper
    accepts ``application/openmetrics-text`` (as Prometheus does), else text 0.0.4."""
    registry = source.registry if isinstance(source, ProxyStats) else source
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


def _tcp_families() -> list[CounterMetricFamily]:
    return [CounterMetricFamily(name, help_text, labels=TCP_LABEL_NAMES)
            for name, help_text, _ in TCP_METRICS]


def _histogram_families() -> list[HistogramMetricFamily]:
    return [HistogramMetricFamily(name, help_text, labels=HTTP_LABEL_NAMES)
            for name, help_text, _ in HTTP_HISTOGRAMS]


def _values(items: Iterator[tuple[str, str]]) -> tuple[str, ...]:
    return tuple(value for _, value in items)


def http_label_items(key: HttpKey) -> Iterator[tuple[str, str]]:
    """The labels of Istio's HTTP metrics for one series, in a fixed order."""
    source, service, version, workload, code, flags, principal = key
    labels = TcpLabels(
        reporter=REPORTER[OUTBOUND],
        source=source,
        destination=PeerLabels(workload=workload, namespace=source.namespace,
                               principal=principal, app=service, version=version),
        destination_service=service,
        destination_service_name=service,
        destination_service_namespace=source.namespace,
        request_protocol="http",
        response_flags=flags,
    )
    for name, value in labels.items():
        yield name, value
        if name == "request_protocol":
            yield "response_code", str(code)


def inbound_label_items(key: InboundKey) -> Iterator[tuple[str, str]]:
    """The labels of Istio's HTTP metrics for one inbound series (reporter "destination")."""
    source, me, code, flags, security = key
    labels = TcpLabels(
        reporter=REPORTER[INBOUND],
        source=source,
        destination=me,
        destination_service=me.app,
        destination_service_name=me.app,
        destination_service_namespace=me.namespace,
        request_protocol="http",
        response_flags=flags,
        connection_security_policy=security,
    )
    for name, value in labels.items():
        yield name, value
        if name == "request_protocol":
            yield "response_code", str(code)


def workload_of(identity: ProxyIdentity) -> PeerLabels:
    """How Istio's labels name the workload a proxy sits beside."""
    return PeerLabels(
        workload=identity.compose_service or UNKNOWN,
        namespace=identity.project or UNKNOWN,
        app=identity.service or UNKNOWN,
        version=identity.version or UNKNOWN,
    )


def passthrough_labels(direction: str, me: PeerLabels) -> TcpLabels:
    """Labels for plain TCP passed through to its original destination.

    Outbound (reporter "source"): we are the source; the destination is not known to the mesh.
    Inbound (reporter "destination"): we are the destination; the source is unknown without mTLS.
    """
    if direction == OUTBOUND:
        return TcpLabels(reporter=REPORTER[OUTBOUND], source=me,
                         destination_service_name=PASSTHROUGH)
    return TcpLabels(
        reporter=REPORTER[INBOUND],
        destination=me,
        destination_service=me.app,
        destination_service_name=me.app,
        destination_service_namespace=me.namespace,
    )


def label_names() -> tuple[str, ...]:
    """The label names of Istio's TCP metrics, in exposition order."""
    return tuple(name for name, _ in TcpLabels(reporter="source").items())


TCP_LABEL_NAMES = label_names()
# The HTTP metrics' labels: the TCP ones and response_code (after request_protocol).
HTTP_LABEL_NAMES = tuple(name for name, _ in http_label_items(
    (PeerLabels(), UNKNOWN, UNKNOWN, UNKNOWN, 0, NO_FLAGS, UNKNOWN)))
