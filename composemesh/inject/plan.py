"""The plan shown to the user: which services join the mesh, with which holder and proxy."""

from __future__ import annotations

from rich.table import Table

from composemesh.inject.rewrite import InjectResult

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
    return rows


def render_plan(result: InjectResult) -> Table:
    """The plan as a rich table."""
    table = Table(title="composemesh plan", title_justify="left")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in plan_rows(result):
        style = None if row[2] != "-" else "dim"
        table.add_row(*row, style=style)
    return table
