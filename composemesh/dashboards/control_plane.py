"""The control-plane dashboard: the pilot's view of the mesh (connected proxies, config pushes
and their ACKs, certificates, discovery)."""

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
    row,
    single,
    target,
)

UID = "composemesh-control-plane"
TITLE = "composemesh / Control plane"


def control_plane_dashboard() -> dashboard.Dashboard:
    """The control-plane dashboard's builder. Its one filter is the pilot's project
    (``namespace`` on the scrape target): the pilot's metrics have no per-service labels."""
    return (
        dashboard.Dashboard(TITLE)
        .uid(UID)
        .description("The composemesh pilot: proxies connected, config pushes, push-to-ACK "
                     "convergence, ACKs and NACKs, certificates, services and Docker events.")
        .tags(TAGS)
        .refresh(REFRESH)
        .time("now-1h", "now")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .annotation(builtin_annotations())
        .with_variable(datasource_variable())
        .with_variable(filter_variable(
            "namespace", "Namespace", f"label_values({q.PILOT_PROXIES}, namespace)"))
        .with_row(row("Overview"))
        .with_panel(single("Connected proxies", "Proxies holding a config stream to the pilot.",
                           "short", target(q.connected_proxies(), "proxies")))
        .with_panel(single("Services", "Mesh services the pilot knows.", "short",
                           target(q.gauge(q.PILOT_SERVICES), "services")))
        .with_panel(single("Workloads", "Workloads (container instances) the pilot knows.",
                           "short", target(q.gauge(q.PILOT_WORKLOADS), "workloads")))
        .with_panel(single("Convergence p99", "99th percentile of push-to-ACK time.", "s",
                           target(q.convergence(0.99), "p99")))
        .with_row(row("Config distribution"))
        .with_panel(graph("Connected proxies over time", "Proxies holding a config stream.",
                          "short", [target(q.connected_proxies(), "proxies")]))
        .with_panel(graph("Push rate", "Config snapshots pushed per second, per push type.",
                          "ops", [target(q.push_rate(), "{{type}}")]))
        .with_panel(graph(
            "Convergence p50 / p99", "Time from a push to the proxy's ACK of it.", "s",
            [target(q.convergence(0.5), "p50", "A"), target(q.convergence(0.99), "p99", "B")]))
        .with_panel(graph("ACK vs NACK rate", "Snapshots the proxies applied (ack) and "
                          "rejected (nack), per second.", "ops",
                          [target(q.acks(), "{{outcome}}")]))
        .with_row(row("CA and discovery"))
        .with_panel(graph("Certificates issued", "Workload certificates signed per second, "
                          "per outcome.", "ops", [target(q.certificates_issued(), "{{outcome}}")]))
        .with_panel(graph("Services and workloads", "What the pilot's model holds.", "short",
                          [target(q.gauge(q.PILOT_SERVICES), "services", "A"),
                           target(q.gauge(q.PILOT_WORKLOADS), "workloads", "B")]))
        .with_panel(graph("Docker event rate", "Docker engine events the pilot read, per "
                          "second.", "ops", [target(q.docker_events(), "events")], width=24))
    )
