"""The dashboards as Grafana's JSON model, written to files, and their queries read back out
(and made sendable to Prometheus) for docs and tests."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dashboard_model

from composemesh.atomic_file import write_atomic
from composemesh.dashboards import control_plane, traffic

# File stem -> the builder of that dashboard; the stem is the dashboard's uid.
BUILDERS: dict[str, Callable[[], dashboard.Dashboard]] = {
    traffic.UID: traffic.traffic_dashboard,
    control_plane.UID: control_plane.control_plane_dashboard,
}

# What Grafana puts in for its built-in variables, as resolve_query assumes them: a 1m rate
# window (Grafana's own for a 15s scrape interval), a 15s step and an hour's range.
BUILTINS: dict[str, str] = {
    "__rate_interval": "1m",
    "__rate_interval_ms": "60000",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
# The dashboards' own variables resolve to their "All" value by default.
FILTER_DEFAULTS: dict[str, str] = {"namespace": ".*", "service": ".*", "version": ".*"}

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def all_dashboards() -> dict[str, dict[str, Any]]:
    """File stem ("composemesh-traffic", "composemesh-control-plane") -> that dashboard's
    Grafana JSON model, a plain dict as Grafana's import and provisioning read it."""
    return {stem: _plain(_numbered(build().build())) for stem, build in BUILDERS.items()}


def write_dashboards(directory: Path) -> list[Path]:
    """Write ``<stem>.json`` for each dashboard into ``directory`` (created if missing);
    returns the paths written, in the order of ``all_dashboards()``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, model in all_dashboards().items():
        path = directory / f"{stem}.json"
        write_atomic(path, json.dumps(model, indent=2, sort_keys=True) + "\n", mode=0o644)
        paths.append(path)
    return paths


def panel_queries(model: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) for every target of every panel of a dashboard's JSON model,
    in panel order; the panels of collapsed rows included."""
    return [(panel.get("title", ""), t["expr"])
            for panel in _panels(model.get("panels", []))
            for t in panel.get("targets", [])
            if "expr" in t]


def resolve_query(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """``expr`` with its variables put in, ready for Prometheus's ``/api/v1/query``:
    ``$namespace``, ``$service`` and ``$version`` default to ``.*`` (their "All"), Grafana's
    built-ins to ``BUILTINS`` (``$__rate_interval`` is ``1m``). ``variables`` (names without
    the ``$``) override either. Both ``$name`` and ``${name}`` forms are replaced; a variable
    with no value raises ``KeyError`` rather than reaching Prometheus unresolved."""
    values = {**BUILTINS, **FILTER_DEFAULTS, **(variables or {})}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def _numbered(model: dashboard_model.Dashboard) -> dashboard_model.Dashboard:
    """``model`` with its panels and rows numbered 1, 2, ... in order (the builders leave rows
    at 0 and panels without one), so that links and edits to one panel find only it."""
    n = 0
    for panel in model.panels or []:
        n += 1
        panel.id_val = n
        for inner in getattr(panel, "panels", None) or []:
            n += 1
            inner.id_val = n
    return model


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _plain(model: dashboard_model.Dashboard) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(JSONEncoder(sort_keys=True).encode(model))
    return data
