"""The pilot's own metrics: what it pushed, what the proxies answered, what its CA signed.

Each ``Pilot`` holds one ``PilotMetrics`` with its own ``CollectorRegistry`` (never the
process-wide one), served on the monitoring port (``pilot.monitoring``). The names are fixed;
a dashboard reads them:

- ``pilot_xds``: proxies connected now (``connected_proxies``);
- ``pilot_xds_pushes_total{type="snapshot"}``: snapshots the pilot answered a proxy's poll with;
- ``pilot_proxy_convergence_time`` (histogram, seconds): from the push in which the pilot first
  rendered a snapshot version for a proxy to that proxy's ACK of it (``Convergence``);
- ``pilot_xds_acks_total{outcome="ack"|"nack"}``: the proxies' answers;
- ``citadel_server_certificates_total{outcome=...}``: certificate requests by outcome
  (``CERTIFICATE_OUTCOMES``);
- ``pilot_services``: mesh services known; ``pilot_workloads``: running workloads;
- ``pilot_docker_events_total``: container events the engine's stream delivered;
- ``pilot_info{version=...}``: 1.

Counters move where the thing happens (``pilot.server``, ``pilot.main``); the gauges are
computed from the pilot's current state when they are collected. The decisions behind them
(who is connected, how many services, when a version converged) are pure functions here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from composemesh import __version__
from composemesh.model.mesh import MeshState

T = TypeVar("T")

# A proxy is connected while a snapshot poll of it is open, and for this long after its last
# poll ended or its last ACK: between two polls a proxy applies and ACKs (milliseconds), or,
# after a failed poll, waits out its backoff (5 s at the most; proxy.pilot_client).
CONNECTED_GRACE_S = 10.0

CertificateOutcome = Literal["issued", "attestation_failed", "bad_csr", "error"]
CERTIFICATE_OUTCOMES: tuple[CertificateOutcome, ...] = (
    "issued",  # signed and answered
    "attestation_failed",  # the caller is no proxy of the project, or its identity has no name
    "bad_csr",  # the CA refused the CSR (too large, malformed, asks for other names)
    "error",  # the CA failed (an exception that is no refusal)
)
ACK_OUTCOMES = ("ack", "nack")
# Seconds from a push to a proxy's ACK: a push applied at once is milliseconds; one that waited
# for a proxy to come back can be minutes.
CONVERGENCE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def refusal_outcome(reason: str) -> CertificateOutcome:
    """The outcome of a CA's refusal (``IssuanceRefused.reason``) of an attested proxy's CSR:
    "error" where the CA itself could not sign (``CertificateAuthority.sign``'s "cannot
    sign: ..."), else "bad_csr" (the CSR's size, form, key, signature or names)."""
    return "error" if reason.startswith("cannot sign") else "bad_csr"


def connected_proxies(open_polls: Mapping[str, int], last_contact: Mapping[str, float],
                      now: float, grace_s: float = CONNECTED_GRACE_S) -> int:
    """How many proxies (by node) are connected at ``now`` (monotonic seconds): a poll of
    theirs is open, or their last contact (``last_contact``, when a poll ended or an ACK came)
    is at most ``grace_s`` old."""
    nodes = {node for node, count in open_polls.items() if count > 0}
    nodes.update(node for node, at in last_contact.items() if now - at <= grace_s)
    return len(nodes)


def mesh_services(state: MeshState) -> int:
    """The mesh services the pilot knows: the distinct services of its workloads."""
    return len({w.service for w in state.workloads})


def running_workloads(state: MeshState) -> int:
    """The workloads that are running (take traffic) now."""
    return sum(1 for w in state.workloads if w.running)


@dataclass
class Convergence:
    """Per proxy (by node): the snapshot version current for it, since when, and whether it
    was ACKed already (a repeated ACK is not observed twice)."""

    _current: dict[str, tuple[str, float, bool]] = field(default_factory=dict)

    def current(self, node: str, version: str, since: float) -> None:
        """``version`` is what ``node``'s proxy is sent now, current since ``since``; kept
        as it was if that version was current for it already."""
        found = self._current.get(node)
        if found is None or found[0] != version:
            self._current[node] = (version, since, False)

    def acked(self, node: str, version: str, now: float) -> float | None:
        """The seconds ``node``'s proxy took to ACK ``version``, if that is the version
        current for it and not ACKed before; else None."""
        found = self._current.get(node)
        if found is None or found[0] != version or found[2]:
            return None
        self._current[node] = (version, found[1], True)
        return max(now - found[1], 0.0)

    def forget(self, keep: set[str]) -> None:
        """Drop the proxies not in ``keep`` (workloads that are gone)."""
        for node in [n for n in self._current if n not in keep]:
            del self._current[node]


class PilotMetrics:
    """The pilot's metrics in their own registry; ``bind`` says where the gauges read from."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.xds = Gauge("pilot_xds", "Proxies connected to the pilot now: a snapshot poll "
                         f"open, or a poll or ACK within {CONNECTED_GRACE_S:g}s.", registry=r)
        self.pushes = Counter("pilot_xds_pushes", "Snapshots delivered to proxies.",
                              ["type"], registry=r)
        self.convergence = Histogram(
            "pilot_proxy_convergence_time",
            "Seconds from a snapshot version becoming current for a proxy to its ACK of it.",
            buckets=CONVERGENCE_BUCKETS, registry=r)
        self.acks = Counter("pilot_xds_acks", "Proxies' answers to snapshots.", ["outcome"],
                            registry=r)
        self.certificates = Counter("citadel_server_certificates",
                                    "Workload certificate requests, by outcome.", ["outcome"],
                                    registry=r)
        self.services = Gauge("pilot_services", "Mesh services known to the pilot.", registry=r)
        self.workloads = Gauge("pilot_workloads", "Running workloads.", registry=r)
        self.docker_events = Counter("pilot_docker_events",
                                     "Container events received from the Docker engine.",
                                     registry=r)
        info = Gauge("pilot_info", "The pilot's version.", ["version"], registry=r)
        info.labels(version=__version__).set(1)
        self.pushes.labels(type="snapshot")
        for outcome in ACK_OUTCOMES:
            self.acks.labels(outcome=outcome)
        for cert_outcome in CERTIFICATE_OUTCOMES:
            self.certificates.labels(outcome=cert_outcome)

    def bind(self, state: Callable[[], MeshState], connected: Callable[[], int]) -> None:
        """Compute the gauges, when collected, from ``state()`` and ``connected()``."""
        self.services.set_function(lambda: mesh_services(state()))
        self.workloads.set_function(lambda: running_workloads(state()))
        self.xds.set_function(connected)

    def pushed(self) -> None:
        self.pushes.labels(type="snapshot").inc()

    def answered(self, ok: bool, converged_s: float | None) -> None:
        """A proxy's ACK (``ok``) or NACK; ``converged_s``: its convergence time, if any."""
        self.acks.labels(outcome="ack" if ok else "nack").inc()
        if converged_s is not None:
            self.convergence.observe(converged_s)

    def certificate(self, outcome: CertificateOutcome) -> None:
        self.certificates.labels(outcome=outcome).inc()


async def counted(items: AsyncIterator[T], count: Callable[[], None]) -> AsyncIterator[T]:
    """``items`` as they come, calling ``count()`` for each (the engine's event stream)."""
    async for item in items:
        count()
        yield item
