"""The composemesh.* label decoder: pure, one ConfigError naming service and label per mistake."""

from __future__ import annotations

import pytest

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.labels import MeshLabels, normalize_labels, parse_labels


def parse(labels: dict[str, str], service: str = "web") -> MeshLabels:
    return parse_labels(labels, compose_service=service)


def error(labels: dict[str, str], service: str = "web") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(labels, service)
    return info.value


# --------------------------------------------------------------------------- normalize


def test_normalize_accepts_mapping_list_and_none() -> None:
    assert normalize_labels(None, service="s") == {}
    assert normalize_labels({"a": "1", "b": None, "c": 2}, service="s") == {
        "a": "1", "b": "", "c": "2",
    }
    assert normalize_labels(["a=1", "b", "c=x=y", "d="], service="s") == {
        "a": "1", "b": "", "c": "x=y", "d": "",
    }


def test_normalize_refuses_other_shapes() -> None:
    with pytest.raises(ConfigError) as info:
        normalize_labels("a=1", service="s")
    assert str(info.value) == "service 's': labels: must be a mapping or a list of key=value"


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    labels = parse({})
    assert labels == MeshLabels(
        enabled=True, service="web", version=wk.DEFAULT_VERSION, weight=None, protocol=None
    )
    assert labels.protocol_for(80) is None


def test_foreign_labels_are_ignored() -> None:
    assert parse({"com.example.team": "x", "traefik.enable": "true"}).enabled is True


def test_injector_labels_are_accepted() -> None:
    labels = parse({wk.LABEL_ROLE: "netns", wk.LABEL_OF: "web", wk.LABEL_INSTANCE: "2"})
    assert labels.service == "web"


# --------------------------------------------------------------------------- each label


@pytest.mark.parametrize(
    ("value", "enabled"),
    [("true", True), ("1", True), ("Yes", True), ("on", True),
     ("false", False), ("0", False), ("NO", False), (" off ", False)],
)
def test_enable(value: str, enabled: bool) -> None:
    assert parse({wk.LABEL_ENABLE: value}).enabled is enabled


def test_enable_must_be_a_boolean() -> None:
    assert str(error({wk.LABEL_ENABLE: "maybe"})) == (
        "service 'web': label composemesh.enable: 'maybe' is not true or false"
    )


def test_service_and_version() -> None:
    labels = parse({wk.LABEL_SERVICE: "reviews", wk.LABEL_VERSION: "v2.1-canary"}, "rev2")
    assert (labels.service, labels.version) == ("reviews", "v2.1-canary")


@pytest.mark.parametrize("name", ["Reviews", "-x", "x-", "a b", "x" * 64, ""])
def test_bad_service_names(name: str) -> None:
    err = error({wk.LABEL_SERVICE: name})
    assert err.field == "label composemesh.service"
    assert "is not a valid mesh service name" in str(err)


def test_the_compose_name_must_be_a_valid_mesh_name_unless_relabelled() -> None:
    err = error({}, service="Web_App")
    assert err.service == "Web_App" and err.field == "label composemesh.service"
    assert parse({wk.LABEL_SERVICE: "web-app"}, service="Web_App").service == "web-app"


def test_bad_version() -> None:
    err = error({wk.LABEL_VERSION: "V1"})
    assert err.field == "label composemesh.version"


@pytest.mark.parametrize(("value", "weight"), [("0", 0), ("50", 50), (" 7 ", 7)])
def test_weight(value: str, weight: int) -> None:
    assert parse({wk.LABEL_WEIGHT: value}).weight == weight


@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "", "10%"])
def test_weight_must_be_a_non_negative_integer(value: str) -> None:
    assert str(error({wk.LABEL_WEIGHT: value})) == (
        f"service 'web': label composemesh.weight: {value!r} is not a non-negative integer"
    )


def test_protocols() -> None:
    labels = parse({
        wk.LABEL_PROTOCOL: "TCP",
        "composemesh.port.9080.protocol": "http",
    })
    assert labels.protocol == "tcp"
    assert labels.port_protocols == {9080: "http"}
    assert labels.protocol_for(9080) == "http"
    assert labels.protocol_for(5432) == "tcp"


def test_unknown_protocol() -> None:
    err = error({wk.LABEL_PROTOCOL: "udp"})
    assert str(err) == (
        "service 'web': label composemesh.protocol: 'udp' is not a known protocol "
        "(one of http, tcp)"
    )
    port_err = error({"composemesh.port.53.protocol": "dns"})
    assert port_err.field == "label composemesh.port.53.protocol"


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_port_label_needs_a_port_number(port: str) -> None:
    err = error({f"composemesh.port.{port}.protocol": "http"})
    assert f"{port!r} is not a port number (1-65535)" in str(err)


@pytest.mark.parametrize(
    "key", ["composemesh.foo", "composemesh.wieght", "composemesh.port.80", "composemesh."]
)
def test_unknown_composemesh_labels_are_refused(key: str) -> None:
    err = error({key: "1"})
    assert err.field == f"label {key}"
    assert "unknown label; known labels are composemesh.enable" in str(err)


def test_errors_can_be_located_afterwards() -> None:
    err = error({wk.LABEL_WEIGHT: "x"}).located(file="compose.yaml")
    assert str(err).startswith("compose.yaml: service 'web': label composemesh.weight:")
