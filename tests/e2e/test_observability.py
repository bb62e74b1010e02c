"""Observability on the real engine (issue 12): Istio's metrics exact at both reporters, access
logs and traces across three services, and the monitoring add-on's real Prometheus.

One mesh for the module: ``client`` → ``productpage`` → ``reviews`` (v2) → ``ratings``, all
HTTP; ``productpage`` also calls ``details`` over TCP. The apps are the demo's, which pass the
trace headers on as Istio's Bookinfo apps do. The mesh has the monitoring add-on
(Prometheus, built offline; Grafana, whose image no registry here serves), tracing to
``collector``: a stdlib HTTP server run by this test that keeps every body POSTed to its
Zipkin and OTLP paths and gives them back on ``GET /spans``.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import DEMO, Mesh, bring_up, docker, logs_of, tear_down, unique_project
from tests.support import free_port

pytestmark = pytest.mark.e2e

# python3 -c COLLECTOR: keeps each POSTed body (Zipkin v2 JSON on 9411, OTLP/HTTP JSON on
# 4318) and answers GET /spans with {"zipkin": [bodies], "otlp": [bodies]}; healthz on 9080.
COLLECTOR = r"""
import json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
got = {"zipkin": [], "otlp": []}
lock = threading.Lock()
def handler(kind):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with lock:
                got[kind].append(json.loads(body))
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()
        def do_GET(self):
            with lock:
                body = json.dumps(got).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    return H
for kind, port in (("zipkin", 9411), ("otlp", 4318), ("zipkin", 9080)):
    server = ThreadingHTTPServer(("0.0.0.0", port), handler(kind))
    threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Event().wait()
"""


def compose_text(prometheus_port: int, grafana_port: int, ratings_replicas: int = 1) -> str:
    collector = json.dumps(COLLECTOR.replace("$", "$$"))
    return DEMO + f"""
x-composemesh:
  monitoring:
    prometheus: {{port: {prometheus_port}, scrape_interval: 2}}
    grafana: {{port: {grafana_port}}}
    access_logs: true
    tracing:
      zipkin: http://collector:9411/api/v2/spans
      otlp: http://collector:4318/v1/traces
      sampling: 1.0
services:
  client:
    <<: *demo
    command: ["ratings"]
  productpage:
    <<: *demo
    command: ["productpage"]
  reviews:
    <<: *demo
    command: ["reviews"]
    environment: {{VERSION: v2}}
    labels: {{composemesh.version: v2}}
  ratings:
    <<: *demo
    command: ["ratings"]
    deploy: {{replicas: {ratings_replicas}}}
  details:
    image: composemesh-demo:0.1.0
    restart: unless-stopped
    command: ["details"]
    labels: {{composemesh.protocol: tcp}}
  collector:
    <<: *demo
    entrypoint: ["python3", "-c"]
    command: [{collector}]
    labels: {{composemesh.enable: "false"}}
"""


class Observed:
    """The module's mesh and the ports of its add-on."""

    def __init__(self, mesh: Mesh, compose: Path, prometheus_port: int, grafana_port: int):
        self.mesh = mesh
        self.compose = compose
        self.prometheus_port = prometheus_port
        self.grafana_port = grafana_port

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Prometheus's instant query result for ``expr`` (the add-on's, from the host)."""
        url = (f"http://127.0.0.1:{self.prometheus_port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.load(resp)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def targets(self) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.prometheus_port}/api/v1/targets?state=active"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return list(json.load(resp)["data"]["activeTargets"])

    def spans(self) -> dict[str, list[Any]]:
        out = self.mesh.exec("client", "python3", "-c",
                             "import urllib.request,sys;sys.stdout.write(urllib.request."
                             "urlopen('http://collector:9080/spans',timeout=5).read().decode())")
        return dict(json.loads(out))


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 180) -> Any:
    """``condition()``'s first truthy value, asked every half second; fails after ``timeout``
    (generous: the machine is shared; nothing here is a measure of speed)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except (OSError, urllib.error.URLError, AssertionError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {timeout} s (last: {last!r})")


@pytest.fixture(scope="module")
def observed(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    folder = tmp_path_factory.mktemp("observability")
    prometheus_port, grafana_port = free_port(), free_port()
    compose = folder / "compose.yaml"
    compose.write_text(compose_text(prometheus_port, grafana_port))
    mesh = bring_up(unique_project("obs"), [compose], {})
    try:
        yield Observed(mesh, compose, prometheus_port, grafana_port)
    finally:
        tear_down(mesh)


def samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples named ``name`` in the exposition ``text`` whose labels include ``labels``."""
    return [(s.labels, s.value) for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def one(text: str, name: str, **labels: str) -> float:
    found = samples(text, name, **labels)
    assert len(found) == 1, f"{name} {labels}: {found}"
    return found[0][1]


# ----------------------------------------------------------------------------- metrics


def test_up_prints_both_urls_and_says_why_grafana_is_left_out(observed: Observed) -> None:
    out = observed.mesh.up_output
    assert f"Prometheus: http://127.0.0.1:{observed.prometheus_port}" in out, out
    assert "Grafana:    not started" in out, out  # no registry here serves its image


def test_request_counts_are_exact_at_both_reporters(observed: Observed) -> None:
    """N requests from client to ratings: istio_requests_total, the duration histogram's
    count, at the client's sidecar (reporter source) and at ratings' (reporter destination,
    naming the caller's workload and version from its certificate), all exactly N."""
    mesh = observed.mesh
    n = 37
    before_src = mesh.prometheus("client")
    answers = mesh.get_json("client", "http://ratings:9080/ratings/0", "--count", str(n))
    assert [a["status"] for a in answers] == [200] * n
    src_labels = {"reporter": "source", "source_workload": "client",
                  "destination_service_name": "ratings", "destination_version": "v1",
                  "response_code": "200"}
    assert not samples(before_src, "istio_requests_total", **src_labels)  # nothing before
    src = mesh.prometheus("client")
    assert one(src, "istio_requests_total", **src_labels) == n
    assert one(src, "istio_request_duration_milliseconds_count", **src_labels) == n
    [(labels, _)] = samples(src, "istio_requests_total", **src_labels)
    assert labels["source_principal"].endswith("/sa/client")
    assert labels["destination_principal"].endswith("/sa/ratings")

    dst_labels = {"reporter": "destination", "source_workload": "client",
                  "source_version": "v1", "destination_workload": "ratings",
                  "destination_version": "v1", "response_code": "200",
                  "connection_security_policy": "mutual_tls"}
    dst = mesh.prometheus("ratings")
    assert one(dst, "istio_requests_total", **dst_labels) == n
    assert one(dst, "istio_request_duration_milliseconds_count", **dst_labels) == n
    assert one(dst, "istio_response_bytes_count", **dst_labels) == n
    [(labels, _)] = samples(dst, "istio_requests_total", **dst_labels)
    assert labels["source_principal"].endswith("/ns/" + mesh.project + "/sa/client")
    assert labels["destination_principal"].endswith("/sa/ratings")
    assert labels["request_protocol"] == "http"


def test_tcp_byte_counters_equal_the_bytes_sent(observed: Observed) -> None:
    """``demo.py tcp`` from client to details, M times: the received bytes at both reporters
    are the lines sent, the sent bytes the answers, exactly."""
    mesh = observed.mesh
    m = 5
    sent = received = 0
    for i in range(m):
        line = f"book-{i:03d}"
        answer = mesh.exec("client", "python3", "/app/demo.py", "tcp", "details", "9000", line)
        assert json.loads(answer)["id"] == line
        sent += len(line) + 1  # the line and its newline
        received += len(answer.strip().encode()) + 1
    for proxy, reporter in (("client", "source"), ("details", "destination")):
        labels = {"reporter": reporter, "source_workload": "client",
                  "destination_service_name": "details"}

        def counted(proxy: str = proxy, labels: dict[str, str] = labels) -> bool:
            text = mesh.prometheus(proxy)
            return (one(text, "istio_tcp_connections_closed_total", **labels) == m
                    and one(text, "istio_tcp_received_bytes_total", **labels) == sent
                    and one(text, "istio_tcp_sent_bytes_total", **labels) == received
                    and one(text, "istio_tcp_connections_opened_total", **labels) == m)

        wait_for(f"{proxy}'s TCP counters", counted, timeout=30)


# ----------------------------------------------------------------------------- traces, logs


def access_log(mesh: Mesh, compose_service: str) -> list[dict[str, Any]]:
    lines = logs_of(mesh.container(f"{compose_service}-proxy")).splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_one_trace_through_three_services_in_six_logs_and_the_collector(
        observed: Observed) -> None:
    mesh = observed.mesh
    request_id = f"obs-{time.time_ns()}"
    [answer] = mesh.get_json("client", "http://productpage:9080/productpage",
                             "-H", f"x-request-id: {request_id}")
    assert answer["status"] == 200, answer
    hops = (("client", "source"), ("productpage", "destination"),
            ("productpage", "source"), ("reviews", "destination"),
            ("reviews", "source"), ("ratings", "destination"))

    def entries() -> list[dict[str, Any]]:
        found = []
        for service, reporter in hops:
            mine = [e for e in access_log(mesh, service)
                    if e.get("request_id") == request_id and e.get("reporter") == reporter
                    and e.get("protocol", "").startswith("HTTP")]
            if len(mine) != 1:
                return []
            found.append(mine[0])
        return found

    logged = wait_for("one access-log line per hop", entries, timeout=30)
    trace_ids = {e["trace_id"] for e in logged}
    assert len(trace_ids) == 1 and len(next(iter(trace_ids))) == 32, logged
    trace_id = next(iter(trace_ids))
    assert [e["response_code"] for e in logged] == [200] * 6
    assert logged[1]["source_workload"] == "client"
    assert logged[3]["source_workload"] == "productpage"
    assert logged[5]["source_workload"] == "reviews"

    def collected() -> list[dict[str, Any]]:
        got = observed.spans()
        spans = [s for body in got["zipkin"] for s in body if s["traceId"] == trace_id]
        return spans if len(spans) == 6 else []

    spans = wait_for("six spans of the trace at the collector (Zipkin)", collected, timeout=60)
    assert {s["kind"] for s in spans} == {"CLIENT", "SERVER"}
    ids = {s["id"] for s in spans}
    roots = [s for s in spans if s.get("parentId") not in ids]
    assert len(roots) == 1 and roots[0]["kind"] == "CLIENT", spans  # the client's sidecar
    otlp = [span for body in observed.spans()["otlp"] for rs in body["resourceSpans"]
            for ss in rs["scopeSpans"] for span in ss["spans"] if span["traceId"] == trace_id]
    assert len(otlp) == 6, otlp


# ----------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_every_proxy_and_the_pilot(observed: Observed) -> None:
    proxies = {"client", "productpage", "reviews", "ratings", "details"}

    def all_up() -> bool:
        targets = observed.targets()
        up = {t["labels"].get("workload") for t in targets
              if t["labels"].get("role") == "sidecar" and t["health"] == "up"}
        pilot = [t for t in targets if t["labels"].get("role") == "pilot"
                 and t["health"] == "up"]
        return proxies <= up and bool(pilot)

    wait_for("Prometheus scraping every sidecar and the pilot", all_up)
    result = observed.query('count(up{role="sidecar"} == 1)')
    assert float(result[0]["value"][1]) == len(proxies)


def test_every_panel_query_of_both_dashboards_has_data(observed: Observed) -> None:
    from composemesh.dashboards import all_dashboards, panel_queries, resolve_query

    mesh = observed.mesh
    mesh.get_json("client", "http://productpage:9080/productpage", "--count", "20")
    mesh.exec("client", "python3", "/app/demo.py", "tcp", "details", "9000", "x")
    queries = [(stem, title, resolve_query(expr))
               for stem, board in all_dashboards().items()
               for title, expr in panel_queries(board)]
    assert len(queries) >= 10

    def empty() -> list[tuple[str, str, str]]:
        return [q for q in queries if not observed.query(q[2])]

    missing: list[Any] = []

    def none_empty() -> bool:
        missing[:] = empty()
        return not missing

    try:
        wait_for("every panel query with data", none_empty, timeout=120)
    except AssertionError:
        raise AssertionError(f"panels without data: {missing}") from None


def test_a_replica_added_after_up_is_scraped_without_a_restart(observed: Observed) -> None:
    mesh = observed.mesh
    prometheus = mesh.container("composemesh-prometheus")
    started = docker("inspect", "-f", "{{.State.StartedAt}}", prometheus)
    observed.compose.write_text(compose_text(observed.prometheus_port, observed.grafana_port,
                                             ratings_replicas=2))
    again = bring_up(mesh.project, mesh.files, mesh.env)
    assert "ratings-2" in " ".join(again.containers())

    def scraped() -> bool:
        return any(t["labels"].get("workload") == "ratings-2" and t["health"] == "up"
                   for t in observed.targets())

    wait_for("the new replica's sidecar among Prometheus's targets, up", scraped)
    assert docker("inspect", "-f", "{{.State.StartedAt}}", prometheus) == started
