"""Request and error rates per service and version, from the proxies' Prometheus endpoints.

The pilot scrapes every running proxy's ``:15090/stats/prometheus`` on an interval and keeps
the last two samples of ``istio_requests_total`` (reporter="source": every request counted
once, by the proxy that sent it); rates are the difference over the time between them.
Parsing, rating and the choice of the address a proxy is scraped at (``metrics_address``,
which the pilot's Prometheus service discovery uses too) are pure; the scrape loop is the only
I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from composemesh.model import wellknown as wk
from composemesh.model.mesh import Workload

log = logging.getLogger("composemesh.pilot.traffic")
SCRAPE_INTERVAL_S = 5.0

Key = tuple[str, str, str]  # (destination service, destination version, response code)


def metrics_address(workload: Workload, pilot_networks: Collection[str] | None = None
                    ) -> str | None:
    """The address ``workload``'s proxy is scraped at: the lowest of its addresses on the
    networks the pilot is on too (``pilot_networks``, by name); where the pilot's networks or
    the workload's are not known, its lowest address of all. None when it has no address the
    pilot can reach."""
    if pilot_networks is not None and workload.networks:
        shared = sorted(address for name, address in workload.networks
                        if name in pilot_networks and address)
        return shared[0] if shared else None
    return min(workload.addresses) if workload.addresses else None


def host_port(address: str, port: int) -> str:
    """``address:port`` as a URL or a Prometheus target names it (an IPv6 address bracketed)."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def parse_requests(text: str) -> dict[Key, float]:
    """``istio_requests_total`` with reporter="source", summed by service, version and code."""
    totals: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "istio_requests":  # the parser drops the _total suffix
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            labels = sample.labels
            if labels.get("reporter") != "source":
                continue
            key = (
                labels.get("destination_service_name", "unknown"),
                labels.get("destination_version", "unknown"),
                labels.get("response_code", "0"),
            )
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


@dataclass(frozen=True)
class Rate:
    requests_per_s: float
    errors_per_s: float  # 5xx answers, and requests that got no answer (code 0)

    @property
    def error_ratio(self) -> float:
        return self.errors_per_s / self.requests_per_s if self.requests_per_s else 0.0


def rates(
    before: Mapping[str, Mapping[Key, float]],
    after: Mapping[str, Mapping[Key, float]],
    seconds: float,
) -> dict[tuple[str, str], Rate]:
    """Per (service, version) rates between two scrapes of every proxy (by node).

    A proxy whose counters went down restarted: its new counts are all new requests.
    """
    requests: dict[tuple[str, str], float] = {}
    errors: dict[tuple[str, str], float] = {}
    for node, now in after.items():
        then = before.get(node, {})
        for key, value in now.items():
            delta = value - then.get(key, 0.0)
            if delta < 0:
                delta = value
            if delta <= 0:
                continue
            service, version, code = key
            requests[(service, version)] = requests.get((service, version), 0.0) + delta
            if code.startswith("5") or code == "0":
                errors[(service, version)] = errors.get((service, version), 0.0) + delta
    span = max(seconds, 1e-9)
    return {k: Rate(v / span, errors.get(k, 0.0) / span) for k, v in requests.items()}


def sent_rates(
    before: Mapping[str, Mapping[Key, float]],
    after: Mapping[str, Mapping[Key, float]],
    seconds: float,
) -> dict[str, Rate]:
    """Per proxy (by node): the requests it sent, whatever their destination (a gateway's
    request rate); a proxy whose counters went down restarted, as in ``rates``."""
    out = {}
    span = max(seconds, 1e-9)
    for node, now in after.items():
        then = before.get(node, {})
        sent = failed = 0.0
        for key, value in now.items():
            delta = value - then.get(key, 0.0)
            delta = value if delta < 0 else delta
            sent += max(delta, 0.0)
            if key[2].startswith("5") or key[2] == "0":
                failed += max(delta, 0.0)
        out[node] = Rate(sent / span, failed / span)
    return out


@dataclass
class TrafficMonitor:
    """Scrapes the proxies; ``current()`` gives the rates between the last two scrapes."""

    workloads: Callable[[], Iterable[Workload]]
    interval_s: float = SCRAPE_INTERVAL_S
    networks: Collection[str] | None = None  # the pilot's networks, by name; None: not known
    _samples: list[tuple[float, dict[str, dict[Key, float]]]] = field(default_factory=list)

    def current(self) -> dict[tuple[str, str], Rate]:
        if len(self._samples) < 2:
            return {}
        (t0, s0), (t1, s1) = self._samples[-2], self._samples[-1]
        return rates(s0, s1, t1 - t0)

    def sent(self) -> dict[str, Rate]:
        """What each proxy sent between the last two scrapes, by node."""
        if len(self._samples) < 2:
            return {}
        (t0, s0), (t1, s1) = self._samples[-2], self._samples[-1]
        return sent_rates(s0, s1, t1 - t0)

    async def scrape_once(self, session: aiohttp.ClientSession) -> None:
        targets = [(w, address) for w in self.workloads() if w.proxy_healthy
                   and (address := metrics_address(w, self.networks)) is not None]
        results = await asyncio.gather(*(self._scrape(session, w, a) for w, a in targets))
        sample = {w.node: r for (w, _), r in zip(targets, results, strict=True) if r is not None}
        self._samples = [*self._samples[-1:], (time.monotonic(), sample)]

    async def _scrape(self, session: aiohttp.ClientSession, w: Workload,
                      address: str) -> dict[Key, float] | None:
        url = f"http://{host_port(address, wk.PORT_PROMETHEUS)}/stats/prometheus"
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return None
                return parse_requests(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("scrape of %s failed: %s", w.node, exc)
            return None

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.interval_s - 1))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await self.scrape_once(session)
                await asyncio.sleep(self.interval_s)
