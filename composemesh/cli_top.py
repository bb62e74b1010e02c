"""`composemesh top`: live traffic per service, version and caller, read from the proxies'
Istio metrics (``:15090/stats/prometheus``) two scrapes apart.

The decisions are pure and tested without I/O: ``parse_exposition`` (text to samples),
``proxy_deltas`` (what one proxy counted between two scrapes, a restart taken as such),
``traffic`` (rates, success, quantiles per service, version and caller) and ``top_view``
(the tables). The edges are ``discover_targets`` (the Docker engine), ``scrape`` (HTTP,
concurrent) and ``run_top`` (the clock and the terminal).

Which proxy's count is believed: each request is counted by both ends, so per destination
service and version the series of the proxy that answered it (``reporter="destination"``)
are read, and those of the caller's proxy (``reporter="source"``) only where no destination
proxy reported any (a destination without a sidecar, ``destination_workload="unknown"``, or
one whose proxy did not answer both scrapes). TCP bytes are chosen the same way per service.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich import filesize
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from composemesh.errors import EngineError, MeshError
from composemesh.model import wellknown as wk

PROJECT_LABEL = "com.docker.compose.project"
SCRAPE_TIMEOUT_S = 1.0  # per proxy; a slower one is shown as not answering, not waited for
METRICS_PATH = "/stats/prometheus"

REQUESTS = "istio_requests_total"
DURATION_BUCKET = "istio_request_duration_milliseconds_bucket"
TCP_RECEIVED = "istio_tcp_received_bytes_total"  # from the connecting side: "in"
TCP_SENT = "istio_tcp_sent_bytes_total"  # back to the connecting side: "out"
KEPT = frozenset({REQUESTS, DURATION_BUCKET, TCP_RECEIVED, TCP_SENT})
DESTINATION = "destination"
SOURCE = "source"
UNKNOWN = "unknown"

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]  # sample name, its labels sorted by name
Sample = dict[SeriesKey, float]  # one proxy's answer to one scrape


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One proxy to scrape: its container's name and the address of its namespace."""

    name: str
    address: str | None  # None: its namespace has no address the host can reach
    port: int = wk.PORT_PROMETHEUS

    @property
    def url(self) -> str | None:
        if self.address is None:
            return None
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}{METRICS_PATH}"


def proxy_targets(containers: Sequence[Mapping[str, Any]]) -> list[Target]:
    """The proxies among a project's containers (rows of the engine's container list), each
    with the first address, by network name, of the container whose network namespace it
    shares (``NetworkMode: container:<id>``; a gateway with networks of its own, its own)."""
    by_id = {str(c.get("Id", "")): c for c in containers}

    def holder_of(proxy: Mapping[str, Any]) -> Mapping[str, Any] | None:
        mode = str((proxy.get("HostConfig") or {}).get("NetworkMode") or "")
        if not mode.startswith("container:"):
            return proxy
        ref = mode.removeprefix("container:")
        for cid, c in by_id.items():
            if cid.startswith(ref) or ref in (_name(c), cid[:12]):
                return c
        return None

    targets = []
    for c in containers:
        if (c.get("Labels") or {}).get(wk.LABEL_ROLE) != wk.ROLE_PROXY:
            continue
        holder = holder_of(c)
        nets = ((holder or {}).get("NetworkSettings") or {}).get("Networks") or {}
        ips = [str(n["IPAddress"]) for _, n in sorted(nets.items()) if n and n.get("IPAddress")]
        targets.append(Target(_name(c), ips[0] if ips else None))
    return sorted(targets, key=lambda t: t.name)


def _name(container: Mapping[str, Any]) -> str:
    names = [str(n).lstrip("/") for n in container.get("Names") or ()]
    return names[0] if names else str(container.get("Id", "?"))[:12]


def discover_targets(project: str) -> list[Target]:
    """The running proxies of compose project ``project``, from the Docker engine (one
    container listing); ``EngineError`` if the engine does not answer."""
    from composemesh.engine import docker_host

    try:
        client = docker_host.pinged_client(timeout=10)
        rows = client.api.containers(filters={"label": [f"{PROJECT_LABEL}={project}"]})
    except docker_host.DockerUnavailable as exc:
        raise EngineError(f"the Docker engine did not answer: {exc}") from None
    except Exception as exc:  # the SDK's own errors stop here
        raise EngineError(f"the Docker engine did not list the containers: {exc}") from None
    return proxy_targets(rows)


# --------------------------------------------------------------------------- scraping


def parse_exposition(text: str) -> Sample:
    """The series of a proxy's answer that ``top`` reads (requests, duration buckets, TCP
    bytes), by sample name and labels; ``ValueError`` if the text is not an exposition."""
    sample: Sample = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in KEPT:
                key = (s.name, tuple(sorted(s.labels.items())))
                sample[key] = sample.get(key, 0.0) + float(s.value)
    return sample


@dataclass(frozen=True)
class Round:
    """One scrape of every target: the answers by proxy name, and why the others gave none."""

    samples: dict[str, Sample]
    failures: dict[str, str]


async def scrape(targets: Sequence[Target], *, timeout: float = SCRAPE_TIMEOUT_S) -> Round:
    """Every target's metrics at once, each given ``timeout`` seconds; a proxy that does not
    answer (or answers with something else) is a failure with its reason, never an error."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        answers = await asyncio.gather(*(_scrape_one(session, t) for t in targets))
    samples: dict[str, Sample] = {}
    failures: dict[str, str] = {}
    for target, answer in zip(targets, answers, strict=True):
        if isinstance(answer, str):
            failures[target.name] = answer
        else:
            samples[target.name] = answer
    return Round(samples, failures)


async def _scrape_one(session: aiohttp.ClientSession, target: Target) -> Sample | str:
    url = target.url
    if url is None:
        return "no address (its network namespace is on no network)"
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return f"HTTP {resp.status}"
            text = await resp.text()
    except TimeoutError:
        return "timed out"
    except aiohttp.ClientConnectorError as exc:
        return f"unreachable ({exc.os_error.strerror or exc.os_error})"
    except aiohttp.ClientError as exc:
        return f"unreachable ({type(exc).__name__})"
    try:
        return parse_exposition(text)
    except ValueError:
        return "not Prometheus text"


# --------------------------------------------------------------------------- pure core


def proxy_deltas(before: Sample, after: Sample) -> Sample:
    """What one proxy counted between two scrapes, per series. A proxy whose counters went
    down (or lost a series) restarted in between: everything it counts now is new."""
    restarted = any(after.get(key, -1.0) < value for key, value in before.items())
    if restarted:
        return dict(after)
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound -> count), as Prometheus's
    ``histogram_quantile``: linear inside the bucket it falls in (the first from 0), the
    upper bound of the last finite bucket when it falls in +Inf; None with no observations."""
    ladder = sorted(buckets.items())
    if len(ladder) < 2 or not math.isinf(ladder[-1][0]):
        return None
    counts: list[float] = []
    for _, count in ladder:  # as Prometheus's ensureMonotonic
        counts.append(max(count, counts[-1]) if counts else count)
    observations = counts[-1]
    if observations <= 0:
        return None
    rank = q * observations
    b = next((i for i in range(len(ladder) - 1) if counts[i] >= rank), len(ladder) - 1)
    if b == len(ladder) - 1:
        return ladder[-2][0]
    end = ladder[b][0]
    if b == 0 and end <= 0:
        return end
    start, count = 0.0, counts[b]
    if b > 0:
        start = ladder[b - 1][0]
        count -= counts[b - 1]
        rank -= counts[b - 1]
    return start if count <= 0 else start + (end - start) * (rank / count)


@dataclass(frozen=True)
class ServiceTraffic:
    """One destination service and version between two scrapes."""

    service: str
    version: str
    reporter: str  # whose counts these are: "destination", or "source" where none reported
    requests_per_s: float
    success: float | None  # the share of requests answered without a 5xx (or no answer: 0)
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class CallerTraffic:
    """One caller (``source_workload``) of one destination service, all versions."""

    service: str
    caller: str
    requests_per_s: float
    success: float | None


@dataclass(frozen=True)
class TcpTraffic:
    """Bytes per second of one destination service's TCP connections."""

    service: str
    received_per_s: float  # in: from the connecting side
    sent_per_s: float  # out: back to the connecting side


@dataclass(frozen=True)
class Traffic:
    """Everything ``top`` shows of one span of ``seconds`` between two scrapes."""

    seconds: float
    services: tuple[ServiceTraffic, ...]
    callers: tuple[CallerTraffic, ...]
    tcp: tuple[TcpTraffic, ...]
    measured: tuple[str, ...]  # the proxies that answered both scrapes


def _failed(code: str) -> bool:
    return code == "0" or (len(code) == 3 and code.startswith("5"))


def traffic(before: Mapping[str, Sample], after: Mapping[str, Sample],
            seconds: float) -> Traffic:
    """Rates between two scrapes of the proxies (by name), ``seconds`` apart. Only proxies
    that answered both count; a restarted one's new counts are its delta."""
    span = max(seconds, 1e-9)
    measured = tuple(sorted(set(before) & set(after)))
    deltas = [proxy_deltas(before[name], after[name]) for name in measured]
    series = [(name, dict(labels), value) for d in deltas for (name, labels), value in d.items()]

    def dest(labels: Mapping[str, str]) -> tuple[str, str]:
        return (labels.get("destination_service_name", UNKNOWN),
                labels.get("destination_version", UNKNOWN))

    # per (service, version): do destination proxies report it, or only callers?
    reported = {dest(lb) for name, lb, _ in series
                if name == REQUESTS and lb.get("reporter") == DESTINATION}

    def believed(labels: Mapping[str, str]) -> bool:
        reporter = labels.get("reporter")
        if reporter == DESTINATION:
            return True
        return reporter == SOURCE and dest(labels) not in reported

    requests: dict[tuple[str, str], float] = {}
    failures: dict[tuple[str, str], float] = {}
    reporters: dict[tuple[str, str], str] = {}
    by_caller: dict[tuple[str, str], float] = {}
    caller_failures: dict[tuple[str, str], float] = {}
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    for name, labels, value in series:
        if name not in (REQUESTS, DURATION_BUCKET) or not believed(labels):
            continue
        key = dest(labels)
        if name == DURATION_BUCKET:
            le = float(labels.get("le", "nan"))
            if not math.isnan(le):
                ladder = buckets.setdefault(key, {})
                ladder[le] = ladder.get(le, 0.0) + value
            continue
        failed = value if _failed(labels.get("response_code", "0")) else 0.0
        requests[key] = requests.get(key, 0.0) + value
        failures[key] = failures.get(key, 0.0) + failed
        reporters[key] = str(labels.get("reporter"))
        if value > 0:
            caller = (key[0], labels.get("source_workload", UNKNOWN))
            by_caller[caller] = by_caller.get(caller, 0.0) + value
            caller_failures[caller] = caller_failures.get(caller, 0.0) + failed

    services = tuple(
        ServiceTraffic(
            service, version, reporters[(service, version)], n / span,
            (n - failures[(service, version)]) / n if n else None,
            histogram_quantile(0.5, buckets.get((service, version), {})) if n else None,
            histogram_quantile(0.99, buckets.get((service, version), {})) if n else None,
        )
        for (service, version), n in sorted(requests.items())
    )
    callers = tuple(
        CallerTraffic(service, caller, n / span, (n - caller_failures[(service, caller)]) / n)
        for (service, caller), n in sorted(by_caller.items(), key=lambda kv: (kv[0][0], -kv[1],
                                                                              kv[0][1]))
    )
    return Traffic(seconds, services, callers, _tcp(series, span), measured)


def _tcp(series: Iterable[tuple[str, dict[str, str], float]], span: float
         ) -> tuple[TcpTraffic, ...]:
    rows = [(name, lb, v) for name, lb, v in series if name in (TCP_RECEIVED, TCP_SENT)]
    reported = {lb.get("destination_service_name", UNKNOWN) for _, lb, _ in rows
                if lb.get("reporter") == DESTINATION}
    totals: dict[str, list[float]] = {}
    for name, labels, value in rows:
        service = labels.get("destination_service_name", UNKNOWN)
        reporter = labels.get("reporter")
        if reporter == DESTINATION or (reporter == SOURCE and service not in reported):
            pair = totals.setdefault(service, [0.0, 0.0])
            pair[0 if name == TCP_RECEIVED else 1] += value
    return tuple(TcpTraffic(s, r / span, o / span) for s, (r, o) in sorted(totals.items()))


# --------------------------------------------------------------------------- display


def _rate(value: float) -> str:
    return f"{value:.1f}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _bytes(value: float) -> str:
    return f"{filesize.decimal(round(value))}/s"


def top_view(project: str, data: Traffic | None, targets: Sequence[Target],
             failures: Mapping[str, str]) -> RenderableType:
    """The tables of one update: services and versions, callers, TCP, and the proxies that
    did not answer; ``data`` None while the first two scrapes are not in yet."""
    parts: list[RenderableType] = []
    answered = len(targets) - len(failures)
    if data is None:
        parts.append(Text(f"measuring {project}: {answered} of {len(targets)} proxies "
                          "answered, the rates come with the next scrape…", style="dim"))
    else:
        table = Table(title=f"traffic of {project}, last {data.seconds:.1f}s",
                      caption=f"{len(data.measured)} of {len(targets)} proxies measured")
        for col in ("service", "version", "req/s", "success", "p50 ms", "p99 ms"):
            table.add_column(col, justify="left" if col in ("service", "version") else "right")
        previous = None
        for s in data.services:
            table.add_row(s.service if s.service != previous else "", s.version,
                          _rate(s.requests_per_s), _share(s.success), _ms(s.p50_ms),
                          _ms(s.p99_ms))
            previous = s.service
        parts.append(table)
        if data.callers:
            callers = Table(title="callers")
            for col in ("service", "caller", "req/s", "success"):
                callers.add_column(col, justify="right" if col in ("req/s", "success")
                                   else "left")
            previous = None
            for c in data.callers:
                callers.add_row(c.service if c.service != previous else "", c.caller,
                                _rate(c.requests_per_s), _share(c.success))
                previous = c.service
            parts.append(callers)
        if data.tcp:
            tcp = Table(title="tcp")
            for col in ("service", "in", "out"):
                tcp.add_column(col, justify="left" if col == "service" else "right")
            for t in data.tcp:
                tcp.add_row(t.service, _bytes(t.received_per_s), _bytes(t.sent_per_s))
            parts.append(tcp)
    if failures:
        silent = Table(title="proxies not answering", title_style="bold red")
        silent.add_column("proxy")
        silent.add_column("why")
        for name, why in sorted(failures.items()):
            silent.add_row(name, why)
        parts.append(silent)
    return Group(*parts)


# --------------------------------------------------------------------------- the command


def run_top(project: str, *, interval: float, once: bool,
            console: Console | None = None) -> None:
    """Scrape the project's proxies every ``interval`` seconds and show the rates between
    the last two scrapes, updated in place until Ctrl-C; ``once``: one table, then return.
    ``MeshError`` if the project has no running proxies."""
    targets = discover_targets(project)
    if not targets:
        raise MeshError(f"project {project!r} has no running proxies: is it up "
                        f"(`composemesh up -p {project}`)?")
    shown = console or Console(highlight=False)
    interval = max(interval, 0.1)
    try:
        if once:
            shown.print(asyncio.run(_once(project, targets, interval)))
        else:
            asyncio.run(_watch(project, targets, interval, shown))
    except KeyboardInterrupt:
        return


async def _once(project: str, targets: list[Target], interval: float) -> RenderableType:
    t0 = time.monotonic()
    first = await scrape(targets, timeout=min(SCRAPE_TIMEOUT_S, interval))
    await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
    t1 = time.monotonic()
    second = await scrape(targets, timeout=min(SCRAPE_TIMEOUT_S, interval))
    return top_view(project, traffic(first.samples, second.samples, t1 - t0), targets,
                    second.failures)


async def _watch(project: str, targets: list[Target], interval: float,
                 console: Console) -> None:
    previous: tuple[float, Round] | None = None
    with Live(top_view(project, None, targets, {}), console=console, auto_refresh=False,
              transient=False) as live:
        while True:
            started = time.monotonic()
            current = await scrape(targets, timeout=min(SCRAPE_TIMEOUT_S, interval))
            data = None
            if previous is not None:
                data = traffic(previous[1].samples, current.samples, started - previous[0])
            live.update(top_view(project, data, targets, current.failures), refresh=True)
            previous = (started, current)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
            # proxies come and go: the next round scrapes those running then (the last
            # known ones if the engine did not answer, or listed none: shown as silent)
            with contextlib.suppress(EngineError):
                targets = await asyncio.to_thread(discover_targets, project) or targets
