"""x-composemesh.monitoring: what it means when right, one sentence naming the key when not."""

from __future__ import annotations

from typing import Any

import pytest

from composemesh.errors import ConfigError
from composemesh.model.monitoring import (
    GRAFANA_IMAGE,
    MonitoringSettings,
    Telemetry,
    TracingSettings,
    parse_monitoring,
)
from composemesh.model.settings import parse_settings


def test_the_issues_example_reads_as_written() -> None:
    m = parse_monitoring({
        "prometheus": {"port": 9090}, "grafana": {"port": 3000}, "access_logs": True,
        "tracing": {"zipkin": "http://collector:9411/api/v2/spans", "sampling": 1.0}})
    assert m.prometheus is not None and (m.prometheus.port, m.prometheus.bind) == (
        9090, "127.0.0.1")
    assert m.grafana is not None and (m.grafana.port, m.grafana.image) == (3000, GRAFANA_IMAGE)
    assert m.tracing == TracingSettings(zipkin="http://collector:9411/api/v2/spans")
    assert m.telemetry("web") == Telemetry(access_log=True, tracing=m.tracing)


def test_absent_means_no_add_on_access_logs_on_no_tracing() -> None:
    assert parse_monitoring(None) == MonitoringSettings()
    assert parse_settings({}).monitoring.telemetry("web") == Telemetry(True, None)


def test_access_logs_per_service() -> None:
    m = parse_monitoring({"access_logs": {"default": False, "services": {"web": True}}})
    assert m.telemetry("web").access_log and not m.telemetry("db").access_log
    assert not parse_monitoring({"access_logs": False}).telemetry("web").access_log


@pytest.mark.parametrize(("section", "field", "says"), [
    ({"prom": {}}, "x-composemesh.monitoring", "unknown key 'prom'"),
    ({"prometheus": {}}, "x-composemesh.monitoring.prometheus.port", "is missing"),
    ({"prometheus": {"port": 70000}}, "x-composemesh.monitoring.prometheus.port",
     "not a port"),
    ({"prometheus": {"port": 9090, "bind": "localhost"}},
     "x-composemesh.monitoring.prometheus.bind", "not an IP address"),
    ({"prometheus": {"port": 9090, "retention": "forever"}},
     "x-composemesh.monitoring.prometheus.retention", "not a duration"),
    ({"grafana": {"port": 3000}}, "x-composemesh.monitoring.grafana",
     "needs monitoring.prometheus"),
    ({"prometheus": {"port": 3000}, "grafana": {"port": 3000}},
     "x-composemesh.monitoring.grafana.port", "the port of prometheus too"),
    ({"access_logs": "yes"}, "x-composemesh.monitoring.access_logs", "must be true or false"),
    ({"access_logs": {"services": {"db": "off"}}},
     "x-composemesh.monitoring.access_logs.services.db", "must be true or false"),
    ({"tracing": {"sampling": 0.5}}, "x-composemesh.monitoring.tracing", "names no collector"),
    ({"tracing": {"zipkin": "collector:9411"}}, "x-composemesh.monitoring.tracing.zipkin",
     "not an http:// or https:// URL"),
    ({"tracing": {"otlp": "http://c:4318/v1/traces", "sampling": 1.5}},
     "x-composemesh.monitoring.tracing.sampling", "between 0.0 and 1.0"),
    ({"tracing": {"otlp": "http://c:4318/v1/traces", "service_name": "x"}},
     "x-composemesh.monitoring.tracing", "unknown key 'service_name'"),
])
def test_a_bad_key_is_named(section: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_monitoring(section)
    assert caught.value.field == field
    assert says in caught.value.message
