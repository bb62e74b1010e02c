"""The monitoring add-on's services as the injector adds them (pure: dicts in, dicts out)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from composemesh.errors import ConfigError
from composemesh.inject import dump_yaml, inject, plan_rows
from composemesh.inject import monitoring as mon
from composemesh.model import wellknown as wk
from composemesh.model.monitoring import GrafanaAddon, MonitoringSettings, PrometheusAddon

SD_URL = "http://composemesh-pilot:15014/sd/prometheus"


def model(monitoring: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "services": {
            "web": {"image": "nginx", "networks": {"front": None, "shared": None}},
            "api": {"image": "api", "networks": {"back": None}},
        },
        "networks": {"front": {}, "back": {}, "shared": {"external": True}},
        **extra,
    }
    if monitoring is not None:
        doc["x-composemesh"] = {"monitoring": monitoring}
    return doc


BOTH = {"prometheus": {"port": 9091, "scrape_interval": 7, "retention": "12h"},
        "grafana": {"port": 3001, "bind": "127.0.0.2"}}
DASHBOARDS = {"composemesh-traffic": {"title": "Traffic", "templating": {"list": [
    {"name": "service", "query": "label_values(istio_requests_total, destination_service)",
     "datasource": {"uid": "${datasource}"}}]}},
    "composemesh-control-plane": {"title": "Control plane"}}


@pytest.fixture(autouse=True)
def fixed_dashboards(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dashboards module's output is another issue's: a fixed stand-in with `$` in it."""
    monkeypatch.setattr(mon, "_mesh_dashboards", lambda: copy.deepcopy(DASHBOARDS))


def content(result: Any, key: str) -> str:
    """A config's content as compose hands it to the container (``$$`` read as ``$``)."""
    return str(result.model["configs"][key]["content"]).replace("$$", "$")


def test_prometheus_joins_the_pilots_own_networks_and_publishes_on_bind_port_only() -> None:
    result = inject(model(BOTH))
    services = result.model["services"]
    prom = services[wk.PROMETHEUS_SERVICE]
    assert prom["image"] == wk.PROMETHEUS_IMAGE
    assert prom["networks"] == {"back": None, "front": None}  # never the external one
    assert services[wk.PILOT_SERVICE]["networks"] == {"back": None, "front": None}
    assert prom["ports"] == [{"target": 9090, "published": "9091", "host_ip": "127.0.0.1",
                              "protocol": "tcp", "mode": "ingress"}]
    assert prom["cap_drop"] == ["ALL"]
    assert prom["security_opt"] == ["no-new-privileges:true"]
    assert "--storage.tsdb.retention.time=12h" in prom["command"]
    assert prom["volumes"] == [{"type": "volume", "source": mon.PROMETHEUS_VOLUME,
                                "target": "/prometheus"}]
    assert mon.PROMETHEUS_VOLUME in result.model["volumes"]
    assert prom["depends_on"] == {wk.PILOT_SERVICE: {"condition": "service_started",
                                                     "required": True}}
    assert "/-/ready" in " ".join(prom["healthcheck"]["test"])
    assert prom["labels"] == {wk.LABEL_ROLE: wk.ROLE_PROMETHEUS}


def test_the_prometheus_config_reads_the_pilots_service_discovery() -> None:
    result = inject(model(BOTH))
    target = result.model["services"][wk.PROMETHEUS_SERVICE]["configs"]
    assert target == [{"source": mon.PROMETHEUS_CONFIG, "target": mon.PROMETHEUS_CONFIG_FILE}]
    config = yaml.safe_load(content(result, mon.PROMETHEUS_CONFIG))
    assert config["global"] == {"scrape_interval": "7s", "evaluation_interval": "7s"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"composemesh", "prometheus"}
    assert jobs["composemesh"]["http_sd_configs"] == [{"url": SD_URL, "refresh_interval": "5s"}]
    assert "metrics_path" not in jobs["composemesh"]  # each target group says its own
    assert jobs["prometheus"]["static_configs"][0]["targets"] == ["127.0.0.1:9090"]


def test_grafana_is_in_its_profile_provisioned_with_that_prometheus_and_the_dashboards() -> None:
    result = inject(model(BOTH))
    graf = result.model["services"][wk.GRAFANA_SERVICE]
    assert graf["image"] == "grafana/grafana-oss:11.3.0"
    assert graf["profiles"] == [wk.GRAFANA_PROFILE]
    assert graf["ports"] == [{"target": 3000, "published": "3001", "host_ip": "127.0.0.2",
                              "protocol": "tcp", "mode": "ingress"}]
    assert graf["networks"] == {"back": None, "front": None}
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    for off in ("GF_ANALYTICS_REPORTING_ENABLED", "GF_ANALYTICS_CHECK_FOR_UPDATES",
                "GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES", "GF_NEWS_NEWS_FEED_ENABLED"):
        assert env[off] == "false", off
    datasources = yaml.safe_load(content(result, mon.GRAFANA_DATASOURCES))["datasources"]
    assert [(d["uid"], d["url"], d["isDefault"]) for d in datasources] == [
        ("prometheus", "http://composemesh-prometheus:9090", True)]
    provider = yaml.safe_load(content(result, mon.GRAFANA_DASHBOARDS))["providers"][0]
    assert provider["options"]["path"] == mon.GRAFANA_DASHBOARD_DIR
    targets = {c["target"]: c["source"] for c in graf["configs"]}
    for stem in DASHBOARDS:
        source = targets[f"{mon.GRAFANA_DASHBOARD_DIR}/{stem}.json"]
        assert json.loads(content(result, source)) == DASHBOARDS[stem]


def test_a_dollar_in_a_dashboard_reaches_grafana_as_one_dollar() -> None:
    result = inject(model(BOTH))
    raw = result.model["configs"]["composemesh-dashboard-composemesh-traffic"]["content"]
    assert "$${datasource}" in raw and "${datasource}" in raw.replace("$$", "$")


def test_neither_has_a_sidecar_nor_counts_as_a_user_service() -> None:
    result = inject(model(BOTH))
    services = result.model["services"]
    for name in (wk.PROMETHEUS_SERVICE, wk.GRAFANA_SERVICE):
        assert wk.netns_service(name) not in services
        assert wk.proxy_service(name) not in services
        assert "network_mode" not in services[name]
    assert [p.service for p in result.services] == ["web", "api"]
    added = {a.name: a.role for a in result.added}
    assert added[wk.PROMETHEUS_SERVICE] == wk.ROLE_PROMETHEUS
    assert added[wk.GRAFANA_SERVICE] == wk.ROLE_GRAFANA


def test_nothing_is_added_without_the_section_or_its_prometheus() -> None:
    for doc in (model(), model({"access_logs": False})):
        result = inject(doc)
        assert wk.PROMETHEUS_SERVICE not in result.model["services"]
        assert wk.GRAFANA_SERVICE not in result.model["services"]
        assert "configs" not in result.model
        assert result.monitoring is None


def test_grafana_only_when_asked_for() -> None:
    result = inject(model({"prometheus": {"port": 9091}}))
    assert wk.PROMETHEUS_SERVICE in result.model["services"]
    assert wk.GRAFANA_SERVICE not in result.model["services"]
    assert set(result.model["configs"]) == {mon.PROMETHEUS_CONFIG}
    assert mon.GRAFANA_VOLUME not in result.model["volumes"]


def test_injecting_again_changes_nothing() -> None:
    once = inject(model(BOTH))
    twice = inject(once.model)
    assert json.dumps(twice.model) == json.dumps(once.model)  # same order too
    assert twice.added == once.added
    assert twice.services == once.services
    assert twice.warnings == once.warnings


def test_the_name_compose_config_gives_a_config_is_kept() -> None:
    once = inject(model(BOTH)).model
    loaded = copy.deepcopy(once)
    loaded["configs"][mon.PROMETHEUS_CONFIG]["name"] = "proj_composemesh-prometheus-config"
    assert inject(loaded).model == loaded


def test_taking_the_section_out_drops_them_and_their_configs_only() -> None:
    once = inject(model(BOTH, configs={"mine": {"content": "x"}})).model
    once["x-composemesh"] = {"monitoring": {"prometheus": {"port": 9091}}}
    fewer = inject(once).model
    assert wk.GRAFANA_SERVICE not in fewer["services"]
    assert set(fewer["configs"]) == {"mine", mon.PROMETHEUS_CONFIG}
    del once["x-composemesh"]
    none = inject(once).model
    assert wk.PROMETHEUS_SERVICE not in none["services"]
    assert none["configs"] == {"mine": {"content": "x"}}


def test_a_user_service_with_the_name_is_refused() -> None:
    doc = model(BOTH)
    doc["services"][wk.PROMETHEUS_SERVICE] = {"image": "prom/prometheus"}
    with pytest.raises(ConfigError, match="the name is taken") as info:
        inject(doc)
    assert info.value.service == wk.PROMETHEUS_SERVICE


def test_with_only_external_networks_it_follows_the_pilot_onto_default() -> None:
    doc = {"services": {"web": {"image": "nginx", "networks": {"shared": None}}},
           "networks": {"shared": {"external": True}},
           "x-composemesh": {"monitoring": {"prometheus": {"port": 9091}}}}
    services = inject(doc).model["services"]
    assert services[wk.PROMETHEUS_SERVICE]["networks"] == {"default": None}
    assert services[wk.PILOT_SERVICE]["networks"] == {"default": None}


def test_without_the_dashboards_module_grafana_gets_none_and_it_is_said(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mon, "_mesh_dashboards", lambda: None)
    result = inject(model(BOTH))
    assert not [k for k in result.model["configs"] if k.startswith(mon.DASHBOARD_CONFIG_PREFIX)]
    assert any("composemesh.dashboards is not installed" in w for w in result.warnings)


def test_the_meshed_file_is_valid_yaml_and_the_plan_shows_them() -> None:
    result = inject(model(BOTH))
    assert yaml.safe_load(dump_yaml(result.model)) == result.model
    rows = {row[0]: row for row in plan_rows(result)}
    prom = rows[f"{wk.PROMETHEUS_SERVICE} (added)"]
    assert prom[1:4] == ("-", "-", "-")
    assert prom[4].startswith("http://127.0.0.1:9091;") and "12h" in prom[4]
    assert rows[f"{wk.GRAFANA_SERVICE} (added)"][4].startswith("http://127.0.0.2:3001;")


def test_add_monitoring_alone_needs_no_model() -> None:
    services: dict[str, Any] = {wk.PILOT_SERVICE: {"networks": {"default": None}}}
    settings = MonitoringSettings(prometheus=PrometheusAddon(port=9, bind="::1"),
                                  grafana=GrafanaAddon(port=10, image="my/grafana:1"))
    added = mon.add_monitoring(services, settings, frozenset(), dashboards={})
    assert added.services == ((wk.PROMETHEUS_SERVICE, wk.ROLE_PROMETHEUS),
                              (wk.GRAFANA_SERVICE, wk.ROLE_GRAFANA))
    assert services[wk.PROMETHEUS_SERVICE]["ports"][0]["host_ip"] == "::1"
    assert services[wk.GRAFANA_SERVICE]["image"] == "my/grafana:1"
    assert list(services) == [wk.PILOT_SERVICE, wk.PROMETHEUS_SERVICE, wk.GRAFANA_SERVICE]
