"""The dashboards' fixed facts: uids, titles, variables, panels, datasources, and queries that
parse as PromQL, name only the mesh's metrics and use the variables only in regex matchers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from composemesh.dashboards import all_dashboards, panel_queries, resolve_query, write_dashboards

DASHBOARDS = all_dashboards()
TRAFFIC = DASHBOARDS["composemesh-traffic"]
CONTROL_PLANE = DASHBOARDS["composemesh-control-plane"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The metric names as the proxies and the pilot expose them (a histogram by its _bucket).
ISTIO_METRICS = {
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_bytes_bucket",
    "istio_response_bytes_bucket",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
}
PILOT_METRICS = {
    "pilot_xds",
    "pilot_xds_pushes_total",
    "pilot_proxy_convergence_time_bucket",
    "pilot_xds_acks_total",
    "citadel_server_certificates_total",
    "pilot_services",
    "pilot_workloads",
    "pilot_docker_events_total",
}
# Each dashboard's filter variables and the label each one must filter.
FILTERS = {
    "composemesh-traffic": {"namespace": "destination_service_namespace",
                            "service": "destination_service_name",
                            "version": "destination_version"},
    "composemesh-control-plane": {"namespace": "namespace"},
}
SENTINEL = "SENTINEL_{}_"


def all_panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in model["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def nodes(expr: str) -> list[Any]:
    seen: list[Any] = []
    promql_parser.walk(promql_parser.parse(expr), lambda node, *_: seen.append(node))
    return seen


def selectors(expr: str) -> list[Any]:
    return [n for n in nodes(expr) if isinstance(n, promql_parser.VectorSelector)]


def queries(stem: str) -> list[tuple[str, str]]:
    return panel_queries(DASHBOARDS[stem])


QUERIES = [(stem, title, expr) for stem in DASHBOARDS for title, expr in queries(stem)]


def test_files_uids_and_titles_are_fixed() -> None:
    assert list(DASHBOARDS) == ["composemesh-traffic", "composemesh-control-plane"]
    assert (TRAFFIC["uid"], TRAFFIC["title"]) == ("composemesh-traffic", "composemesh / Traffic")
    assert (CONTROL_PLANE["uid"], CONTROL_PLANE["title"]) == (
        "composemesh-control-plane", "composemesh / Control plane")
    assert TRAFFIC["schemaVersion"] == 39  # Grafana 11.3's


def test_traffic_panels() -> None:
    assert [p["title"] for p in all_panels(TRAFFIC) if p["type"] != "row"] == [
        "Request rate", "Success rate", "p99 latency", "mTLS coverage",
        "Requests per service", "Success rate per service", "Request duration p50 / p90 / p99",
        "TCP bytes", "TCP connections opened",
        "mTLS coverage per service", "Top callers", "Services",
    ]
    by_title = {p["title"]: p for p in all_panels(TRAFFIC)}
    assert by_title["Services"]["type"] == by_title["Top callers"]["type"] == "table"
    assert all(t["instant"] and t["format"] == "table"
               for t in by_title["Services"]["targets"])


def test_control_plane_panels() -> None:
    assert [p["title"] for p in all_panels(CONTROL_PLANE) if p["type"] != "row"] == [
        "Connected proxies", "Services", "Workloads", "Convergence p99",
        "Connected proxies over time", "Push rate", "Convergence p50 / p99", "ACK vs NACK rate",
        "Certificates issued", "Services and workloads", "Docker event rate",
    ]


def test_panel_ids_are_unique() -> None:
    for model in DASHBOARDS.values():
        ids = [p["id"] for p in all_panels(model)]
        assert len(ids) == len(set(ids)) and 0 not in ids


@pytest.mark.parametrize("stem", list(DASHBOARDS))
def test_variables(stem: str) -> None:
    variables = DASHBOARDS[stem]["templating"]["list"]
    assert [v["name"] for v in variables] == ["datasource", *FILTERS[stem]]
    datasource = variables[0]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    for v in variables[1:]:
        assert v["type"] == "query"
        assert v["datasource"] == DATASOURCE
        assert v["includeAll"] is True and v["multi"] is True
        assert v["allValue"] == ".*"
        assert v["current"]["value"] == "$__all"
        assert v["query"].startswith("label_values(")


def test_the_service_variable_lists_destination_services() -> None:
    service = next(v for v in TRAFFIC["templating"]["list"] if v["name"] == "service")
    assert service["query"] == "label_values(istio_requests_total, destination_service_name)"


@pytest.mark.parametrize("stem", list(DASHBOARDS))
def test_every_panel_and_target_reads_the_datasource_variable(stem: str) -> None:
    for panel in all_panels(DASHBOARDS[stem]):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
        for t in panel.get("targets", []):
            assert t["datasource"] == DATASOURCE, panel["title"]


@pytest.mark.parametrize(("stem", "title", "expr"), QUERIES)
def test_query_parses_and_names_only_the_mesh_metrics(stem: str, title: str, expr: str) -> None:
    resolved = resolve_query(expr)
    allowed = ISTIO_METRICS if stem == "composemesh-traffic" else PILOT_METRICS
    found = selectors(resolved)
    assert found, title
    for s in found:
        assert s.name in allowed, (title, s.name)
    # the plain structural sanity, independent of the parser
    for left, right in ("()", "{}", "[]"):
        assert resolved.count(left) == resolved.count(right), (title, left)


@pytest.mark.parametrize(("stem", "title", "expr"), QUERIES)
def test_variables_appear_only_in_regex_matchers_of_their_label(
        stem: str, title: str, expr: str) -> None:
    filters = FILTERS[stem]
    sentinels = {name: SENTINEL.format(name) for name in filters}
    resolved = resolve_query(expr, sentinels)
    uses = 0
    for s in selectors(resolved):
        matched = {m.value: m for m in s.matchers.matchers if m.value in sentinels.values()}
        # every selector filters on every variable of its dashboard ...
        assert set(matched) == set(sentinels.values()), (title, s.name)
        for name, sentinel in sentinels.items():
            m = matched[sentinel]
            # ... with a regex matcher on that variable's label, so ".*" selects all
            assert m.op == promql_parser.MatchOp.Re and m.name == filters[name], (title, m.name)
            uses += 1
    # and nowhere else (not in a label of by (...), not in a string of its own)
    assert sum(resolved.count(s) for s in sentinels.values()) == uses, title


@pytest.mark.parametrize(("stem", "title", "expr"), QUERIES)
def test_counters_are_rated_over_the_rate_interval(stem: str, title: str, expr: str) -> None:
    assert re.findall(r"\[([^\]]*)\]", expr) == ["$__rate_interval"] * expr.count("rate(")
    for n in nodes(resolve_query(expr, {"__rate_interval": "7m"})):
        if isinstance(n, promql_parser.MatrixSelector):
            assert n.range.total_seconds() == 7 * 60, title
    for s in selectors(resolve_query(expr)):
        if s.name.endswith("_total") or s.name.endswith("_bucket"):
            assert f"rate({s.name}" in expr, (title, s.name)


@pytest.mark.parametrize(("stem", "title", "expr"), QUERIES)
def test_no_query_needs_errors_to_have_data(stem: str, title: str, expr: str) -> None:
    """A healthy mesh has no 5xx: no query may select only errors (it would be empty)."""
    for s in selectors(resolve_query(expr)):
        for m in s.matchers.matchers:
            if m.name == "response_code":
                assert m.op == promql_parser.MatchOp.NotRe and m.value == "5..", title


def test_traffic_reads_the_destination_reporter() -> None:
    for title, expr in queries("composemesh-traffic"):
        for s in selectors(resolve_query(expr)):
            reporter = [m for m in s.matchers.matchers if m.name == "reporter"]
            assert [(m.op, m.value) for m in reporter] == [
                (promql_parser.MatchOp.Equal, "destination")], title


def test_the_queries_that_carry_the_brief() -> None:
    traffic = dict(queries("composemesh-traffic"))
    success = traffic["Success rate per service"]
    assert 'response_code!~"5.."' in success and " / " in success
    assert 'connection_security_policy="mutual_tls"' in traffic["mTLS coverage"]
    assert traffic["Top callers"].startswith("topk by (destination_service_name) (5, ")
    assert "source_workload" in traffic["Top callers"]
    latency = [e for t, e in queries("composemesh-traffic")
               if t == "Request duration p50 / p90 / p99"]
    assert [e.split(",")[0] for e in latency] == [
        "histogram_quantile(0.5", "histogram_quantile(0.9", "histogram_quantile(0.99"]
    assert all("le)" in e for e in latency)
    tcp = [e for t, e in queries("composemesh-traffic") if t == "TCP bytes"]
    assert ["istio_tcp_received_bytes_total" in tcp[0], "istio_tcp_sent_bytes_total" in tcp[1]] \
        == [True, True]
    control = dict(queries("composemesh-control-plane"))
    assert control["ACK vs NACK rate"].startswith("sum by (outcome) (rate(pilot_xds_acks_total")
    assert control["Push rate"].startswith("sum by (type) (rate(pilot_xds_pushes_total")


def test_ratios_fall_back_to_zero_rather_than_empty() -> None:
    """``(part or total * 0) / total``: the part's own label set, or 0 where it has none."""
    expr = resolve_query(dict(queries("composemesh-traffic"))["mTLS coverage per service"])
    top = promql_parser.parse(expr)
    assert isinstance(top, promql_parser.BinaryExpr) and str(top.op) == "/"
    assert isinstance(top.lhs, promql_parser.ParenExpr)
    either = top.lhs.expr
    assert isinstance(either, promql_parser.BinaryExpr) and str(either.op) == "or"
    zero = either.rhs
    assert isinstance(zero, promql_parser.BinaryExpr) and str(zero.op) == "*"
    assert isinstance(zero.rhs, promql_parser.NumberLiteral) and zero.rhs.val == 0
    assert str(zero.lhs) == str(top.rhs)  # the fallback is the denominator itself


def test_write_dashboards_writes_the_json_models(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "dir"
    paths = write_dashboards(directory)
    assert [p.name for p in paths] == ["composemesh-traffic.json",
                                       "composemesh-control-plane.json"]
    for path in paths:
        assert path.parent == directory
        assert json.loads(path.read_text()) == DASHBOARDS[path.stem]
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in paths)


def test_panel_queries_reads_collapsed_rows_too() -> None:
    model = {"panels": [
        {"type": "stat", "title": "a", "targets": [{"refId": "A", "expr": "up"}]},
        {"type": "row", "title": "r", "collapsed": True, "panels": [
            {"type": "timeseries", "title": "b",
             "targets": [{"refId": "A", "expr": "x"}, {"refId": "B", "expr": "y"}]}]},
    ]}
    assert panel_queries(model) == [("a", "up"), ("b", "x"), ("b", "y")]


def test_resolve_query() -> None:
    expr = 'sum(rate(m{a=~"$service", b=~"${version}", c=~"${namespace:regex}"}[$__rate_interval]))'
    assert resolve_query(expr) == 'sum(rate(m{a=~".*", b=~".*", c=~".*"}[1m]))'
    assert resolve_query(expr, {"service": "reviews", "__rate_interval": "5m"}) == \
        'sum(rate(m{a=~"reviews", b=~".*", c=~".*"}[5m]))'
    assert resolve_query("increase(m[$__range]) / $__range_s") == "increase(m[1h]) / 3600"
    assert resolve_query("rate(m[$__interval])") == "rate(m[15s])"
    with pytest.raises(KeyError):
        resolve_query('m{a=~"$nosuchvariable"}')


@pytest.mark.parametrize(("stem", "title", "expr"), QUERIES)
def test_resolved_queries_carry_no_variable(stem: str, title: str, expr: str) -> None:
    assert "$" not in resolve_query(expr), title


@pytest.mark.parametrize("stem", list(DASHBOARDS))
def test_the_builtin_annotation_list_is_there(stem: str) -> None:
    annotations = DASHBOARDS[stem]["annotations"]["list"]
    assert [(a["name"], a["builtIn"], a["datasource"]["uid"]) for a in annotations] == [
        ("Annotations & Alerts", 1, "-- Grafana --")]
