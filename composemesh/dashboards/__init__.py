"""The mesh's Grafana dashboards (traffic, control plane), generated as code with the Grafana
Foundation SDK, and the helpers that read their queries back."""

from composemesh.dashboards.render import (
    all_dashboards,
    panel_queries,
    resolve_query,
    write_dashboards,
)

__all__ = ["all_dashboards", "panel_queries", "resolve_query", "write_dashboards"]
