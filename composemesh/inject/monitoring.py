"""The monitoring add-on's services: Prometheus (and Grafana) beside the pilot, not meshed.

Pure, like the rest of the rewrite: ``add_monitoring`` changes the injector's own copy of the
services and returns the top-level ``configs:`` and ``volumes:`` entries they need.

- ``composemesh-prometheus`` runs PROMETHEUS_IMAGE on every network of the project's own that
  the pilot is on (never an external one), published on ``<bind>:<port>`` only. It finds its
  targets through the pilot's Prometheus http_sd (``/sd/prometheus`` on
  PORT_PILOT_MONITORING: every proxy's ``:15090/stats/prometheus`` and the pilot's
  ``/metrics``, with their labels) and scrapes itself too. Its config is an inline compose
  config; its data is a named volume.
- ``composemesh-grafana`` (only with ``monitoring.grafana``) runs the image the settings name,
  in the compose profile GRAFANA_PROFILE, so that ``up`` starts it only when that image is to
  be had (it cannot be built offline). It is provisioned with that Prometheus as its default
  datasource and the mesh's dashboards, viewable anonymously, and calls nowhere outside.

Neither has a sidecar: they carry role labels of their own, which the classification keeps
away from the mesh; every injection regenerates them (or drops them when the section is
gone), so injecting a meshed file again changes nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from composemesh.errors import ConfigError
from composemesh.inject.classify import role_of
from composemesh.inject.compose_syntax import attached_networks, dependency
from composemesh.inject.templates import DROP_ALL, NO_NEW_PRIVILEGES
from composemesh.model import wellknown as wk
from composemesh.model.monitoring import GrafanaAddon, MonitoringSettings, PrometheusAddon

ROLES = (wk.ROLE_PROMETHEUS, wk.ROLE_GRAFANA)
NAMES = {wk.ROLE_PROMETHEUS: wk.PROMETHEUS_SERVICE, wk.ROLE_GRAFANA: wk.GRAFANA_SERVICE}

PROMETHEUS_CONFIG = "composemesh-prometheus-config"  # top-level configs: keys
GRAFANA_DATASOURCES = "composemesh-grafana-datasources"
GRAFANA_DASHBOARDS = "composemesh-grafana-dashboards"
DASHBOARD_CONFIG_PREFIX = "composemesh-dashboard-"  # + the dashboard's file stem
PROMETHEUS_VOLUME = "composemesh-prometheus-data"
GRAFANA_VOLUME = "composemesh-grafana-data"

PROMETHEUS_CONFIG_FILE = "/etc/prometheus/composemesh.yml"
PROMETHEUS_DATA = "/prometheus"
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
GRAFANA_DASHBOARD_DIR = "/etc/grafana/dashboards/composemesh"
DATASOURCE_UID = "prometheus"
SD_PATH = "/sd/prometheus"
SD_REFRESH = "5s"
SCRAPE_JOB = "composemesh"

# /-/ready answered 200, asked with bash's /dev/tcp (the image has neither curl nor wget,
# and its promtool predates `check ready`).
PROMETHEUS_HEALTHCHECK = {
    "test": ["CMD", "bash", "-c",
             f"exec 3<>/dev/tcp/127.0.0.1/{wk.PORT_PROMETHEUS_UI} && "
             "printf 'GET /-/ready HTTP/1.0\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"],
    "interval": "2s",
    "timeout": "2s",
    "retries": 60,
    "start_period": "30s",
}
# Anonymous viewers (it is published on 127.0.0.1 by default), and no call to the outside:
# no usage reports, update checks, news feed, gravatars or external snapshots.
GRAFANA_ENVIRONMENT = {
    "GF_AUTH_ANONYMOUS_ENABLED": "true",
    "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
    "GF_ANALYTICS_REPORTING_ENABLED": "false",
    "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
    "GF_ANALYTICS_CHECK_FOR_PLUGIN_UPDATES": "false",
    "GF_ANALYTICS_FEEDBACK_LINKS_ENABLED": "false",
    "GF_NEWS_NEWS_FEED_ENABLED": "false",
    "GF_PLUGINS_PLUGIN_ADMIN_ENABLED": "false",
    "GF_SECURITY_DISABLE_GRAVATAR": "true",
    "GF_SNAPSHOTS_EXTERNAL_ENABLED": "false",
    "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH":
        f"{GRAFANA_DASHBOARD_DIR}/composemesh-traffic.json",
}


@dataclass(frozen=True)
class MonitoringAdded:
    """What ``add_monitoring`` put in (or took out of) the services."""

    services: tuple[tuple[str, str], ...] = ()  # (name, role), in order
    configs: dict[str, Any] = field(default_factory=dict)  # top-level configs: entries
    volumes: tuple[str, ...] = ()  # top-level volumes: names
    warnings: tuple[str, ...] = ()


def add_monitoring(
    services: dict[str, Any],
    monitoring: MonitoringSettings,
    external: frozenset[str],
    existing_configs: Mapping[str, Any] | None = None,
    dashboards: Mapping[str, Mapping[str, Any]] | None = None,
) -> MonitoringAdded:
    """Put the add-on's services into ``services`` (after the pilot, which must be there),
    replacing those of an earlier injection; take them out when ``monitoring`` has none.

    ``external``: the project's external networks (never joined). ``existing_configs``: the
    model's top-level ``configs:``; an entry of ours keeps its other keys (the ``name`` that
    `docker compose config` gives it). ``dashboards``: file stem -> Grafana dashboard JSON,
    ``None`` to ask :mod:`composemesh.dashboards`. Raises ConfigError when a user service has
    one of the names.
    """
    for name in NAMES.values():
        svc = services.get(name)
        if svc is not None and role_of(svc, name) not in ROLES:
            raise ConfigError(f"the name is taken: the monitoring add-on adds {name!r}; "
                              "rename this service", service=name)
    warnings: list[str] = []
    drop_monitoring(services)  # regenerated below, after the pilot, or dropped
    prometheus = monitoring.prometheus
    if prometheus is None:
        return MonitoringAdded()
    pilot = services.get(wk.PILOT_SERVICE)
    networks = [n for n in attached_networks(pilot) if n not in external] if pilot else []
    old = existing_configs or {}

    def config(key: str, content: str) -> dict[str, Any]:
        entry = {k: v for k, v in (old.get(key) or {}).items() if k not in ("content", "file")} \
            if isinstance(old.get(key), Mapping) else {}
        return {**entry, "content": compose_escape(content)}

    configs = {PROMETHEUS_CONFIG: config(PROMETHEUS_CONFIG, prometheus_config(prometheus))}
    services[wk.PROMETHEUS_SERVICE] = make_prometheus(prometheus, networks)
    added = [(wk.PROMETHEUS_SERVICE, wk.ROLE_PROMETHEUS)]
    volumes = [PROMETHEUS_VOLUME]
    if monitoring.grafana is not None:
        if dashboards is None:
            dashboards = _mesh_dashboards()
            if dashboards is None:
                warnings.append(f"service {wk.GRAFANA_SERVICE!r}: composemesh.dashboards is "
                                "not installed: Grafana starts without the mesh's dashboards")
                dashboards = {}
        configs[GRAFANA_DATASOURCES] = config(GRAFANA_DATASOURCES, grafana_datasources())
        configs[GRAFANA_DASHBOARDS] = config(GRAFANA_DASHBOARDS, grafana_dashboard_provider())
        for stem in sorted(dashboards):
            key = f"{DASHBOARD_CONFIG_PREFIX}{stem}"
            configs[key] = config(key, json.dumps(dashboards[stem], indent=1, sort_keys=True))
        services[wk.GRAFANA_SERVICE] = make_grafana(monitoring.grafana, networks,
                                                    sorted(dashboards))
        added.append((wk.GRAFANA_SERVICE, wk.ROLE_GRAFANA))
        volumes.append(GRAFANA_VOLUME)
    return MonitoringAdded(services=tuple(added), configs=configs, volumes=tuple(volumes),
                           warnings=tuple(warnings))


def drop_monitoring(services: dict[str, Any]) -> None:
    """Take the add-on's services of an earlier injection out of ``services``."""
    for name in monitoring_of(services):
        del services[name]


def is_monitoring_config(key: str) -> bool:
    """True for a top-level ``configs:`` key that ``add_monitoring`` writes."""
    return key in (PROMETHEUS_CONFIG, GRAFANA_DATASOURCES, GRAFANA_DASHBOARDS) \
        or key.startswith(DASHBOARD_CONFIG_PREFIX)


def compose_escape(text: str) -> str:
    """``text`` as compose reads it back verbatim: every ``$`` written ``$$``."""
    return text.replace("$", "$$")


def _published(port: int, bind: str, target: int) -> dict[str, Any]:
    return {"target": target, "published": str(port), "host_ip": bind, "protocol": "tcp",
            "mode": "ingress"}


def _networks(networks: list[str]) -> dict[str, Any]:
    return {"networks": dict.fromkeys(networks)} if networks else {"network_mode": "none"}


def prometheus_config(addon: PrometheusAddon) -> str:
    """The Prometheus configuration (YAML): the pilot's http_sd, and Prometheus itself."""
    interval = f"{addon.scrape_interval}s"
    doc = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": SCRAPE_JOB,
                # each target group says its own __metrics_path__ (proxy or pilot)
                "http_sd_configs": [{
                    "url": f"http://{wk.PILOT_SERVICE}:{wk.PORT_PILOT_MONITORING}{SD_PATH}",
                    "refresh_interval": SD_REFRESH,
                }],
            },
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{wk.PORT_PROMETHEUS_UI}"],
                                    "labels": {"role": "prometheus"}}],
            },
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def make_prometheus(addon: PrometheusAddon, networks: list[str]) -> dict[str, Any]:
    """The Prometheus service. Its root filesystem stays writable: compose cannot put an
    inline config into a read-only container."""
    return {
        "image": wk.PROMETHEUS_IMAGE,
        "command": [
            f"--config.file={PROMETHEUS_CONFIG_FILE}",
            f"--storage.tsdb.path={PROMETHEUS_DATA}",
            f"--storage.tsdb.retention.time={addon.retention}",
            f"--web.listen-address=:{wk.PORT_PROMETHEUS_UI}",
        ],
        "restart": "unless-stopped",
        "cap_drop": list(DROP_ALL),
        "security_opt": list(NO_NEW_PRIVILEGES),
        "ports": [_published(addon.port, addon.bind, wk.PORT_PROMETHEUS_UI)],
        **_networks(networks),
        "configs": [{"source": PROMETHEUS_CONFIG, "target": PROMETHEUS_CONFIG_FILE}],
        "volumes": [{"type": "volume", "source": PROMETHEUS_VOLUME, "target": PROMETHEUS_DATA}],
        "healthcheck": copy.deepcopy(PROMETHEUS_HEALTHCHECK),
        "depends_on": {wk.PILOT_SERVICE: dependency("service_started")},
        "labels": {wk.LABEL_ROLE: wk.ROLE_PROMETHEUS},
    }


def grafana_datasources() -> str:
    """Grafana's datasource provisioning: the add-on's Prometheus, the default."""
    doc = {
        "apiVersion": 1,
        "datasources": [{
            "name": "Prometheus",
            "uid": DATASOURCE_UID,
            "type": "prometheus",
            "access": "proxy",
            "url": f"http://{wk.PROMETHEUS_SERVICE}:{wk.PORT_PROMETHEUS_UI}",
            "isDefault": True,
            "editable": False,
        }],
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def grafana_dashboard_provider() -> str:
    """Grafana's dashboard provisioning: the files in GRAFANA_DASHBOARD_DIR."""
    doc = {
        "apiVersion": 1,
        "providers": [{
            "name": "composemesh",
            "folder": "composemesh",
            "type": "file",
            "disableDeletion": True,
            "allowUiUpdates": False,
            "options": {"path": GRAFANA_DASHBOARD_DIR},
        }],
    }
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def make_grafana(addon: GrafanaAddon, networks: list[str], stems: list[str]) -> dict[str, Any]:
    """The Grafana service, in its profile; ``stems``: the dashboards it is given. No
    healthcheck: which tools the image the user names carries is not known here."""
    configs = [
        {"source": GRAFANA_DATASOURCES,
         "target": f"{GRAFANA_PROVISIONING}/datasources/composemesh.yaml"},
        {"source": GRAFANA_DASHBOARDS,
         "target": f"{GRAFANA_PROVISIONING}/dashboards/composemesh.yaml"},
        *({"source": f"{DASHBOARD_CONFIG_PREFIX}{stem}",
           "target": f"{GRAFANA_DASHBOARD_DIR}/{stem}.json"} for stem in stems),
    ]
    environment = dict(GRAFANA_ENVIRONMENT)
    if "composemesh-traffic" not in stems:
        del environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    return {
        "image": addon.image,
        "profiles": [wk.GRAFANA_PROFILE],
        "restart": "unless-stopped",
        "cap_drop": list(DROP_ALL),
        "security_opt": list(NO_NEW_PRIVILEGES),
        "ports": [_published(addon.port, addon.bind, wk.PORT_GRAFANA_UI)],
        **_networks(networks),
        "environment": environment,
        "configs": configs,
        "volumes": [{"type": "volume", "source": GRAFANA_VOLUME, "target": "/var/lib/grafana"}],
        "depends_on": {wk.PROMETHEUS_SERVICE: dependency("service_started")},
        "labels": {wk.LABEL_ROLE: wk.ROLE_GRAFANA},
    }


def _mesh_dashboards() -> dict[str, Any] | None:
    """composemesh.dashboards' dashboards, or None when that module is not there."""
    try:
        from composemesh.dashboards import all_dashboards
    except ImportError:
        return None
    return dict(all_dashboards())


def monitoring_of(services: Mapping[str, Any]) -> dict[str, str]:
    """The add-on's services in a (meshed) model: name -> role."""
    return {name: str(role_of(svc, name)) for name, svc in services.items()
            if role_of(svc, name) in ROLES}
