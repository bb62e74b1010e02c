# ruff: noqa: E402
"""Metrics: the cost of one scrape of /stats/prometheus, and of counting one HTTP request.

    python -m bench.stats_scrape [--series 1000] [--rounds 3] [--duration 2] [--quick]

One process, one thread; the counters of one proxy with --series label sets (80% outbound
HTTP, 10% inbound HTTP, 10% TCP; an HTTP set is a counter and three histograms, 48 samples).

Scrape subjects (milliseconds per scrape, lower is better; the order rotating each round):

- text 0.0.4: ``stats.render(stats, "")``, prometheus_client's text encoder over the
  proxy's collector;
- openmetrics: the same with Prometheus's Accept header (OpenMetrics 1.0);
- collect: ``ProxyCollector.collect()`` alone, the families built from the plain ints;
- hand-written (baseline): the same series written by string formatting, label text built
  once per series, as ``prometheus_text`` did before the exposition went through
  prometheus_client.

Recording subjects (nanoseconds per call into an existing series, lower is better):

- http_request: ``ProxyStats.http_request`` with ``principal=``;
- http_request (before): the body that method had before ``principal`` joined the series
  key (a 6-tuple key), positional as http.py called it, as a baseline.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: put the repository, not bench/, first on sys.path
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import time
from collections.abc import Callable, Iterable
from typing import Any

from bench._common import (
    Baseline,
    Metric,
    Results,
    console,
    print_header,
    print_ratio_note,
    results_table,
    rotated,
)
from composemesh.proxy import stats as st

SCRIPT = "bench/stats_scrape.py"
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                     "application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
SCRAPES = ("text 0.0.4", "openmetrics", "collect", "hand-written")
RECORDS = ("http_request", "http_request (before)")
METRICS = (Metric("scrape", "ms per scrape", 1), Metric("record", "ns per call", 0))
BASELINES = (Baseline("hand-written", "÷ hand-written"),
             Baseline("http_request (before)", "÷ before"))
SOURCE = st.PeerLabels(workload="productpage-v1", namespace="shop", app="productpage",
                       version="v1", principal="spiffe://cluster.local/ns/shop/sa/productpage")


def populate(series: int) -> st.ProxyStats:
    """One proxy's counters with ``series`` label sets, each counted a few times."""
    stats = st.ProxyStats()
    outbound, inbound = series * 8 // 10, series // 10
    for i in range(outbound):
        service = f"svc{i % 40}"
        for n in range(3):
            stats.http_request(SOURCE, service, f"v{i % 5}", f"{service}-v{i % 5}", f"node{i}",
                               (200, 404, 503)[i % 3], f"F{i // 15}", 3.0 * n + i % 97,
                               120 + n, 4000 + i, principal=f"spiffe://td/ns/shop/sa/{service}")
    for i in range(inbound):
        stats.http_inbound_request(st.PeerLabels(app=f"caller{i}"), SOURCE, 200, "-",
                                   st.MUTUAL_TLS, 2.5, 100, 900)
    for i in range(series - outbound - inbound):
        counters = stats.tcp(st.TcpLabels(reporter="source", source=SOURCE,
                                          destination_service=f"db{i}"))
        counters.opened, counters.closed, counters.sent, counters.received = i, i // 2, i, i
    return stats


def hand_written(stats: st.ProxyStats) -> bytes:
    """The exposition as prometheus_text wrote it before (text 0.0.4, by string formatting)."""
    lines: list[str] = []
    tcp = [(_label_text(labels.items()), c) for labels, c in stats._tcp.items()]
    for name, help_text, attr in st.TCP_METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
        lines.extend(f"{name}{{{text}}} {getattr(c, attr)}" for text, c in tcp)
    http = [(_label_text(st.http_label_items(k)), s) for k, s in stats._http.items()]
    http += [(_label_text(st.inbound_label_items(k)), s) for k, s in stats._http_in.items()]
    name = st.REQUESTS_METRIC
    lines += [f"# HELP {name} {st.REQUESTS_HELP}", f"# TYPE {name} counter"]
    lines.extend(f"{name}{{{text}}} {s.duration.count}" for text, s in http)
    for name, help_text, attr in st.HTTP_HISTOGRAMS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for text, s in http:
            histogram = getattr(s, attr)
            total = 0
            for bound, n in zip(histogram.bounds, histogram.counts, strict=False):
                total += n
                lines.append(f'{name}_bucket{{{text},le="{bound:g}"}} {total}')
            total += histogram.counts[-1]
            lines.append(f'{name}_bucket{{{text},le="+Inf"}} {total}')
            lines.append(f"{name}_sum{{{text}}} {histogram.sum:g}")
            lines.append(f"{name}_count{{{text}}} {total}")
    name = st.ERRORS_METRIC
    lines += [f"# HELP {name} {st.ERRORS_HELP}", f"# TYPE {name} counter"]
    for direction, errors in stats._errors.items():
        for kind, value in errors.items():
            lines.append(f'{name}{{direction="{direction}",kind="{kind}"}} {value}')
    return ("\n".join(lines) + "\n").encode()


def _label_text(items: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in items)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def scrapes(stats: st.ProxyStats) -> dict[str, Callable[[], object]]:
    collector = st.ProxyCollector(stats)
    return {
        "text 0.0.4": lambda: st.render(stats, ""),
        "openmetrics": lambda: st.render(stats, PROMETHEUS_ACCEPT),
        "collect": lambda: list(collector.collect()),
        "hand-written": lambda: hand_written(stats),
    }


CALLS = 10_000  # per timed loop of the recording subjects


class Before(st.ProxyStats):
    """``http_request`` as it was before ``principal`` joined the series key (a method, as
    the real one is, so that both calls cost the same to make)."""

    def http_request(self, source: st.PeerLabels, service: str, version: str, workload: str,
                     node: str | None, code: int, flags: str, duration_ms: float,
                     request_bytes: int, response_bytes: int, *,
                     principal: str = st.UNKNOWN) -> None:
        key: Any = (source, service, version, workload, code, flags)
        series = self._http.get(key)
        if series is None:
            series = self._http[key] = st.HttpSeries()
        series.observe(duration_ms, request_bytes, response_bytes)
        if node is not None:
            by_endpoint = self._by_endpoint
            pair = (service, node)
            by_endpoint[pair] = by_endpoint.get(pair, 0) + 1


def records() -> dict[str, Callable[[], object]]:
    """Loops of CALLS requests into one existing series (the hot case), each way."""
    stats = st.ProxyStats()
    args = (SOURCE, "reviews", "v1", "reviews-v1", "node1", 200, "-", 3.0, 100, 200)
    principal = "spiffe://cluster.local/ns/shop/sa/reviews"
    stats.http_request(*args, principal=principal)
    record = stats.http_request
    record_before = Before().http_request
    record_before(*args)

    def new() -> None:
        for _ in range(CALLS):
            record(SOURCE, "reviews", "v1", "reviews-v1", "node1", 200, "-", 3.0, 100, 200,
                   principal=principal)

    def old() -> None:
        for _ in range(CALLS):
            record_before(SOURCE, "reviews", "v1", "reviews-v1", "node1", 200, "-", 3.0, 100,
                          200)

    return {"http_request": new, "http_request (before)": old}


def seconds_per_call(fn: Callable[[], object], seconds: float) -> float:
    """Mean seconds per call of ``fn``, calling it for at least ``seconds`` (and once)."""
    n = 0
    start = time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / n


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[1])
    parser.add_argument("--series", type=int, default=1000, help="label sets (default 1000)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 2)")
    parser.add_argument("--duration", type=float,
                        help="seconds per subject and round (default 2; quick 0.3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under 30 s")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.duration is None:
        args.duration = 0.3 if args.quick else 2.0
    if args.rounds < 1 or args.duration <= 0 or args.series < 10:
        parser.error("--rounds and --duration must be positive, --series at least 10")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = console()
    stats = populate(args.series)
    scrape = scrapes(stats)
    record = records()
    body = st.render(stats, "")[0]
    lines = body.count(b"\n")
    print_header(out, SCRIPT, [
        f"{args.rounds} round(s) of {args.duration:g} s per subject; {args.series} label sets: "
        f"{lines:,} lines, {len(body) / 1e6:.1f} MB of text 0.0.4 "
        f"(hand-written: {len(hand_written(stats)) / 1e6:.1f} MB)",
    ])
    results: Results = {}
    for round_no in range(args.rounds):
        for subject in rotated(SCRAPES, round_no):
            ms = seconds_per_call(scrape[subject], args.duration) * 1e3
            results.setdefault(("scrape", subject), []).append(ms)
        for subject in rotated(RECORDS, round_no):
            ns = seconds_per_call(record[subject], args.duration) / CALLS * 1e9
            results.setdefault(("record", subject), []).append(ns)
    out.print(results_table("Metrics, one thread (medians)", METRICS, (*SCRAPES, *RECORDS),
                            results, BASELINES))
    print_ratio_note(out, "every row")
    return 0


if __name__ == "__main__":
    sys.exit(main())
