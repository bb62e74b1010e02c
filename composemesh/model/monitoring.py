"""``x-composemesh.monitoring``: the Prometheus and Grafana add-on, access logs and tracing.

Two halves, as for the gateways: ``parse_monitoring`` reads the file's form and checks every
key (ConfigError naming it); ``Telemetry`` is the part of the pilot–proxy contract each proxy
is told (``SnapshotSettings.telemetry``): whether it writes access logs, where its spans go.

```yaml
x-composemesh:
  monitoring:
    prometheus: {port: 9090}     # published on 127.0.0.1:<port>; absent: no Prometheus
    grafana: {port: 3000}        # published on 127.0.0.1:<port>; absent: no Grafana
    access_logs: true            # or {default: true, services: {db: false}}
    tracing: {zipkin: http://collector:9411/api/v2/spans, sampling: 1.0}
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import urlsplit

import msgspec

from composemesh.errors import ConfigError

MONITORING = "x-composemesh.monitoring"
KEYS = ("prometheus", "grafana", "access_logs", "tracing")
PROMETHEUS_KEYS = ("port", "bind", "scrape_interval", "retention")
GRAFANA_KEYS = ("port", "bind", "image")
ACCESS_LOG_KEYS = ("default", "services")
TRACING_KEYS = ("zipkin", "otlp", "sampling")
GRAFANA_IMAGE = "grafana/grafana-oss:11.3.0"  # official; no offline build exists
DEFAULT_BIND = "127.0.0.1"
DEFAULT_SCRAPE_INTERVAL = 5  # seconds
DEFAULT_RETENTION = "2d"

Fraction = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """Where spans go (Zipkin v2 JSON and/or OTLP/HTTP JSON, URLs of the collector's span
    endpoints) and which share of new traces is sampled (0.0–1.0; a caller's decision in
    ``traceparent``/B3 is kept)."""

    zipkin: str | None = None  # e.g. http://collector:9411/api/v2/spans
    otlp: str | None = None  # e.g. http://collector:4318/v1/traces
    sampling: Fraction = 1.0


@dataclass(frozen=True, slots=True)
class Telemetry:
    """What one proxy is told of observability (``SnapshotSettings.telemetry``)."""

    access_log: bool = True
    tracing: TracingSettings | None = None


@dataclass(frozen=True, slots=True)
class PrometheusAddon:
    port: int
    bind: str = DEFAULT_BIND
    scrape_interval: int = DEFAULT_SCRAPE_INTERVAL  # seconds
    retention: str = DEFAULT_RETENTION


@dataclass(frozen=True, slots=True)
class GrafanaAddon:
    port: int
    bind: str = DEFAULT_BIND
    image: str = GRAFANA_IMAGE


@dataclass(frozen=True, slots=True)
class MonitoringSettings:
    """The whole section, checked."""

    prometheus: PrometheusAddon | None = None
    grafana: GrafanaAddon | None = None
    access_logs_default: bool = True
    access_logs: Mapping[str, bool] = field(default_factory=dict)  # per mesh service
    tracing: TracingSettings | None = None

    def telemetry(self, service: str) -> Telemetry:
        """What the proxies of mesh service ``service`` are told."""
        return Telemetry(access_log=self.access_logs.get(service, self.access_logs_default),
                         tracing=self.tracing)


def parse_monitoring(value: object) -> MonitoringSettings:
    """``x-composemesh.monitoring`` checked; ConfigError naming the first bad key."""
    if value is None:
        return MonitoringSettings()
    section = _mapping(value, MONITORING, KEYS)
    prometheus = grafana = None
    if section.get("prometheus") is not None:
        where = f"{MONITORING}.prometheus"
        raw = _mapping(section["prometheus"], where, PROMETHEUS_KEYS)
        prometheus = PrometheusAddon(
            port=_port(raw.get("port"), f"{where}.port"),
            bind=_bind(raw.get("bind", DEFAULT_BIND), f"{where}.bind"),
            scrape_interval=_seconds(raw.get("scrape_interval", DEFAULT_SCRAPE_INTERVAL),
                                     f"{where}.scrape_interval"),
            retention=_retention(raw.get("retention", DEFAULT_RETENTION), f"{where}.retention"),
        )
    if section.get("grafana") is not None:
        where = f"{MONITORING}.grafana"
        raw = _mapping(section["grafana"], where, GRAFANA_KEYS)
        image = raw.get("image", GRAFANA_IMAGE)
        if not isinstance(image, str) or not image or any(c.isspace() for c in image):
            raise ConfigError(f"{image!r} is not an image reference", field=f"{where}.image")
        grafana = GrafanaAddon(port=_port(raw.get("port"), f"{where}.port"),
                               bind=_bind(raw.get("bind", DEFAULT_BIND), f"{where}.bind"),
                               image=image)
        if prometheus is None:
            raise ConfigError("needs monitoring.prometheus: its dashboards read that Prometheus",
                              field=where)
        if prometheus.port == grafana.port and prometheus.bind == grafana.bind:
            raise ConfigError(f"is {grafana.port}, the port of prometheus too",
                              field=f"{where}.port")
    default, services = _access_logs(section.get("access_logs", True))
    tracing = None
    if section.get("tracing") is not None:
        tracing = _tracing(section["tracing"])
    return MonitoringSettings(prometheus=prometheus, grafana=grafana,
                              access_logs_default=default, access_logs=services,
                              tracing=tracing)


def _access_logs(value: object) -> tuple[bool, dict[str, bool]]:
    where = f"{MONITORING}.access_logs"
    if isinstance(value, bool):
        return value, {}
    raw = _mapping(value, where, ACCESS_LOG_KEYS, also="true or false, or ")
    default = raw.get("default", True)
    if not isinstance(default, bool):
        raise ConfigError("must be true or false", field=f"{where}.default")
    services = raw.get("services") or {}
    if not isinstance(services, Mapping):
        raise ConfigError("must be a mapping of mesh service to true or false",
                          field=f"{where}.services")
    out: dict[str, bool] = {}
    for name, on in services.items():
        if not isinstance(on, bool):
            raise ConfigError("must be true or false", field=f"{where}.services.{name}")
        out[str(name)] = on
    return default, out


def _tracing(value: object) -> TracingSettings:
    where = f"{MONITORING}.tracing"
    raw = _mapping(value, where, TRACING_KEYS)
    zipkin = _url(raw.get("zipkin"), f"{where}.zipkin")
    otlp = _url(raw.get("otlp"), f"{where}.otlp")
    if zipkin is None and otlp is None:
        raise ConfigError("names no collector; give zipkin, otlp or both", field=where)
    sampling = raw.get("sampling", 1.0)
    if isinstance(sampling, bool) or not isinstance(sampling, int | float) \
            or not 0.0 <= sampling <= 1.0:
        raise ConfigError(f"{sampling!r} is not a share between 0.0 and 1.0",
                          field=f"{where}.sampling")
    return TracingSettings(zipkin=zipkin, otlp=otlp, sampling=float(sampling))


def _mapping(value: object, where: str, keys: tuple[str, ...],
             also: str = "") -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be {also}a mapping", field=where)
    for key in value:
        if key not in keys:
            raise ConfigError(f"unknown key {key!r}; the keys are {', '.join(keys)}", field=where)
    return value


def _port(value: object, where: str) -> int:
    if value is None:
        raise ConfigError("is missing: the host port to publish on", field=where)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{value!r} is not a port (1-65535)", field=where)
    return value


def _bind(value: object, where: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(f"{value!r} is not an IP address of the host", field=where) from None


def _seconds(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 3600:
        raise ConfigError(f"{value!r} is not a number of seconds (1-3600)", field=where)
    return value


def _retention(value: object, where: str) -> str:
    text = str(value)
    if not text[:-1].isdigit() or text[-1] not in "smhdwy" or int(text[:-1]) == 0:
        raise ConfigError(f"{value!r} is not a duration such as 2d or 12h", field=where)
    return text


def _url(value: object, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{value!r} is not a URL", field=where)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{value!r} is not an http:// or https:// URL", field=where)
    return value
