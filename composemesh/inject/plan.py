"""The plan shown to the user: which services join the mesh, with which holder and proxy."""

from __future__ import annotations

from rich.table import Table

from composemesh.inject.rewrite import InjectResult
from composemesh.model.wellknown import (
    DEFAULT_VERSION,
    EAST_WEST_GATEWAY,
    EGRESS_GATEWAY,
    GRAFANA_PROFILE,
    GRAFANA_SERVICE,
    INGRESS_GATEWAY,
    PROMETHEUS_SERVICE,
    netns_service,
    proxy_service,
)

COLUMNS = ("service", "version", "netns holder", "proxy", "notes")


def plan_rows(result: InjectResult) -> list[tuple[str, str, str, str, str]]:
    """One row per user compose service, as plain text (``-`` where it does not apply)."""
    rows = []
    for plan in result.services:
        service = plan.service
        if plan.mesh_service and plan.mesh_service != plan.service:
            service = f"{plan.service} ({plan.mesh_service})"
        rows.append(
            (
                service,
                plan.version or "-",
                plan.netns or "-",
                plan.proxy or "-",
                "; ".join(plan.notes) or ("" if plan.netns else "not in the mesh"),
            )
        )
    ingress = result.ingress
    if ingress is not None:  # the gateway is a mesh service of the mesh's own
        routes = [f"{h.name}{r.path} -> {r.service}:{r.port}" for h in ingress.hosts
                  for r in h.routes]
        ports = [f"{scheme} {ingress.bind}:{port}" for scheme, port in
                 (("http", ingress.http_port), ("https", ingress.https_port)) if port]
        rows.append((f"{INGRESS_GATEWAY} (added)", DEFAULT_VERSION,
                     netns_service(INGRESS_GATEWAY), proxy_service(INGRESS_GATEWAY),
                     "; ".join([", ".join(ports), *routes])))
    egress = result.egress
    if egress is not None and egress.hosts:
        hosts = [f"{h.host}:{h.port} {h.protocol}" + (" +tls" if h.origination else "")
                 for h in egress.hosts]
        rows.append((f"{EGRESS_GATEWAY} (added)", DEFAULT_VERSION,
                     netns_service(EGRESS_GATEWAY), proxy_service(EGRESS_GATEWAY),
                     "; ".join([egress.policy, *hosts])))
    if result.east_west_port is not None:  # x-composemesh.consul: other hosts come in here
        rows.append((f"{EAST_WEST_GATEWAY} (added)", DEFAULT_VERSION,
                     netns_service(EAST_WEST_GATEWAY), proxy_service(EAST_WEST_GATEWAY),
                     f"tcp *:{result.east_west_port}; other hosts' sidecars, by SNI "
                     "(mTLS passed through)"))
    rows.extend(monitoring_rows(result))
    return rows


def monitoring_rows(result: InjectResult) -> list[tuple[str, str, str, str, str]]:
    """The monitoring add-on's services: not in the mesh (no holder, no proxy), where the
    host reaches them."""
    monitoring = result.monitoring
    if monitoring is None or monitoring.prometheus is None:
        return []
    prom = monitoring.prometheus
    rows = [(f"{PROMETHEUS_SERVICE} (added)", "-", "-", "-",
             f"http://{_host(prom.bind)}:{prom.port}; scrapes the pilot's service discovery "
             f"every {prom.scrape_interval}s, keeps {prom.retention}")]
    graf = monitoring.grafana
    if graf is not None:
        rows.append((f"{GRAFANA_SERVICE} (added)", "-", "-", "-",
                     f"http://{_host(graf.bind)}:{graf.port}; {graf.image}, profile "
                     f"{GRAFANA_PROFILE}: `up` starts it when the engine has or can pull it"))
    return rows


def _host(bind: str) -> str:
    return f"[{bind}]" if ":" in bind else bind


def render_plan(result: InjectResult) -> Table:
    """The plan as a rich table."""
    table = Table(title="composemesh plan", title_justify="left")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in plan_rows(result):
        style = None if row[2] != "-" else "dim"
        table.add_row(*row, style=style)
    return table
