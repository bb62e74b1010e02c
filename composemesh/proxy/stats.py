"""The proxy's counters, kept as plain ints, and their Prometheus and JSON exposition."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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

# Why a connection failed, as counted per direction.
ERROR_KINDS = (
    "original_dst",  # the kernel had no original destination for a captured connection
    "loop",  # the connection reached a proxy port directly: not redirected, refused
    "no_route",  # the chooser had no destination for it
    "connect_timeout",
    "connect_failed",
    "reset",  # either side ended with an error
)


@dataclass(frozen=True, slots=True)
class Workload:
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
    source: Workload = Workload()
    destination: Workload = Workload()
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


class ProxyStats:
    """Every counter of one proxy: TCP counters per label set and errors per direction."""

    def __init__(self) -> None:
        self._tcp: dict[TcpLabels, TcpCounters] = {}
        self._errors: dict[str, dict[str, int]] = {
            direction: dict.fromkeys(ERROR_KINDS, 0) for direction in (OUTBOUND, INBOUND)
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
        lines: list[str] = []
        series = [(_label_text(labels.items()), c) for labels, c in self._tcp.items()]
        for name, help_text, attr in TCP_METRICS:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} counter")
            lines.extend(f"{name}{{{text}}} {getattr(c, attr)}" for text, c in series)
        lines.append(f"# HELP {ERRORS_METRIC} TCP connections that failed, by direction and kind.")
        lines.append(f"# TYPE {ERRORS_METRIC} counter")
        for direction, errors in self._errors.items():
            for kind, value in errors.items():
                text = _label_text((("direction", direction), ("kind", kind)))
                lines.append(f"{ERRORS_METRIC}{{{text}}} {value}")
        return "\n".join(lines) + "\n"


def workload_of(identity: ProxyIdentity) -> Workload:
    """How Istio's labels name the workload a proxy sits beside."""
    return Workload(
        workload=identity.compose_service or UNKNOWN,
        namespace=identity.project or UNKNOWN,
        app=identity.service or UNKNOWN,
        version=identity.version or UNKNOWN,
    )


def passthrough_labels(direction: str, me: Workload) -> TcpLabels:
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


def _label_text(items: Any) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in items)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
