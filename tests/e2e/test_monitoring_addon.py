"""The monitoring add-on on the real engine: `up` with x-composemesh.monitoring.prometheus
starts the offline-built Prometheus, which finds the pilot and every proxy through the
pilot's service discovery and scrapes them; `down -v` removes it with its volume.

Grafana is asked for too: where its image is neither in the engine nor pullable (no
registry here) `up` says so, leaves it out and still succeeds.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from composemesh.model import wellknown as wk
from tests.e2e.conftest import DEMO, Mesh, docker, meshed
from tests.support import free_port

DEADLINE_S = 240  # a shared, slow machine: scrapes every 2 s, discovery every 5 s
PROXIES = {"frontend", "reviews", "ratings"}


def compose_text(prometheus_port: int, grafana_port: int) -> str:
    return f"""\
x-composemesh:
  monitoring:
    prometheus: {{port: {prometheus_port}, scrape_interval: 2}}
    grafana: {{port: {grafana_port}}}

{DEMO}
services:
  frontend:
    <<: *demo
    command: ["ratings"]
  reviews:
    <<: *demo
    command: ["reviews"]
    environment: {{VERSION: v1}}
  ratings:
    <<: *demo
    command: ["ratings"]
"""


def api(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())["data"]


@pytest.fixture(scope="module")
def mesh(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mesh, int]]:
    port = free_port()
    text = compose_text(port, free_port())
    with meshed("monitoring", tmp_path_factory.mktemp("monitoring"), text) as running:
        yield running, port


def targets_up(port: int) -> dict[str, list[dict[str, Any]]]:
    """Prometheus's active targets by role, those it scraped with success only."""
    found: dict[str, list[dict[str, Any]]] = {}
    for target in api(port, "/api/v1/targets")["activeTargets"]:
        if target["health"] == "up":
            found.setdefault(target["labels"].get("role", ""), []).append(target)
    return found


def test_prometheus_scrapes_the_pilot_and_every_proxy(mesh: tuple[Mesh, int]) -> None:
    running, port = mesh
    deadline = time.monotonic() + DEADLINE_S
    last: Any = None
    while True:
        try:
            last = targets_up(port)
            sidecars = {t["labels"].get("workload") for t in last.get("sidecar", [])}
            if sidecars == PROXIES and last.get("pilot"):
                break
        except OSError as exc:  # not answering yet
            last = exc
        assert time.monotonic() < deadline, f"targets after {DEADLINE_S}s: {last}"
        time.sleep(1)
    for target in last["sidecar"]:
        assert target["labels"]["namespace"] == running.project
        assert target["scrapeUrl"].endswith(f":{wk.PORT_PROMETHEUS}/stats/prometheus")
    assert last["pilot"][0]["scrapeUrl"].endswith(f":{wk.PORT_PILOT_MONITORING}/metrics")
    # the query API answers what the dashboards ask: one `up` series per proxy, all 1
    result = api(port, "/api/v1/query", query='count(up{role="sidecar"} == 1)')["result"]
    assert [int(float(r["value"][1])) for r in result] == [len(PROXIES)]


def test_it_is_published_on_loopback_only_and_not_meshed(mesh: tuple[Mesh, int]) -> None:
    running, port = mesh
    name = running.container(wk.PROMETHEUS_SERVICE)
    bindings = json.loads(docker("inspect", "-f", "{{json .HostConfig.PortBindings}}", name))
    assert bindings == {"9090/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert docker("exec", name, "id", "-un") == "prometheus"
    names = running.containers()
    assert not [n for n in names if f"{wk.PROMETHEUS_SERVICE}-proxy" in n]


def test_up_says_where_prometheus_is_and_why_grafana_is_not(mesh: tuple[Mesh, int]) -> None:
    running, port = mesh
    assert f"Prometheus: http://127.0.0.1:{port}" in running.up_output
    if any(wk.GRAFANA_SERVICE in n for n in running.containers()):
        assert "Grafana:    http://127.0.0.1:" in running.up_output
    else:
        assert "Grafana:    not started (its image grafana/grafana-oss:11.3.0" in \
            running.up_output


def test_its_volume_belongs_to_the_project(mesh: tuple[Mesh, int]) -> None:
    running, _ = mesh
    volumes = docker("volume", "ls", "--filter",
                     f"label=com.docker.compose.project={running.project}",
                     "--format", "{{.Name}}").split()
    assert f"{running.project}_composemesh-prometheus-data" in volumes
