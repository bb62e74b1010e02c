"""The counters' exposition: Istio's metric names and labels in Prometheus text, and JSON."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from composemesh.model.snapshot import ProxyIdentity
from composemesh.proxy.stats import (
    DURATION_BUCKETS,
    INBOUND,
    MUTUAL_TLS,
    OUTBOUND,
    UNKNOWN,
    PeerLabels,
    ProxyStats,
    TcpLabels,
    http_label_items,
    inbound_label_items,
    label_names,
    passthrough_labels,
    render,
    workload_of,
)

ME = workload_of(ProxyIdentity(node="shop-web-netns-1", project="shop",
                               compose_service="web-v2", service="web", version="v2"))
# What Prometheus (2.x and 3.x) sends by default
OPENMETRICS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                      "application/openmetrics-text;version=0.0.1;q=0.75,"
                      "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
REVIEWS = "spiffe://cluster.local/ns/shop/sa/reviews"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def samples(stats: ProxyStats, accept: str = "") -> Samples:
    """The exposition read back by prometheus_client's parser for its format (the strict
    OpenMetrics one for OpenMetrics): sample name -> [(labels, value)], in order."""
    body, content_type = render(stats, accept)
    openmetrics = content_type.startswith("application/openmetrics-text")
    parse: Any = (openmetrics_parser.text_string_to_metric_families if openmetrics
                  else text_string_to_metric_families)
    out: Samples = {}
    for family in parse(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def test_a_proxys_workload_as_istio_names_it() -> None:
    assert PeerLabels(workload="web-v2", namespace="shop", app="web", version="v2") == ME


def test_outbound_reports_as_source_and_inbound_as_destination() -> None:
    out = dict(passthrough_labels(OUTBOUND, ME).items())
    assert out["reporter"] == "source"
    assert (out["source_workload"], out["source_app"], out["source_version"]) == \
        ("web-v2", "web", "v2")
    assert out["destination_service_name"] == "PassthroughCluster"
    assert out["destination_workload"] == "unknown"
    inb = dict(passthrough_labels(INBOUND, ME).items())
    assert inb["reporter"] == "destination"
    assert (inb["destination_workload"], inb["destination_service"],
            inb["destination_workload_namespace"]) == ("web-v2", "web", "shop")
    assert inb["source_workload"] == "unknown"
    assert inb["connection_security_policy"] == "none"
    assert inb["request_protocol"] == "tcp"


def test_istios_standard_tcp_labels_are_all_there() -> None:
    assert set(label_names()) >= {
        "reporter", "source_workload", "source_workload_namespace", "source_principal",
        "source_app", "source_version", "source_canonical_service", "source_canonical_revision",
        "destination_workload", "destination_workload_namespace", "destination_principal",
        "destination_app", "destination_version", "destination_service",
        "destination_service_name", "destination_service_namespace",
        "destination_canonical_service", "destination_canonical_revision",
        "request_protocol", "response_flags", "connection_security_policy",
    }


def test_prometheus_text_has_istios_names_labels_and_values() -> None:
    stats = ProxyStats()
    counters = stats.tcp(passthrough_labels(INBOUND, ME))
    counters.opened, counters.closed, counters.sent, counters.received = 3, 2, 1234, 56
    stats.error(INBOUND, "connect_failed")
    text = stats.prometheus_text()
    lines = text.splitlines()

    assert "# TYPE istio_tcp_connections_opened_total counter" in lines
    series = {line.split("{")[0]: line for line in lines if not line.startswith("#")
              and line.startswith("istio_")}
    assert set(series) == {"istio_tcp_connections_opened_total",
                           "istio_tcp_connections_closed_total",
                           "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"}
    assert series["istio_tcp_connections_opened_total"].endswith("} 3.0")
    assert series["istio_tcp_connections_closed_total"].endswith("} 2.0")
    assert series["istio_tcp_sent_bytes_total"].endswith("} 1234.0")
    assert series["istio_tcp_received_bytes_total"].endswith("} 56.0")
    sent = series["istio_tcp_sent_bytes_total"]
    assert 'reporter="destination"' in sent
    assert 'destination_workload="web-v2"' in sent
    assert 'destination_service="web"' in sent
    assert 'source_workload="unknown"' in sent
    assert ('composemesh_proxy_tcp_errors_total{direction="inbound",kind="connect_failed"} 1.0'
            in lines)
    assert text.endswith("\n")


def test_label_values_are_escaped() -> None:
    stats = ProxyStats()
    stats.tcp(TcpLabels(reporter="source", destination_service='a"b\\c\nd')).opened = 1
    assert 'destination_service="a\\"b\\\\c\\nd"' in stats.prometheus_text()
    for accept in ("", OPENMETRICS_ACCEPT):  # and both formats read it back as it was
        body, _ = render(stats, accept)
        assert 'destination_service="a\\"b\\\\c\\nd"' in body.decode()
        assert samples(stats, accept)["istio_tcp_connections_opened_total"][0][0][
            "destination_service"] == 'a"b\\c\nd'


def test_totals_per_direction() -> None:
    stats = ProxyStats()
    out_a = stats.tcp(passthrough_labels(OUTBOUND, ME))
    out_b = stats.tcp(passthrough_labels(OUTBOUND, PeerLabels(app="other")))
    assert stats.tcp(passthrough_labels(OUTBOUND, ME)) is out_a
    out_a.opened, out_a.closed, out_a.received, out_a.sent = 2, 1, 10, 20
    out_b.opened, out_b.received = 1, 5
    stats.error(OUTBOUND, "loop")
    totals = stats.totals()
    assert totals[OUTBOUND]["connections_opened"] == 3
    assert totals[OUTBOUND]["connections_active"] == 2
    assert totals[OUTBOUND]["bytes_received"] == 15
    assert totals[OUTBOUND]["bytes_sent"] == 20
    assert totals[OUTBOUND]["errors"] == 1
    assert totals[OUTBOUND]["errors_by_kind"]["loop"] == 1
    assert totals[INBOUND]["connections_opened"] == 0


def small_mesh() -> ProxyStats:
    """Two outbound HTTP series (one with the destination's principal), one inbound, one TCP."""
    stats = ProxyStats()
    for duration in (0.2, 0.5, 3.0, 700.0):
        stats.http_request(ME, "reviews", "v1", "reviews-v1", "10.0.0.7", 200, "-", duration,
                           100, 2000, principal=REVIEWS)
    stats.http_request(ME, "reviews", "v1", "reviews-v1", "10.0.0.7", 503, "UF", 4000000.0,
                       100, 0)  # positional, as the callers pass them: principal unknown
    stats.http_inbound_request(PeerLabels(app="productpage", principal="spiffe://p"), ME, 200,
                               "-", MUTUAL_TLS, 1.0, 10, 20)
    stats.tcp(passthrough_labels(OUTBOUND, ME)).opened = 4
    return stats


OK_KEY = (ME, "reviews", "v1", "reviews-v1", 200, "-", REVIEWS)
UF_KEY = (ME, "reviews", "v1", "reviews-v1", 503, "UF", UNKNOWN)
IN_KEY = (PeerLabels(app="productpage", principal="spiffe://p"), ME, 200, "-", MUTUAL_TLS)


@pytest.mark.parametrize("accept", ["", OPENMETRICS_ACCEPT])
def test_the_exposition_read_back_has_every_series_label_and_value(accept: str) -> None:
    got = samples(small_mesh(), accept)
    ok, uf = dict(http_label_items(OK_KEY)), dict(http_label_items(UF_KEY))
    inbound = dict(inbound_label_items(IN_KEY))
    assert got["istio_requests_total"] == [(ok, 4.0), (uf, 1.0), (inbound, 1.0)]
    assert got["istio_tcp_connections_opened_total"] == [
        (dict(passthrough_labels(OUTBOUND, ME).items()), 4.0)]
    # every label set exactly Istio's: the TCP labels, and response_code for HTTP
    assert set(ok) == set(label_names()) | {"response_code"}
    assert ok["destination_principal"] == REVIEWS and uf["destination_principal"] == UNKNOWN
    assert ok["reporter"] == "source" and inbound["reporter"] == "destination"

    name = "istio_request_duration_milliseconds"
    buckets = [(labels["le"], value) for labels, value in got[f"{name}_bucket"]
               if labels["response_code"] == "200" and labels["reporter"] == "source"]
    les = [f"{bound:g}" for bound in DURATION_BUCKETS] + ["+Inf"]
    assert [le for le, _ in buckets] == les  # as Envoy prints them: 0.5, 1, ..., 3.6e+06
    assert les[:2] == ["0.5", "1"] and "3.6e+06" in les
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)  # cumulative
    assert dict(buckets)["0.5"] == 2 and dict(buckets)["1"] == 2 and dict(buckets)["5"] == 3
    assert dict(buckets)["1000"] == dict(buckets)["+Inf"] == 4
    assert (ok, 4.0) in got[f"{name}_count"] and (ok, 703.7) in got[f"{name}_sum"]
    assert (uf, 4000000.0) in got[f"{name}_sum"]  # not rounded to 6 digits
    uf_buckets = [v for labels, v in got[f"{name}_bucket"] if labels["response_code"] == "503"]
    assert uf_buckets == [0.0] * len(DURATION_BUCKETS) + [1.0]  # above every bound: +Inf only
    for metric in ("istio_request_bytes", "istio_response_bytes", name):
        requests = {tuple(sorted(labels.items())): value
                    for labels, value in got["istio_requests_total"]}
        counts_by_series = {tuple(sorted(labels.items())): value
                            for labels, value in got[f"{metric}_count"]}
        assert counts_by_series == requests  # _count == istio_requests_total, per series
    assert (ok, 8000.0) in got["istio_response_bytes_sum"]
    assert ({"direction": "outbound", "kind": "loop"}, 0.0) in \
        got["composemesh_proxy_tcp_errors_total"]


def test_metric_names_and_types_in_the_text_format_are_istios() -> None:
    body, content_type = render(small_mesh(), "")
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    types = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert types == [
        "# TYPE istio_tcp_connections_opened_total counter",
        "# TYPE istio_tcp_connections_closed_total counter",
        "# TYPE istio_tcp_sent_bytes_total counter",
        "# TYPE istio_tcp_received_bytes_total counter",
        "# TYPE istio_requests_total counter",
        "# TYPE istio_request_duration_milliseconds histogram",
        "# TYPE istio_request_bytes histogram",
        "# TYPE istio_response_bytes histogram",
        "# TYPE composemesh_proxy_tcp_errors_total counter",
    ]
    names = {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}
    assert names == {
        "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total",
        "istio_requests_total", "composemesh_proxy_tcp_errors_total",
        *(f"{metric}_{suffix}"
          for metric in ("istio_request_duration_milliseconds", "istio_request_bytes",
                         "istio_response_bytes")
          for suffix in ("bucket", "sum", "count")),
    }  # and no _created series
    assert text == small_mesh().prometheus_text() and not text.endswith("# EOF\n")


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    stats = small_mesh()
    body, content_type = render(stats, OPENMETRICS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0;")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE istio_requests counter" in text  # OpenMetrics names the family ...
    assert "\nistio_requests_total{" in text  # ... and its samples keep _total
    assert "# TYPE istio_request_duration_milliseconds histogram" in text
    assert samples(stats, OPENMETRICS_ACCEPT) == samples(stats, "")  # the same series
    assert render(stats, "text/plain;version=0.0.4")[1].startswith("text/plain; version=0.0.4")
    assert render(stats, None)[1].startswith("text/plain; version=0.0.4")


def test_destination_principal_is_part_of_the_series() -> None:
    stats = ProxyStats()
    call = (ME, "reviews", "v1", "reviews-v1", None, 200, "-", 1.0, 1, 1)
    stats.http_request(*call, principal=REVIEWS)
    stats.http_request(*call, principal=REVIEWS)
    stats.http_request(*call, principal="spiffe://cluster.local/ns/shop/sa/other")
    stats.http_request(*call)
    got = {labels["destination_principal"]: value
           for labels, value in samples(stats)["istio_requests_total"]}
    assert got == {REVIEWS: 2.0, "spiffe://cluster.local/ns/shop/sa/other": 1.0, UNKNOWN: 1.0}
    assert stats.http_totals()["requests_by_version"] == {"reviews": {"v1": 4}}


def test_each_proxy_has_its_own_registry_not_the_global_one() -> None:
    one, two = ProxyStats(), ProxyStats()
    one.tcp(passthrough_labels(OUTBOUND, ME)).opened = 1
    assert one.registry is not two.registry and one.registry is not REGISTRY
    assert "istio_tcp_connections_opened_total" in samples(one)
    assert "istio_tcp_connections_opened_total" not in samples(two)  # no series yet
    assert REGISTRY.get_sample_value("istio_tcp_connections_opened_total") is None
    assert render(one.registry, "") == render(one, "")
