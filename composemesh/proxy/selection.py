"""What the routers and the HTTP path select, pure: which route matches a request, which
version by weight, which endpoint (round robin or least request, ejected ones left out), a
fault or not, and whether plaintext may come in. Retries: ``proxy.retries``.

No I/O and no clock of their own (the outlier detector is handed one): the HTTP data path
calls these on every request, so they compile nothing per call and allocate little.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import re
import time
from collections.abc import Callable, Collection, Container, Mapping, Sequence
from dataclasses import dataclass

from composemesh.model.routing import (
    LEAST_REQUEST,
    LOAD_BALANCERS,
    FaultPolicy,
    HttpMatch,
    HttpRoute,
    OutlierPolicy,
    ServiceRouting,
    StringMatch,
)

MAX_EJECTION_S = 300.0  # an ejection lasts at most this long (or base_ejection_s, if longer)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream instance, as the snapshot lists it."""

    node: str
    version: str
    address: str  # IP
    # An instance on another host or outside the mesh (imported from Consul): dialed at
    # ``address:port`` (its east-west gateway, or itself) rather than at the app's port.
    port: int = 0  # 0: the port the app called
    remote: bool = False  # used only while no local endpoint of its version is available
    peer: str = ""  # the SPIFFE ID it must prove; "": the project's own ID of its service
    sni: str = ""  # its east-west SNI without the port (``model.east_west.sni_tail``)
    plaintext: bool = False  # not in any mesh: plain TCP


def pick_endpoint(picker: EndpointPicker, endpoints: Sequence[Endpoint],
                  available: Sequence[Endpoint], tried: Collection[Endpoint] = (),
                  local: Sequence[Endpoint] | None = None) -> Endpoint | None:
    """The endpoint a try goes to: one of ``available`` (``endpoints`` without the ejected)
    not ``tried`` yet, or, every one tried, any of them.

    ``local``: when some of ``endpoints`` are remote (on other hosts), their local ones, as the
    table keeps them. Then locality decides first, as Envoy's priorities do: the local ones
    that are available, and the remote ones only when none of those is left to try (a retry
    after every local one failed fails over too)."""
    if local is None:
        endpoint = picker.pick(available, tried)
        if endpoint is None and tried:
            endpoint = picker.pick(available)
        return endpoint
    if available is not endpoints:  # some are ejected: the local ones still available
        local = [ep for ep in available if not ep.remote]
    first = local or available
    endpoint = picker.pick(first, tried)
    if endpoint is None and first is not available:
        endpoint = picker.pick(available, tried)
    if endpoint is None and tried:
        endpoint = picker.pick(first)
    return endpoint


# --------------------------------------------------------------------------- routes


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _string_matches(m: StringMatch, value: str) -> bool:
    kind = m.kind
    if kind == "exact":
        return value == m.value
    if kind == "prefix":
        return value.startswith(m.value)
    return _compiled(m.value).fullmatch(value) is not None


def _http_matches(m: HttpMatch, method: str, path: str, headers: Mapping[str, str]) -> bool:
    if m.method is not None and m.method != method:
        return False
    if m.path is not None and not _string_matches(m.path, path):
        return False
    for name, sm in m.headers:
        value = headers.get(name)
        if value is None or not _string_matches(sm, value):
            return False
    return True


def select_route(
    routing: ServiceRouting, method: str, path: str, headers: Mapping[str, str]
) -> HttpRoute | None:
    """The first route of ``routing`` that the request matches; None if none does.

    ``headers`` has lower-case names; ``path`` may carry a query string, which is ignored.
    A regex must match the whole path (or header value).
    """
    q = path.find("?")
    if q >= 0:
        path = path[:q]
    for route in routing.routes:
        if not route.matches:
            return route
        for m in route.matches:
            if _http_matches(m, method, path, headers):
                return route
    return None


def pick_version(
    route: HttpRoute, rng: random.Random, serving: Container[str] | None = None
) -> str | None:
    """A version of ``route``'s destinations, drawn by weight; None if every weight is 0.

    With ``serving`` (the versions that have endpoints), a version with none is skipped and
    its share goes to the others in proportion: a stopped version fails no request.
    """
    total = 0
    for d in route.destinations:
        if serving is None or d.version in serving:
            total += d.weight
    if total <= 0:
        return None
    x = rng.randrange(total)
    for d in route.destinations:
        if serving is None or d.version in serving:
            x -= d.weight
            if x < 0:
                return d.version
    return None  # unreachable: the weights add up to total


# --------------------------------------------------------------------------- endpoints


class EndpointPicker:
    """Picks an endpoint of one upstream service: round robin or least request.

    least_request takes the endpoint with the fewest requests in flight (counted through
    ``started``/``finished``), ties broken at random.
    """

    def __init__(self, load_balancer: str, rng: random.Random | None = None) -> None:
        if load_balancer not in LOAD_BALANCERS:
            raise ValueError(f"unknown load balancer {load_balancer!r}")
        self._least_request = load_balancer == LEAST_REQUEST
        self._rng = rng or random.Random()
        self._next = 0
        self._in_flight: dict[Endpoint, int] = {}

    def pick(
        self, endpoints: Sequence[Endpoint], exclude: Collection[Endpoint] = ()
    ) -> Endpoint | None:
        """An endpoint of ``endpoints`` not in ``exclude``; None if there is none."""
        if self._least_request:
            return self._least(endpoints, exclude)
        n = len(endpoints)
        start = self._next
        for i in range(n):
            ep = endpoints[(start + i) % n]
            if not exclude or ep not in exclude:
                self._next = start + i + 1
                return ep
        return None

    def _least(
        self, endpoints: Sequence[Endpoint], exclude: Collection[Endpoint]
    ) -> Endpoint | None:
        in_flight = self._in_flight
        best: Endpoint | None = None
        best_n = 0
        ties = 0
        for ep in endpoints:
            if exclude and ep in exclude:
                continue
            n = in_flight.get(ep, 0)
            if best is None or n < best_n:
                best, best_n, ties = ep, n, 1
            elif n == best_n:
                ties += 1  # reservoir sampling: each of the tied is kept with chance 1/ties
                if self._rng.randrange(ties) == 0:
                    best = ep
        return best

    def started(self, ep: Endpoint) -> None:
        """A request to ``ep`` is in flight."""
        self._in_flight[ep] = self._in_flight.get(ep, 0) + 1

    def finished(self, ep: Endpoint) -> None:
        """A request to ``ep`` is over (answered, failed or abandoned)."""
        n = self._in_flight.get(ep, 0) - 1
        if n > 0:
            self._in_flight[ep] = n
        else:
            self._in_flight.pop(ep, None)

    def in_flight(self, ep: Endpoint) -> int:
        return self._in_flight.get(ep, 0)


class _HostState:
    __slots__ = ("failures", "times_ejected", "ejected_at", "ejected_until")

    def __init__(self) -> None:
        self.failures = 0  # consecutive
        self.times_ejected = 0
        self.ejected_at = 0.0
        self.ejected_until = 0.0


class OutlierDetector:
    """Envoy's consecutive-errors outlier ejection, per endpoint.

    After ``consecutive_errors`` failures in a row an endpoint is ejected for
    ``base_ejection_s`` times the number of times it has been ejected (at most
    max(MAX_EJECTION_S, base_ejection_s)); that multiplier drops by one for every
    ``base_ejection_s`` the endpoint then serves without being ejected again. ``available``
    never leaves out more than ``max_ejection_percent`` of the endpoints, and never all.
    """

    def __init__(
        self, policy: OutlierPolicy | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._hosts: dict[Endpoint, _HostState] = {}
        self._ejected_until = 0.0  # no endpoint is ejected after this moment

    def record(self, ep: Endpoint, ok: bool) -> None:
        """How a request to ``ep`` ended: ok=False for a 5xx, connect-failure, reset or timeout."""
        policy = self.policy
        if policy is None:
            return
        host = self._hosts.get(ep)
        if ok:
            if host is not None:
                host.failures = 0
            return
        if host is None:
            host = self._hosts[ep] = _HostState()
        now = self._clock()
        if host.ejected_until > now:
            return  # a late answer from before the ejection: it changes nothing
        host.failures += 1
        if host.failures < policy.consecutive_errors:
            return
        base = policy.base_ejection_s
        if host.times_ejected and base > 0:
            served = now - host.ejected_until
            host.times_ejected = max(0, host.times_ejected - int(served // base))
        host.times_ejected += 1
        host.failures = 0
        host.ejected_at = now
        host.ejected_until = now + min(base * host.times_ejected, max(MAX_EJECTION_S, base))
        self._ejected_until = max(self._ejected_until, host.ejected_until)

    def is_ejected(self, ep: Endpoint) -> bool:
        """Whether ``ep`` is serving an ejection now (before the max_ejection_percent cap)."""
        host = self._hosts.get(ep)
        return host is not None and host.ejected_until > self._clock()

    def available(self, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """``endpoints`` without the ejected ones, within the max_ejection_percent cap.

        Over the cap, the endpoints ejected first stay out and the others are let back in.
        """
        now = self._clock()
        if self.policy is None or now >= self._ejected_until:
            return endpoints  # nothing is ejected: no copy on the per-request path
        ejected = []
        for ep in endpoints:
            host = self._hosts.get(ep)
            if host is not None and host.ejected_until > now:
                ejected.append((host.ejected_at, ep))
        if not ejected:
            return endpoints
        cap = len(endpoints) * self.policy.max_ejection_percent // 100
        cap = min(cap, len(endpoints) - 1)
        if len(ejected) > cap:
            ejected.sort(key=lambda pair: pair[0])
            ejected = ejected[:cap]
        out = {ep for _, ep in ejected}
        return [ep for ep in endpoints if ep not in out]

    def retain(self, endpoints: Collection[Endpoint]) -> None:
        """Forget the endpoints not in ``endpoints`` (gone from the snapshot)."""
        for ep in [ep for ep in self._hosts if ep not in endpoints]:
            del self._hosts[ep]


# ------------------------------------------------------------ faults (retries: proxy.retries)


_NO_FAULT: tuple[float, int | None] = (0.0, None)


def draw_fault(fault: FaultPolicy | None, rng: random.Random) -> tuple[float, int | None]:
    """(seconds to delay the request, status to abort it with or None), drawn per request.

    The delay and the abort are drawn independently, each with its own percentage.
    """
    if fault is None:
        return _NO_FAULT
    delay = 0.0
    status = None
    if fault.delay is not None and _hit(fault.delay.percent, rng):
        delay = fault.delay.seconds
    if fault.abort is not None and _hit(fault.abort.percent, rng):
        status = fault.abort.status
    return delay, status


def _hit(percent: float, rng: random.Random) -> bool:
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    return rng.random() * 100 < percent


# --------------------------------------------------------------------------- inbound peers

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"


@dataclass(frozen=True, slots=True)
class LocalNetwork:
    """One network this workload is on: plaintext from inside it is from the mesh's side."""

    subnet: ipaddress.IPv4Network | ipaddress.IPv6Network
    gateway: str  # the host's address on it ("" if none)


def admits_plaintext(mode: str, port: int, source: str, published: Container[int],
                     networks: Sequence[LocalNetwork]) -> bool:
    """Whether a plaintext connection from ``source`` to ``port`` is let in.

    PERMISSIVE lets every one in (migration, Istio's PeerAuthentication). STRICT refuses
    plaintext, but for one case: a port the service publishes on the host is where traffic
    enters the project from outside (until an ingress gateway fronts it). Such a port takes
    plaintext from the host (a network's gateway address: Docker's port proxy) and from
    clients outside the workload's networks (published ports reached over the host's
    interfaces), never from a container on one of those networks, mesh or not.
    """
    if mode != STRICT:
        return True
    if port not in published:
        return False
    try:
        address = ipaddress.ip_address(source.removeprefix("::ffff:"))
    except ValueError:
        return False
    for net in networks:
        if address.version == net.subnet.version and address in net.subnet:
            return source.removeprefix("::ffff:") == net.gateway
    return True
