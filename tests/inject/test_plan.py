"""The plan `composemesh check` shows: one row per user service."""

from __future__ import annotations

from rich.console import Console

from composemesh.inject import plan_rows, render_plan
from composemesh.inject.plan import COLUMNS

from .casefiles import injected


def test_rows_say_holder_proxy_and_why() -> None:
    rows = {row[0]: row for row in plan_rows(injected("network_mode_service_meshed"))}
    assert rows["app"] == ("app", "v1", "app-netns", "app-proxy", "")
    assert rows["debug (app)"][2:4] == ("app-netns", "app-proxy")
    assert "shares the network namespace" in rows["debug (app)"][4]


def test_rows_for_versions_replicas_and_left_out_services() -> None:
    rows = {row[0]: row for row in plan_rows(injected("bookinfo"))}
    assert rows["reviews-v2 (reviews)"][:4] == (
        "reviews-v2 (reviews)", "v2", "reviews-v2-netns", "reviews-v2-proxy",
    )
    replicas = {row[0]: row for row in plan_rows(injected("replicas"))}
    assert replicas["worker-3 (worker)"][4] == "instance 3 of 3 of service 'worker'"
    assert "stays on the first instance only" in replicas["worker"][4]
    host = {row[0]: row for row in plan_rows(injected("network_mode_host"))}
    assert host["node-exporter"][1:4] == ("-", "-", "-")
    assert "left out of the mesh" in host["node-exporter"][4]
    disabled = {row[0]: row for row in plan_rows(injected("disabled"))}
    assert disabled["db"][4] == "composemesh.enable=false: not in the mesh"


def test_render_plan_is_a_table_with_the_columns() -> None:
    table = render_plan(injected("bookinfo"))
    assert [c.header for c in table.columns] == list(COLUMNS)
    assert table.row_count == 6
    console = Console(width=160, record=True)
    console.print(table)
    text = console.export_text()
    assert "reviews-v3-proxy" in text and "netns holder" in text
