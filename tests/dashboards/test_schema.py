"""The generated dashboards validate against Grafana's dashboard schema (as the Grafana
Foundation SDK generates it as JSON Schema; README.md here says where the files come from and
where the tests look for them), their queries against the Prometheus dataquery schema and their
panels' options against each panel's."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from composemesh.dashboards import all_dashboards

HERE = Path(__file__).parent
REPO = HERE.parents[1]
# sha256 of each file as the SDK's commit cd7a7523 holds it (README.md)
SHA256 = {
    "dashboard": "abed954cbf64845fe5f9cd73c961faa879a3c15784b28b9e37ee7a6524abcd2f",
    "prometheus": "307ff39c17e127d94704ec16503221606a7fbb0dbd0743daf71b40ef8c166987",
    "stat": "900a6afcffc6e282b758dea09d0b22014f53a7e441037b8c79584430c5b4a99e",
    "table": "5cd6638b8ffb5977fb45da2aa53ce301f7152daf77e4b9da6a4a2c7db42a4932",
    "timeseries": "522e152a9292c5157f1fa330651bad1861b41298338f4bcde31033c83fe129f5",
}
NAMES = tuple(SHA256)


def schema_dir() -> Path | None:
    """The first place that holds all five schema files (README.md), or None."""
    candidates = [REPO.parent / "shared" / "grafana-schemas" / "v11.3.x"]
    if os.environ.get("COMPOSEMESH_GRAFANA_SCHEMAS"):
        candidates.insert(0, Path(os.environ["COMPOSEMESH_GRAFANA_SCHEMAS"]))
    for directory in candidates:
        if all((directory / f"{name}.jsonschema.json").is_file() for name in NAMES):
            return directory
    return None


SCHEMAS = schema_dir()
pytestmark = pytest.mark.skipif(
    SCHEMAS is None, reason="Grafana's schema files are not here: see tests/dashboards/README.md")


def schema(name: str, definition: str | None = None) -> dict[str, Any]:
    """One of the schemas, or one of its definitions as a schema of its own."""
    assert SCHEMAS is not None
    data: dict[str, Any] = json.loads((SCHEMAS / f"{name}.jsonschema.json").read_text())
    if definition is None:
        return data
    return {"$ref": f"#/definitions/{definition}", "definitions": data["definitions"]}


def validator(s: dict[str, Any]) -> jsonschema.Draft7Validator:
    jsonschema.Draft7Validator.check_schema(s)
    return jsonschema.Draft7Validator(s)


DASHBOARDS = all_dashboards()


def errors(v: jsonschema.Draft7Validator, instance: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in v.iter_errors(instance)]


def panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in model["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_validator() -> jsonschema.Draft7Validator:
    return validator(schema("dashboard"))


def test_the_schema_is_the_sdk_dashboard_schema() -> None:
    assert SCHEMAS is not None
    for name, digest in SHA256.items():
        content = (SCHEMAS / f"{name}.jsonschema.json").read_bytes()
        assert hashlib.sha256(content).hexdigest() == digest, name
    s = schema("dashboard")
    assert s["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert s["$ref"] == "#/definitions/Dashboard"
    dashboard = s["definitions"]["Dashboard"]
    assert dashboard["additionalProperties"] is False
    assert set(dashboard["required"]) == {"schemaVersion", "templating", "annotations"}
    readme = (HERE / "README.md").read_text()
    assert "cd7a7523183e46c7d9fb5116d4f8203a48c20a37" in readme
    assert "jsonschema/dashboard.jsonschema.json" in readme


@pytest.mark.parametrize("stem", sorted(DASHBOARDS))
def test_dashboard_validates_against_grafanas_schema(stem: str) -> None:
    assert errors(dashboard_validator(), DASHBOARDS[stem]) == []


@pytest.mark.parametrize("stem", sorted(DASHBOARDS))
def test_the_schema_check_rejects_a_broken_dashboard(stem: str) -> None:
    """The validation above is not vacuous: the same schema refuses small breakages."""
    for breakage in (
        lambda d: d.update(schemaVersion="39"),
        lambda d: d.update(unknownField=True),
        lambda d: d.pop("templating"),
        lambda d: d["panels"][1]["gridPos"].update(w="wide"),
        lambda d: d["panels"][1].update(type=""),
        lambda d: d["templating"]["list"][1].update(type="no-such-variable-type"),
    ):
        broken = copy.deepcopy(DASHBOARDS[stem])
        breakage(broken)
        assert errors(dashboard_validator(), broken), broken


@pytest.mark.parametrize("stem", sorted(DASHBOARDS))
def test_every_query_validates_against_the_prometheus_dataquery_schema(stem: str) -> None:
    query = validator(schema("prometheus"))
    targets = [t for p in panels(DASHBOARDS[stem]) for t in p.get("targets", [])]
    assert targets
    for t in targets:
        assert errors(query, t) == [], t
    assert errors(query, {"refId": "A"}), "a query without expr must not validate"


@pytest.mark.parametrize("stem", sorted(DASHBOARDS))
def test_panel_options_validate_against_their_panel_schema(stem: str) -> None:
    kinds = {p["type"] for p in panels(DASHBOARDS[stem])}
    assert kinds <= {"row", "timeseries", "stat", "table"}
    for panel in panels(DASHBOARDS[stem]):
        if panel["type"] == "row":
            continue
        options = validator(schema(panel["type"], "Options"))
        assert errors(options, panel["options"]) == [], panel["title"]
        if "FieldConfig" in schema(panel["type"])["definitions"]:  # stat has no custom fields
            field = validator(schema(panel["type"], "FieldConfig"))
            custom = panel["fieldConfig"]["defaults"]["custom"]
            assert errors(field, custom) == [], panel["title"]


def test_the_panel_option_check_rejects_bad_options() -> None:
    timeseries = validator(schema("timeseries", "Options"))
    assert errors(timeseries, {"legend": {"displayMode": "sideways", "placement": "bottom",
                                          "showLegend": True, "calcs": []},
                               "tooltip": {"mode": "multi", "sort": "none"}})
