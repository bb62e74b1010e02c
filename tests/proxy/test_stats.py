"""The counters' exposition: Istio's metric names and labels in Prometheus text, and JSON."""

from __future__ import annotations

from composemesh.model.snapshot import ProxyIdentity
from composemesh.proxy.stats import (
    INBOUND,
    OUTBOUND,
    PeerLabels,
    ProxyStats,
    TcpLabels,
    label_names,
    passthrough_labels,
    workload_of,
)

ME = workload_of(ProxyIdentity(node="shop-web-netns-1", project="shop",
                               compose_service="web-v2", service="web", version="v2"))


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
    assert series["istio_tcp_connections_opened_total"].endswith("} 3")
    assert series["istio_tcp_connections_closed_total"].endswith("} 2")
    assert series["istio_tcp_sent_bytes_total"].endswith("} 1234")
    assert series["istio_tcp_received_bytes_total"].endswith("} 56")
    sent = series["istio_tcp_sent_bytes_total"]
    assert 'reporter="destination"' in sent
    assert 'destination_workload="web-v2"' in sent
    assert 'destination_service="web"' in sent
    assert 'source_workload="unknown"' in sent
    assert ('composemesh_proxy_tcp_errors_total{direction="inbound",kind="connect_failed"} 1'
            in lines)
    assert text.endswith("\n")


def test_label_values_are_escaped() -> None:
    stats = ProxyStats()
    stats.tcp(TcpLabels(reporter="source", destination_service='a"b\\c\nd')).opened = 1
    assert 'destination_service="a\\"b\\\\c\\nd"' in stats.prometheus_text()


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
