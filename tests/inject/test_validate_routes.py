"""`composemesh check` and `up` refuse bad routes: x-composemesh: routes: against the versions."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from composemesh.errors import ConfigError
from composemesh.inject import load_project, validate_model, validate_project
from composemesh.model.routing import WeightedSubset

BOOKINFO = """
services:
  productpage:
    image: busybox
  reviews-v1:
    image: busybox
    labels: {composemesh.service: reviews, composemesh.version: v1, composemesh.weight: "80"}
  reviews-v2:
    image: busybox
    labels: {composemesh.service: reviews, composemesh.version: v2}
  reviews-v3:
    image: busybox
    labels: {composemesh.service: reviews, composemesh.version: v3}
  ratings:
    image: busybox
    deploy: {replicas: 2}
  sidecar:
    image: busybox
    network_mode: service:ratings
    labels: {composemesh.service: other, composemesh.version: v9, composemesh.weight: "5"}
  legacy:
    image: busybox
    labels: {composemesh.enable: "false"}
"""


def model(routes: Any = None, services: str = BOOKINFO) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(services)
    if routes is not None:
        doc["x-composemesh"] = {"routes": routes}
    return doc


def locate(service: str | None, field: str | None) -> str:
    """Names the file as LoadedProject.locate would, so the tests see which part was blamed."""
    return f"file-of:{service or field}"


def refused(doc: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate_model(doc, locate=locate)
    assert "\n" not in str(info.value)
    return info.value


def test_routing_of_every_mesh_service_from_labels() -> None:
    checked = validate_model(model(), locate=locate)
    assert set(checked.routing) == {"productpage", "reviews", "ratings"}  # not other, legacy
    default = checked.routing["reviews"].routes[-1]
    assert default.destinations == (
        WeightedSubset("v1", 80),
        WeightedSubset("v2", 10),
        WeightedSubset("v3", 10),
    )
    assert checked.routing["ratings"].routes[-1].destinations == (WeightedSubset("v1", 100),)
    # the existing fields are still there
    assert checked.labels["reviews-v2"].version == "v2"
    assert checked.settings.raw.get("routes") is None


def test_routes_are_built() -> None:
    routes = {
        "reviews": {
            "http": [
                {"match": [{"headers": {"end-user": "jason"}}], "route": {"v2": 100}},
                {"route": {"v1": 50, "v3": 50}},
            ]
        }
    }
    reviews = validate_model(model(routes), locate=locate).routing["reviews"]
    assert [r.destinations for r in reviews.routes] == [
        (WeightedSubset("v2", 100),),
        (WeightedSubset("v1", 50), WeightedSubset("v3", 50)),
    ]


@pytest.mark.parametrize(
    ("routes", "field", "message"),
    [
        (
            {"reviews": {"http": [{"route": {"v4": 100}}]}},
            "x-composemesh.routes.reviews.http[0].route.v4",
            "'v4' is not a version of mesh service 'reviews' (its versions are v1, v2, v3)",
        ),
        (
            {"legacy": {}},
            "x-composemesh.routes.legacy",
            "'legacy' is not a mesh service (the mesh services are productpage, ratings, reviews)",
        ),
        (
            {"other": {}},  # the joiner's labels make no mesh service: it uses ratings' proxy
            "x-composemesh.routes.other",
            "'other' is not a mesh service (the mesh services are productpage, ratings, reviews)",
        ),
        (
            {"reviews-v1": {}},  # a compose service, not a mesh service
            "x-composemesh.routes.reviews-v1",
            "'reviews-v1' is not a mesh service "
            "(the mesh services are productpage, ratings, reviews)",
        ),
        (
            {"ratings": {"http": [{"route": {"v1": -1}}]}},
            "x-composemesh.routes.ratings.http[0].route.v1",
            "-1 is not a non-negative integer weight",
        ),
        (
            {"ratings": {"http": [{"match": [{"path": {"regex": "*"}}]}]}},
            "x-composemesh.routes.ratings.http[0].match[0].path.regex",
            "'*' is not a valid regular expression: nothing to repeat at position 0",
        ),
    ],
)
def test_bad_routes_are_refused(routes: Any, field: str, message: str) -> None:
    err = refused(model(routes))
    assert (err.file, err.service, err.field, err.message) == (
        "file-of:x-composemesh",
        None,
        field,
        message,
    )


def test_label_weights_all_zero_blame_a_labelled_compose_service() -> None:
    services = """
    services:
      reviews-a:
        image: busybox
        labels: {composemesh.service: reviews, composemesh.version: v1}
      reviews-b:
        image: busybox
        labels: {composemesh.service: reviews, composemesh.version: v2, composemesh.weight: "0"}
      reviews-c:
        image: busybox
        labels: {composemesh.service: reviews, composemesh.version: v3, composemesh.weight: "100"}
    """
    doc = model(services=textwrap.dedent(services))
    doc["services"]["reviews-c"]["labels"]["composemesh.weight"] = "0"
    doc["services"]["reviews-a"]["labels"]["composemesh.weight"] = "0"
    err = refused(doc)
    assert (err.file, err.service, err.field) == (
        "file-of:reviews-a",
        "reviews-a",
        "label composemesh.weight",
    )
    assert err.message == (
        "every version of mesh service 'reviews' has weight 0, so no request would be routed"
    )
    # a default route of the user's own makes the labels irrelevant
    doc["x-composemesh"] = {"routes": {"reviews": {"http": [{"route": {"v2": 1}}]}}}
    assert validate_model(doc, locate=locate).routing["reviews"].routes[-1].destinations == (
        WeightedSubset("v2", 1),
    )


def test_one_version_has_one_weight() -> None:
    services = """
    services:
      reviews-a:
        image: busybox
        labels: {composemesh.service: reviews, composemesh.weight: "80"}
      reviews-b:
        image: busybox
        labels: {composemesh.service: reviews, composemesh.weight: "20"}
      reviews-c:
        image: busybox
        labels: {composemesh.service: reviews}
    """
    err = refused(model(services=textwrap.dedent(services)))
    assert (err.file, err.service, err.field) == (
        "file-of:reviews-b",
        "reviews-b",
        "label composemesh.weight",
    )
    assert err.message == (
        "20 contradicts the weight 80 that service 'reviews-a' gives version 'v1' of "
        "mesh service 'reviews'"
    )


def test_the_same_weight_twice_is_fine() -> None:
    services = """
    services:
      reviews-a:
        image: busybox
        labels: {composemesh.service: reviews, composemesh.weight: "80"}
      reviews-b:
        image: busybox
        labels: {composemesh.service: reviews, composemesh.weight: "80"}
    """
    checked = validate_model(model(services=textwrap.dedent(services)), locate=locate)
    assert checked.routing["reviews"].routes[-1].destinations == (WeightedSubset("v1", 80),)


# --------------------------------------------------------------------------- real files


def check(tmp_path: Path, *files: tuple[str, str]) -> ConfigError:
    paths = []
    for name, body in files:
        paths.append(tmp_path / name)
        paths[-1].write_text(textwrap.dedent(body))
    project = load_project([str(p) for p in paths])
    with pytest.raises(ConfigError) as info:
        validate_project(project)
    return info.value


def test_route_errors_name_the_file_with_the_section(tmp_path: Path) -> None:
    base = """
    services:
      reviews:
        image: busybox
    """
    mesh = """
    x-composemesh:
      routes:
        reviews:
          http:
            - route: {v2: 100}
    """
    err = check(tmp_path, ("compose.yaml", base), ("mesh.yaml", mesh))
    assert str(err) == (
        f"{tmp_path / 'mesh.yaml'}: x-composemesh.routes.reviews.http[0].route.v2: "
        "'v2' is not a version of mesh service 'reviews' (its versions are v1)"
    )


def test_label_split_errors_name_the_file_with_the_label(tmp_path: Path) -> None:
    base = """
    x-composemesh:
      trust_domain: example.org
    services:
      reviews:
        image: busybox
        labels: {composemesh.version: v1}
    """
    override = """
    services:
      reviews:
        labels: {composemesh.weight: "0"}
    """
    err = check(tmp_path, ("compose.yaml", base), ("override.yaml", override))
    assert str(err) == (
        f"{tmp_path / 'override.yaml'}: service 'reviews': label composemesh.weight: "
        "every version of mesh service 'reviews' has weight 0, so no request would be routed"
    )


def test_good_routes_pass_check(tmp_path: Path) -> None:
    (tmp_path / "compose.yaml").write_text(
        textwrap.dedent(
            """
            x-composemesh:
              routes:
                reviews:
                  timeout: 3s
                  http:
                    - match: [{path: {prefix: /api}}]
                      fault: {abort: {status: 503, percent: 1.5}}
            services:
              reviews:
                image: busybox
            """
        )
    )
    checked = validate_project(load_project([str(tmp_path / "compose.yaml")]))
    api, default = checked.routing["reviews"].routes
    assert api.fault is not None and api.fault.abort is not None
    assert api.fault.abort.percent == 1.5
    assert default.timeout_s == 3.0
