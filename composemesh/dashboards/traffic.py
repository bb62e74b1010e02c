"""The traffic dashboard: what the mesh's proxies saw of requests and connections, per
destination service and version (Istio's standard metrics, as the destination reports them)."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync

from composemesh.dashboards import queries as q
from composemesh.dashboards.panels import (
    REFRESH,
    TAGS,
    builtin_annotations,
    datasource_variable,
    filter_variable,
    graph,
    grid,
    instant_target,
    row,
    single,
    target,
)

UID = "composemesh-traffic"
TITLE = "composemesh / Traffic"

SERVICE_VERSION = "{{destination_service_name}} {{destination_version}}"


def traffic_dashboard() -> dashboard.Dashboard:
    """The traffic dashboard's builder."""
    return (
        dashboard.Dashboard(TITLE)
        .uid(UID)
        .description("Requests, latency, TCP and mTLS per destination service and version, "
                     "from the composemesh proxies' Istio metrics (reporter=\"destination\").")
        .tags(TAGS)
        .refresh(REFRESH)
        .time("now-1h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .annotation(builtin_annotations())
        .with_variable(datasource_variable())
        .with_variable(filter_variable(
            "namespace", "Namespace",
            f"label_values({q.REQUESTS}, destination_service_namespace)"))
        .with_variable(filter_variable(
            "service", "Service", f"label_values({q.REQUESTS}, destination_service_name)"))
        .with_variable(filter_variable(
            "version", "Version",
            f'label_values({q.REQUESTS}{{destination_service_name=~"$service"}}, '
            "destination_version)"))
        .with_row(row("Overview"))
        .with_panel(single("Request rate", "Requests per second into the selected services.",
                           "reqps", target(q.request_rate(()), "requests")))
        .with_panel(single("Success rate", "Share of requests answered without a 5xx.",
                           "percentunit", target(q.success_rate(()), "success")))
        .with_panel(single("p99 latency", "99th percentile of request duration.",
                           "ms", target(q.latency(0.99, ()), "p99")))
        .with_panel(single("mTLS coverage", "Share of requests that arrived over mutual TLS.",
                           "percentunit", target(q.mtls_share(q.REQUESTS, ()), "mTLS")))
        .with_row(row("HTTP"))
        .with_panel(graph(
            "Requests per service", "Requests per second per destination service and version.",
            "reqps", [target(q.request_rate(), SERVICE_VERSION)]))
        .with_panel(graph(
            "Success rate per service",
            "Share of requests answered without a 5xx, per destination service and version.",
            "percentunit", [target(q.success_rate(), SERVICE_VERSION)]))
        .with_panel(graph(
            "Request duration p50 / p90 / p99",
            "Quantiles of request duration at the destination proxy, per service and version.",
            "ms",
            [target(q.latency(quantile), f"p{round(quantile * 100)} {SERVICE_VERSION}", ref)
             for quantile, ref in zip(q.QUANTILES, "ABC", strict=True)],
            width=24))
        .with_row(row("TCP"))
        .with_panel(graph(
            "TCP bytes", "Bytes per second the destination proxy received from and sent back "
            "to its callers, per service and version.", "Bps",
            [target(q.tcp_bytes(q.TCP_RECEIVED_BYTES), f"received {SERVICE_VERSION}", "A"),
             target(q.tcp_bytes(q.TCP_SENT_BYTES), f"sent {SERVICE_VERSION}", "B")]))
        .with_panel(graph(
            "TCP connections opened", "Connections opened per second into each service and "
            "version.", "cps", [target(q.tcp_opened(), SERVICE_VERSION)]))
        .with_row(row("Security and callers"))
        .with_panel(graph(
            "mTLS coverage per service",
            "Share of requests and of TCP connections that arrived over mutual TLS, as the "
            "destination proxy saw them.", "percentunit",
            [target(q.mtls_share(q.REQUESTS), "requests {{destination_service_name}}", "A"),
             target(q.mtls_share(q.TCP_OPENED), "connections {{destination_service_name}}",
                    "B")]))
        .with_panel(grid(
            "Top callers", "The source workloads sending the most requests to each service.",
            [instant_target(q.top_callers(), "A")], {"Value #A": "req/s"}, width=12))
        .with_panel(grid(
            "Services", "Each destination service and version: request rate, success rate, "
            "p99 latency and mTLS coverage.",
            [instant_target(q.request_rate(), "A"),
             instant_target(q.success_rate(), "B"),
             instant_target(q.latency(0.99), "C"),
             instant_target(q.mtls_share(q.REQUESTS, q.BY_SERVICE_VERSION), "D")],
            {"destination_service_name": "service", "destination_version": "version",
             "Value #A": "req/s", "Value #B": "success", "Value #C": "p99 (ms)",
             "Value #D": "mTLS"}))
    )
