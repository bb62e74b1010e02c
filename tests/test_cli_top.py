"""`composemesh top`: rates, success and quantiles from two scrapes of Istio's metrics.

The scrapes are exposition text written here with Istio's label set and Envoy's duration
buckets; each expected figure is computed by hand in the comment beside it (10 s apart, so
a delta of n requests is n/10 req/s). Scraping runs against real aiohttp servers on
localhost; finding the proxies through the Docker engine is tested on the engine's
container-list rows only (no engine here).
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from click.testing import CliRunner
from rich.console import Console

from composemesh import cli, cli_top
from composemesh.cli_top import (
    Sample,
    Target,
    histogram_quantile,
    parse_exposition,
    proxy_deltas,
    proxy_targets,
    run_top,
    scrape,
    top_view,
    traffic,
)
from composemesh.errors import MeshError
from composemesh.model import wellknown as wk
from tests.support import free_port

LADDER = ("0.5", "1", "5", "10", "25", "50", "100", "250", "500", "1000", "2500", "5000",
          "10000", "30000", "60000", "300000", "600000", "1800000", "3600000", "+Inf")
NS = "shop"


def peer(prefix: str, workload: str, app: str, version: str) -> str:
    principal = (f"spiffe://cluster.local/ns/{NS}/sa/{app}" if workload != "unknown"
                 else "unknown")
    namespace = NS if workload != "unknown" else "unknown"
    return (f'{prefix}_workload="{workload}",{prefix}_workload_namespace="{namespace}",'
            f'{prefix}_principal="{principal}",{prefix}_app="{app}",'
            f'{prefix}_version="{version}",{prefix}_canonical_service="{app}",'
            f'{prefix}_canonical_revision="{version}",{prefix}_cluster="unknown"')


def istio_labels(reporter: str, source: tuple[str, str, str], destination: tuple[str, str, str],
                 service: str, protocol: str = "http", code: str | None = "200",
                 flags: str = "-") -> str:
    """Istio's standard label set, in the order the proxy writes it."""
    security = "mutual_tls" if "unknown" not in (source[0], destination[0]) else "none"
    return ",".join([
        f'reporter="{reporter}"', peer("source", *source), peer("destination", *destination),
        f'destination_service="{service}.{NS}.svc.cluster.local"',
        f'destination_service_name="{service}"', f'destination_service_namespace="{NS}"',
        f'request_protocol="{protocol}"',
        *([f'response_code="{code}"'] if code is not None else []),
        f'response_flags="{flags}"', f'connection_security_policy="{security}"',
    ])


def http_series(labels: str, buckets: dict[str, int], sum_ms: float) -> str:
    """istio_requests_total and the duration histogram of one series: ``buckets`` gives the
    cumulative count at the bounds where it changes; it carries on up to +Inf."""
    lines = []
    count = 0
    for le in LADDER:
        count = buckets.get(le, count)
        lines.append(f'istio_request_duration_milliseconds_bucket{{{labels},le="{le}"}} {count}')
    return "\n".join([
        f"istio_requests_total{{{labels}}} {count}", *lines,
        f"istio_request_duration_milliseconds_sum{{{labels}}} {sum_ms:g}",
        f"istio_request_duration_milliseconds_count{{{labels}}} {count}",
    ])


def exposition(http: list[str], tcp: Sequence[tuple[str, int, int]] = ()) -> str:
    """A proxy's answer: TCP counters (labels, received, sent) first, as the proxy writes."""
    out = ["# HELP istio_tcp_sent_bytes_total Bytes sent back to the connecting side.",
           "# TYPE istio_tcp_sent_bytes_total counter",
           *(f"istio_tcp_sent_bytes_total{{{lb}}} {sent}" for lb, _, sent in tcp),
           "# HELP istio_tcp_received_bytes_total Bytes received from the connecting side.",
           "# TYPE istio_tcp_received_bytes_total counter",
           *(f"istio_tcp_received_bytes_total{{{lb}}} {received}" for lb, received, _ in tcp),
           "# HELP istio_requests_total Requests answered, by source and destination.",
           "# TYPE istio_requests_total counter"]
    requests = [line for s in http for line in s.splitlines()
                if line.startswith("istio_requests_total")]
    histograms = [line for s in http for line in s.splitlines()
                  if line.startswith("istio_request_duration")]
    out += requests
    out += ["# HELP istio_request_duration_milliseconds Request durations.",
            "# TYPE istio_request_duration_milliseconds histogram", *histograms]
    out += ["# HELP composemesh_proxy_tcp_errors_total TCP connections that failed.",
            "# TYPE composemesh_proxy_tcp_errors_total counter",
            'composemesh_proxy_tcp_errors_total{direction="inbound",kind="reset"} 3']
    return "\n".join(out) + "\n"


INGRESS = ("ingress-gateway", "ingress-gateway", "v1")
PRODUCTPAGE = ("productpage", "productpage", "v1")
REVIEWS_V1 = ("reviews-v1", "reviews", "v1")
REVIEWS_V2 = ("reviews-v2", "reviews", "v2")
RATINGS = ("ratings", "ratings", "v1")
MONGODB = ("mongodb", "mongodb", "v1")
NO_SIDECAR = ("unknown", "payments", "unknown")
PASSTHROUGH = ("unknown", "unknown", "unknown")


def productpage(after: bool) -> str:
    """productpage's proxy: what it answered (inbound, from the ingress gateway) and what it
    sent (outbound: reviews v1 and v2, which report themselves; payments, no sidecar)."""
    a = after
    return exposition([
        http_series(istio_labels("destination", INGRESS, PRODUCTPAGE, "productpage"),
                    {"50": 46, "100": 224, "250": 320, "500": 330} if a else
                    {"50": 40, "100": 200, "250": 290, "500": 300}, 0),
        http_series(istio_labels("destination", INGRESS, PRODUCTPAGE, "productpage", code="500"),
                    {"100": 10}, 310),  # the same both times: no new 500s
        http_series(istio_labels("source", PRODUCTPAGE, REVIEWS_V1, "reviews"),
                    {"250": 120 if a else 101}, 0),
        http_series(istio_labels("source", PRODUCTPAGE, REVIEWS_V1, "reviews", code="503"),
                    {"5": 6 if a else 4}, 0),
        http_series(istio_labels("source", PRODUCTPAGE, REVIEWS_V2, "reviews"),
                    {"100": 512 if a else 480}, 0),
        http_series(istio_labels("source", PRODUCTPAGE, NO_SIDECAR, "payments"),
                    {"50": 3, "100": 24, "250": 45, "500": 47} if a else
                    {"50": 3, "100": 20, "250": 38, "500": 40}, 0),
        http_series(istio_labels("source", PRODUCTPAGE, NO_SIDECAR, "payments", code="0",
                                 flags="UF"), {"1000": 2 if a else 1}, 0),
    ], [(istio_labels("source", PRODUCTPAGE, PASSTHROUGH, "PassthroughCluster", "tcp", None),
         1100 if a else 100, 6000 if a else 1000)])


def reviews_v1(after: bool) -> str:
    a = after
    return exposition([
        http_series(istio_labels("destination", PRODUCTPAGE, REVIEWS_V1, "reviews"),
                    {"1": 1, "5": 22, "10": 70, "25": 106, "50": 114, "100": 118} if a else
                    {"1": 1, "5": 20, "10": 60, "25": 90, "50": 97, "100": 100}, 0),
        http_series(istio_labels("destination", PRODUCTPAGE, REVIEWS_V1, "reviews", code="503"),
                    {"1": 2, "5": 6 if a else 4}, 0),
    ], [(istio_labels("source", REVIEWS_V1, MONGODB, "mongodb", "tcp", None),
         30300 if a else 10100, 1010000 if a else 505000)])


def reviews_v2(after: bool) -> str:
    """reviews v2's proxy restarted between the scrapes: its counters began again at 0."""
    if not after:
        return exposition([
            http_series(istio_labels("destination", PRODUCTPAGE, REVIEWS_V2, "reviews"),
                        {"100": 500}, 0),
            http_series(istio_labels("destination", PRODUCTPAGE, REVIEWS_V2, "reviews",
                                     code="404"), {"5": 2}, 0),
        ])
    return exposition([
        http_series(istio_labels("destination", PRODUCTPAGE, REVIEWS_V2, "reviews"),
                    {"10": 3, "25": 15, "50": 27, "100": 30}, 0),
        http_series(istio_labels("destination", PRODUCTPAGE, REVIEWS_V2, "reviews", code="404"),
                    {"5": 5}, 0),
    ])


def ratings() -> str:
    return exposition([http_series(istio_labels("destination", REVIEWS_V2, RATINGS, "ratings"),
                                   {"25": 50}, 0)])


def mongodb(after: bool) -> str:
    return exposition([], [(istio_labels("destination", REVIEWS_V1, MONGODB, "mongodb", "tcp",
                                         None), 30000 if after else 10000,
                            1000000 if after else 500000)])


def details() -> str:
    return exposition([http_series(istio_labels("destination", PRODUCTPAGE,
                                                ("details", "details", "v1"), "details"),
                                   {"25": 7}, 0)])


def scrapes() -> tuple[dict[str, Sample], dict[str, Sample]]:
    """Six proxies: ratings answered only the first scrape, details only the second."""
    before = {"shop-productpage-proxy-1": productpage(False),
              "shop-reviews-v1-proxy-1": reviews_v1(False),
              "shop-reviews-v2-proxy-1": reviews_v2(False),
              "shop-ratings-proxy-1": ratings(),
              "shop-mongodb-proxy-1": mongodb(False)}
    after = {"shop-productpage-proxy-1": productpage(True),
             "shop-reviews-v1-proxy-1": reviews_v1(True),
             "shop-reviews-v2-proxy-1": reviews_v2(True),
             "shop-mongodb-proxy-1": mongodb(True),
             "shop-details-proxy-1": details()}
    return ({k: parse_exposition(v) for k, v in before.items()},
            {k: parse_exposition(v) for k, v in after.items()})


TARGETS = [Target(f"shop-{n}-proxy-1", f"172.20.0.{i}") for i, n in enumerate(
    ("details", "mongodb", "productpage", "ratings", "reviews-v1", "reviews-v2"), start=2)]


# --------------------------------------------------------------------------- parsing


def test_parse_reads_a_verbatim_istio_exposition() -> None:
    text = (
        "# HELP istio_requests_total Requests answered, by source and destination.\n"
        "# TYPE istio_requests_total counter\n"
        'istio_requests_total{reporter="destination",source_workload="productpage",'
        'source_workload_namespace="shop",source_principal="spiffe://cluster.local/ns/shop/sa/'
        'productpage",source_app="productpage",source_version="v1",destination_workload='
        '"reviews-v1",destination_workload_namespace="shop",destination_app="reviews",'
        'destination_version="v1",destination_service_name="reviews",request_protocol="http",'
        'response_code="200",response_flags="-"} 7\n'
        "# TYPE istio_request_duration_milliseconds histogram\n"
        'istio_request_duration_milliseconds_bucket{reporter="destination",'
        'destination_service_name="reviews",destination_version="v1",response_code="200",'
        'le="0.5"} 0\n'
        'istio_request_duration_milliseconds_bucket{reporter="destination",'
        'destination_service_name="reviews",destination_version="v1",response_code="200",'
        'le="+Inf"} 7\n'
        'istio_request_duration_milliseconds_sum{reporter="destination",'
        'destination_service_name="reviews",destination_version="v1",response_code="200"} 61.5\n'
        "# TYPE istio_tcp_connections_opened_total counter\n"
        'istio_tcp_connections_opened_total{reporter="source"} 4\n'
    )
    sample = parse_exposition(text)
    assert len(sample) == 3  # the requests and two buckets; _sum and connections not kept
    requests = [(k, v) for k, v in sample.items() if k[0] == "istio_requests_total"]
    assert len(requests) == 1
    (_, labels), value = requests[0]
    assert value == 7.0
    assert dict(labels)["source_workload"] == "productpage"
    assert dict(labels)["destination_version"] == "v1"
    les = sorted(dict(k[1])["le"] for k in sample if k[0].endswith("_bucket"))
    assert les == ["+Inf", "0.5"]


def test_parse_refuses_what_is_not_an_exposition() -> None:
    with pytest.raises(ValueError):
        parse_exposition("<html><body>502 Bad Gateway</body></html>\n")


def test_the_proxys_own_exposition_reads_back() -> None:
    """What composemesh's proxy writes (proxy.stats) is what top reads."""
    from composemesh.proxy.stats import PeerLabels, ProxyStats

    stats = ProxyStats()
    caller = PeerLabels(workload="productpage", namespace=NS, app="productpage", version="v1")
    me = PeerLabels(workload="reviews-v1", namespace=NS, app="reviews", version="v1")
    before = {"p": parse_exposition(stats.prometheus_text())}
    for ms in (3.0, 7.0, 7.0, 40.0):  # buckets 5, 10, 10, 50
        stats.http_inbound_request(caller, me, 200, "-", "mutual_tls", ms, 100, 200)
    stats.http_inbound_request(caller, me, 503, "UF", "mutual_tls", 0.7, 100, 0)  # bucket 1
    got = traffic(before, {"p": parse_exposition(stats.prometheus_text())}, 2.0)
    (row,) = got.services
    assert (row.service, row.version, row.reporter) == ("reviews", "v1", "destination")
    assert row.requests_per_s == 2.5  # 5 in 2 s
    assert row.success == 0.8
    # cumulative: le=1: 1, 5: 2, 10: 4, 25: 4, 50: 5. p50: rank 2.5 in (5, 10], 2 below,
    # 2 in it: 5 + 5 * 0.5/2 = 6.25. p99: rank 4.95 in (25, 50]: 25 + 25 * 0.95 = 48.75
    assert row.p50_ms == 6.25
    assert row.p99_ms == pytest.approx(48.75)
    assert got.callers == (cli_top.CallerTraffic("reviews", "productpage", 2.5, 0.8),)


# --------------------------------------------------------------------------- quantiles


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    inf = math.inf
    # 10 observations: 2 in (1, 5], 4 in (5, 10], 3 in (10, 25], 1 in (25, 50]
    buckets = {0.5: 0, 1: 0, 5: 2, 10: 6, 25: 9, 50: 10, 100: 10, inf: 10}
    assert histogram_quantile(0.5, buckets) == 8.75  # rank 5: 5 + 5 * (5-2)/4
    assert histogram_quantile(0.99, buckets) == pytest.approx(47.5)  # rank 9.9: 25 + 25 * 0.9/1
    assert histogram_quantile(0.9, buckets) == 25.0  # rank 9 is the top of (10, 25]
    # the first bucket starts at 0
    assert histogram_quantile(0.5, {0.5: 4, 1: 4, inf: 4}) == 0.25


def test_histogram_quantile_in_inf_is_the_last_finite_bound() -> None:
    inf = math.inf
    assert histogram_quantile(0.99, {1: 0, 5: 50, 3600000: 90, inf: 100}) == 3600000
    assert histogram_quantile(0.5, {1: 0, 5: 50, 3600000: 90, inf: 100}) == 5


def test_histogram_quantile_without_observations_is_none() -> None:
    assert histogram_quantile(0.5, {1: 0, math.inf: 0}) is None
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {1: 3, 5: 4}) is None  # no +Inf bucket: not a histogram


# --------------------------------------------------------------------------- deltas


def test_deltas_are_the_difference_per_series() -> None:
    before: Sample = {("istio_requests_total", (("a", "1"),)): 10.0,
              ("istio_requests_total", (("a", "2"),)): 4.0}
    after: Sample = {("istio_requests_total", (("a", "1"),)): 15.0,
             ("istio_requests_total", (("a", "2"),)): 4.0,
             ("istio_requests_total", (("a", "3"),)): 2.0}  # a new series: all of it new
    assert proxy_deltas(before, after) == {
        ("istio_requests_total", (("a", "1"),)): 5.0,
        ("istio_requests_total", (("a", "2"),)): 0.0,
        ("istio_requests_total", (("a", "3"),)): 2.0,
    }


def test_a_counter_going_down_makes_all_the_proxys_new_counts_the_delta() -> None:
    before: Sample = {("istio_requests_total", (("a", "1"),)): 500.0,
              ("istio_requests_total", (("a", "2"),)): 2.0}
    after: Sample = {("istio_requests_total", (("a", "1"),)): 30.0,
             ("istio_requests_total", (("a", "2"),)): 5.0}
    # series a=2 went up 2 -> 5, but its proxy restarted: 5 new requests, not 3
    assert proxy_deltas(before, after) == after


def test_a_series_gone_means_a_restart() -> None:
    before: Sample = {("istio_requests_total", (("a", "1"),)): 2.0,
              ("istio_requests_total", (("a", "2"),)): 1.0}
    after: Sample = {("istio_requests_total", (("a", "1"),)): 9.0}
    assert proxy_deltas(before, after) == {("istio_requests_total", (("a", "1"),)): 9.0}


# --------------------------------------------------------------------------- traffic


def test_traffic_per_service_and_version() -> None:
    before, after = scrapes()
    got = traffic(before, after, 10.0)
    rows = {(s.service, s.version): s for s in got.services}
    assert list(rows) == [("payments", "unknown"), ("productpage", "v1"), ("reviews", "v1"),
                          ("reviews", "v2")]  # ratings, details: no proxy answered both

    # reviews v1, as its own proxy counted (productpage's count, 21, is not added or used):
    # 18 x 200 and 2 x 503 in 10 s
    v1 = rows[("reviews", "v1")]
    assert (v1.reporter, v1.requests_per_s, v1.success) == ("destination", 2.0, 0.9)
    # deltas, cumulative: le=5: 2+2=4, 10: 10+2=12, 25: 16+2=18, 50: 19, 100: 20
    # p50: rank 10 in (5, 10]: 5 + 5 * (10-4)/8 = 8.75; p99: rank 19.8 in (50, 100]: 90
    assert v1.p50_ms == 8.75
    assert v1.p99_ms == pytest.approx(90.0)

    # reviews v2 restarted: its counts now (30 x 200, 5 x 404) are all new: 35 in 10 s
    v2 = rows[("reviews", "v2")]
    assert (v2.reporter, v2.requests_per_s, v2.success) == ("destination", 3.5, 1.0)
    # cumulative: le=5: 5, 10: 8, 25: 20, 50: 32, 100: 35
    # p50: rank 17.5 in (10, 25]: 10 + 15 * 9.5/12 = 21.875
    # p99: rank 34.65 in (50, 100]: 50 + 50 * 2.65/3 = 94.1666...
    assert v2.p50_ms == pytest.approx(21.875)
    assert v2.p99_ms == pytest.approx(50 + 50 * 2.65 / 3)

    # payments has no sidecar: productpage's own count; 7 x 200, 1 x no answer (code 0)
    pay = rows[("payments", "unknown")]
    assert (pay.reporter, pay.requests_per_s, pay.success) == ("source", 0.8, 0.875)
    # cumulative: le=50: 0, 100: 4, 250: 7, 500: 7, 1000: 8
    # p50: rank 4 is the top of (50, 100]: 100; p99: rank 7.92 in (500, 1000]: 960
    assert pay.p50_ms == 100.0
    assert pay.p99_ms == pytest.approx(960.0)

    # productpage: 30 x 200 from the gateway, the 500 series did not move
    pp = rows[("productpage", "v1")]
    assert (pp.requests_per_s, pp.success) == (3.0, 1.0)
    # cumulative: le=50: 6, 100: 24, 250: 30; p50: rank 15: 50 + 50 * 9/18 = 75
    # p99: rank 29.7 in (100, 250]: 100 + 150 * 5.7/6 = 242.5
    assert pp.p50_ms == 75.0
    assert pp.p99_ms == pytest.approx(242.5)

    assert got.measured == ("shop-mongodb-proxy-1", "shop-productpage-proxy-1",
                            "shop-reviews-v1-proxy-1", "shop-reviews-v2-proxy-1")
    assert got.seconds == 10.0


def test_traffic_per_caller() -> None:
    before, after = scrapes()
    callers = [(c.service, c.caller, c.requests_per_s, c.success)
               for c in traffic(before, after, 10.0).callers]
    assert callers == [
        ("payments", "productpage", 0.8, 0.875),
        ("productpage", "ingress-gateway", 3.0, 1.0),
        # v1: 18 + 2 (503), v2: 30 + 5 (404): 55 requests, 53 answered without a 5xx
        ("reviews", "productpage", 5.5, pytest.approx(53 / 55)),
    ]


def test_tcp_bytes_per_destination_service() -> None:
    before, after = scrapes()
    tcp = [(t.service, t.received_per_s, t.sent_per_s)
           for t in traffic(before, after, 10.0).tcp]
    assert tcp == [
        ("PassthroughCluster", 100.0, 500.0),  # no sidecar there: productpage's count
        ("mongodb", 2000.0, 50000.0),  # mongodb's proxy's count, not reviews-v1's too
    ]


def test_a_destination_whose_proxy_is_silent_falls_back_to_the_callers_count() -> None:
    before, after = scrapes()
    del after["shop-reviews-v1-proxy-1"]  # it answered the first scrape only
    rows = {(s.service, s.version): s for s in traffic(before, after, 10.0).services}
    v1 = rows[("reviews", "v1")]
    # productpage's count: 19 x 200 and 2 x 503
    assert (v1.reporter, v1.requests_per_s) == ("source", 2.1)
    assert v1.success == pytest.approx(19 / 21)
    assert rows[("reviews", "v2")].reporter == "destination"


def test_an_idle_service_shows_no_success_or_latency() -> None:
    before, _ = scrapes()
    got = traffic(before, before, 10.0)
    assert {s.requests_per_s for s in got.services} == {0.0}
    assert {(s.success, s.p50_ms, s.p99_ms) for s in got.services} == {(None, None, None)}
    assert got.callers == ()
    assert {(t.received_per_s, t.sent_per_s) for t in got.tcp} == {(0.0, 0.0)}


# --------------------------------------------------------------------------- the tables


def rendered(renderable: Any, width: int = 110) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def cells(text: str, first: str) -> list[list[str]]:
    """The rows of the tables whose first (or second) cell is ``first``."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("│")[1:-1]]
        if parts and first in parts[:2]:
            rows.append(parts)
    return rows


def test_the_tables_show_the_figures() -> None:
    before, after = scrapes()
    failures = {"shop-ratings-proxy-1": "timed out"}
    text = rendered(top_view("shop", traffic(before, after, 10.0), TARGETS, failures))
    assert "traffic of shop, last 10.0s" in text
    assert "4 of 6 proxies measured" in text
    assert cells(text, "payments")[0] == ["payments", "unknown", "0.8", "87.5%", "100.0",
                                          "960.0"]
    assert cells(text, "productpage")[0] == ["productpage", "v1", "3.0", "100.0%", "75.0",
                                             "242.5"]
    # reviews v1 and v2: the service said once, on its first row (8.75 rounds half to even)
    assert cells(text, "v1")[1] == ["reviews", "v1", "2.0", "90.0%", "8.8", "90.0"]
    assert cells(text, "v2") == [["", "v2", "3.5", "100.0%", "21.9", "94.2"]]

    assert cells(text, "ingress-gateway") == [["productpage", "ingress-gateway", "3.0",
                                               "100.0%"]]
    assert ["reviews", "productpage", "5.5", "96.4%"] in cells(text, "reviews")
    assert ["payments", "productpage", "0.8", "87.5%"] in cells(text, "payments")

    assert cells(text, "mongodb") == [["mongodb", "2.0 kB/s", "50.0 kB/s"]]
    assert cells(text, "PassthroughCluster") == [["PassthroughCluster", "100 bytes/s",
                                                  "500 bytes/s"]]
    assert "proxies not answering" in text
    assert cells(text, "shop-ratings-proxy-1") == [["shop-ratings-proxy-1", "timed out"]]


def test_an_idle_row_shows_dashes() -> None:
    before, _ = scrapes()
    text = rendered(top_view("shop", traffic(before, before, 2.0), TARGETS, {}))
    assert cells(text, "productpage")[0] == ["productpage", "v1", "0.0", "—", "—", "—"]
    assert "proxies not answering" not in text
    assert "callers" not in text


def test_before_the_second_scrape_the_view_says_it_is_measuring() -> None:
    text = rendered(top_view("shop", None, TARGETS, {"shop-ratings-proxy-1": "HTTP 503"}))
    assert "measuring shop: 5 of 6 proxies answered" in text
    assert cells(text, "shop-ratings-proxy-1") == [["shop-ratings-proxy-1", "HTTP 503"]]


# --------------------------------------------------------------------------- targets


def row(cid: str, name: str, labels: dict[str, str], mode: str,
        networks: dict[str, str]) -> dict[str, Any]:
    """A row of the engine's container list (``GET /containers/json``), as far as top reads."""
    return {
        "Id": cid, "Names": [f"/{name}"], "Labels": {"com.docker.compose.project": NS, **labels},
        "HostConfig": {"NetworkMode": mode},
        "NetworkSettings": {"Networks": {
            net: {"IPAddress": ip, "IPPrefixLen": 16} for net, ip in networks.items()}},
    }


def test_targets_are_the_proxies_at_their_holders_addresses() -> None:
    holder = "a1" * 32
    stopped_holder = "b2" * 32
    proxy_role = {wk.LABEL_ROLE: wk.ROLE_PROXY}
    rows = [
        row(holder, "shop-reviews-v1-netns-1", {wk.LABEL_ROLE: wk.ROLE_NETNS}, "shop_back",
            {"shop_front": "172.21.0.4", "shop_back": "172.22.0.3"}),
        row("c3" * 32, "shop-reviews-v1-proxy-1", proxy_role, f"container:{holder}", {}),
        row("d4" * 32, "shop-reviews-v1-1", {}, f"container:{holder}", {}),  # the app
        row("e5" * 32, "shop-ratings-proxy-1", proxy_role, f"container:{stopped_holder}", {}),
        row("f6" * 32, "shop-ingress-gateway-1", {**proxy_role, wk.LABEL_GATEWAY: "ingress"},
            "shop_front", {"shop_front": "172.21.0.9"}),
    ]
    assert proxy_targets(rows) == [
        Target("shop-ingress-gateway-1", "172.21.0.9"),  # networks of its own
        Target("shop-ratings-proxy-1", None),  # its holder is not running
        Target("shop-reviews-v1-proxy-1", "172.22.0.3"),  # the holder's, first by network
    ]
    assert Target("x", "172.22.0.3").url == "http://172.22.0.3:15090/stats/prometheus"
    assert Target("x", "fd00::3").url == "http://[fd00::3]:15090/stats/prometheus"
    assert Target("x", None).url is None


# --------------------------------------------------------------------------- scraping


def test_scrape_asks_every_proxy_at_once_and_says_why_some_gave_nothing() -> None:
    async def main() -> None:
        answer = reviews_v1(True)

        async def ok(request: web.Request) -> web.Response:
            return web.Response(text=answer, content_type="text/plain")

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(5)
            return web.Response(text=answer)

        async def unavailable(request: web.Request) -> web.Response:
            return web.Response(status=503, text="no")

        async def html(request: web.Request) -> web.Response:
            return web.Response(text="<html>{not metrics</html>", content_type="text/html")

        servers = []
        for handler in (ok, slow, unavailable, html):
            app = web.Application()
            app.router.add_get("/stats/prometheus", handler)
            server = TestServer(app, host="127.0.0.1")
            await server.start_server()
            servers.append(server)
        try:
            ports = [int(s.port or 0) for s in servers]
            targets = [
                Target("ok", "127.0.0.1", ports[0]),
                Target("slow-1", "127.0.0.1", ports[1]),
                Target("slow-2", "127.0.0.1", ports[1]),
                Target("503", "127.0.0.1", ports[2]),
                Target("html", "127.0.0.1", ports[3]),
                Target("refused", "127.0.0.1", free_port()),
                Target("no-address", None),
            ]
            loop = asyncio.get_running_loop()
            started = loop.time()
            got = await scrape(targets, timeout=0.5)
            took = loop.time() - started
        finally:
            for s in servers:
                await s.close()
        assert took < 1.2  # two slow ones at once, not one after the other
        assert got.samples == {"ok": parse_exposition(answer)}
        assert got.failures["slow-1"] == got.failures["slow-2"] == "timed out"
        assert got.failures["503"] == "HTTP 503"
        assert got.failures["html"] == "not Prometheus text"
        assert got.failures["refused"].startswith("unreachable (")
        assert got.failures["no-address"].startswith("no address")
        assert set(got.failures) == {t.name for t in targets} - {"ok"}

    asyncio.run(main())


# --------------------------------------------------------------------------- the command


@pytest.fixture
def counting_proxy() -> Iterator[int]:
    """A proxy's metrics endpoint on localhost (its own thread and loop, so that run_top's
    asyncio.run can call it): reviews v1 answers 4 more requests at every scrape, 3 x 200
    and 1 x 503, all in (5, 10] ms; the port."""
    scrapes_done = [0]

    async def metrics(request: web.Request) -> web.Response:
        n = scrapes_done[0]
        scrapes_done[0] += 1
        text = exposition([
            http_series(istio_labels("destination", PRODUCTPAGE, REVIEWS_V1, "reviews"),
                        {"10": 100 + 3 * n}, 0),
            http_series(istio_labels("destination", PRODUCTPAGE, REVIEWS_V1, "reviews",
                                     code="503"), {"10": 1 * n}, 0),
        ])
        return web.Response(text=text, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/stats/prometheus", metrics)
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_once_prints_one_table_from_two_scrapes(
        monkeypatch: pytest.MonkeyPatch, counting_proxy: int) -> None:
    targets = [Target("shop-reviews-v1-proxy-1", "127.0.0.1", counting_proxy),
               Target("shop-ratings-proxy-1", "127.0.0.1", free_port())]
    monkeypatch.setattr(cli_top, "discover_targets", lambda project: targets)
    console = Console(record=True, width=110, color_system=None)
    run_top("shop", interval=0.3, once=True, console=console)
    text = console.export_text()
    (v1,) = cells(text, "v1")
    # 4 requests in one interval (~0.3 s), 3 without a 5xx; all in (5, 10]:
    # p50 rank 2 of 4: 5 + 5 * 2/4 = 7.5, p99 rank 3.96: 5 + 5 * 3.96/4 = 9.95
    assert v1[:2] == ["reviews", "v1"]
    assert 8.0 <= float(v1[2]) <= 14.0  # 4 / (0.3 s, and the scrape's own time)
    assert v1[3:] == ["75.0%", "7.5", "9.9"]  # 9.95 to one place, as Python rounds it
    assert "1 of 2 proxies measured" in text
    assert cells(text, "shop-ratings-proxy-1")[0][1].startswith("unreachable (")


def test_no_proxies_is_one_sentence_and_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_top, "discover_targets", lambda project: [])
    with pytest.raises(MeshError, match=r"^project 'shop' has no running proxies"):
        run_top("shop", interval=0.1, once=True)
    result = CliRunner().invoke(cli.main, ["top", "-p", "shop", "--once"])
    assert result.exit_code == 1
    assert "error: project 'shop' has no running proxies: is it up" in result.output
    assert "Traceback" not in result.output


def test_ctrl_c_ends_the_live_view_with_exit_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_top, "discover_targets",
                        lambda project: [Target("shop-reviews-v1-proxy-1", "127.0.0.1")])

    async def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_top, "_watch", interrupted)
    result = CliRunner().invoke(cli.main, ["top", "-p", "shop", "-n", "0.1"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def test_the_live_view_updates_with_the_rates(
        monkeypatch: pytest.MonkeyPatch, counting_proxy: int) -> None:
    targets = [Target("shop-reviews-v1-proxy-1", "127.0.0.1", counting_proxy)]
    monkeypatch.setattr(cli_top, "discover_targets", lambda project: targets)
    console = Console(record=True, width=110, color_system=None)

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(cli_top._watch("shop", targets, 0.2, console), 0.9)

    asyncio.run(main())
    text = console.export_text()
    (v1,) = cells(text, "v1")[-1:]
    assert v1[:2] == ["reviews", "v1"] and v1[3:] == ["75.0%", "7.5", "9.9"]
