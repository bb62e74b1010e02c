"""Bad mesh configuration: one sentence naming the file, the service and the field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from composemesh.errors import ConfigError
from composemesh.inject import load_project, validate_model, validate_project
from composemesh.model import wellknown as wk

from .casefiles import loaded

SERVICE = """
services:
  reviews:
    image: busybox
    labels:
      {label}
"""


def check(tmp_path: Path, text: str, *extra: tuple[str, str]) -> ConfigError:
    """Load ``text`` (plus extra files) as a project; return the ConfigError validation raises."""
    files = [tmp_path / "compose.yaml"]
    files[0].write_text(textwrap.dedent(text))
    for name, body in extra:
        files.append(tmp_path / name)
        files[-1].write_text(textwrap.dedent(body))
    project = load_project([str(f) for f in files])
    with pytest.raises(ConfigError) as info:
        validate_project(project)
    assert "\n" not in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (
            'composemesh.weight: "abc"',
            "compose.yaml: service 'reviews': label composemesh.weight: "
            "'abc' is not a non-negative integer",
        ),
        (
            'composemesh.weight: "-5"',
            "compose.yaml: service 'reviews': label composemesh.weight: "
            "'-5' is not a non-negative integer",
        ),
        (
            "composemesh.protocol: udp",
            "compose.yaml: service 'reviews': label composemesh.protocol: "
            "'udp' is not a known protocol (one of http, tcp)",
        ),
        (
            "composemesh.enable: maybe",
            "compose.yaml: service 'reviews': label composemesh.enable: "
            "'maybe' is not true or false",
        ),
        (
            "composemesh.port.99999.protocol: http",
            "compose.yaml: service 'reviews': label composemesh.port.99999.protocol: "
            "'99999' is not a port number (1-65535)",
        ),
        (
            "composemesh.version: V2",
            "compose.yaml: service 'reviews': label composemesh.version: "
            "'V2' is not a valid version name",
        ),
    ],
)
def test_bad_labels(tmp_path: Path, label: str, expected: str) -> None:
    err = check(tmp_path, SERVICE.format(label=label))
    assert str(err).startswith(str(tmp_path / expected))
    assert err.service == "reviews"
    assert err.file == str(tmp_path / "compose.yaml")


def test_unknown_label(tmp_path: Path) -> None:
    err = check(tmp_path, SERVICE.format(label='composemesh.foo: "1"'))
    assert str(err).startswith(
        f"{tmp_path / 'compose.yaml'}: service 'reviews': label composemesh.foo: unknown label"
    )
    assert "composemesh.weight" in str(err)  # says which labels exist


def test_list_form_labels_are_checked_too(tmp_path: Path) -> None:
    text = "services:\n  web:\n    image: x\n    labels: [composemesh.weight=abc]\n"
    err = check(tmp_path, text)
    assert "service 'web': label composemesh.weight: 'abc'" in str(err)


def test_unknown_mesh_settings_key(tmp_path: Path) -> None:
    text = "x-composemesh:\n  trustdomain: x\n" + SERVICE.format(label="a: b")
    err = check(tmp_path, text)
    assert str(err).startswith(
        f"{tmp_path / 'compose.yaml'}: x-composemesh: unknown key 'trustdomain'"
    )
    assert err.service is None


def test_bad_mtls_mode_names_the_nested_key(tmp_path: Path) -> None:
    text = "x-composemesh:\n  mtls: {mode: LOOSE}\n" + SERVICE.format(label="a: b")
    err = check(tmp_path, text)
    assert "x-composemesh.mtls.mode: 'LOOSE' is not one of STRICT, PERMISSIVE" in str(err)


def test_errors_name_the_file_that_set_the_label(tmp_path: Path) -> None:
    base = SERVICE.format(label="composemesh.version: v1")
    override = "services:\n  reviews:\n    labels:\n      composemesh.weight: lots\n"
    err = check(tmp_path, base, ("override.yaml", override))
    assert str(err).startswith(f"{tmp_path / 'override.yaml'}: service 'reviews'")


def test_settings_errors_name_the_file_with_the_section(tmp_path: Path) -> None:
    base = SERVICE.format(label="composemesh.version: v1")
    err = check(tmp_path, base, ("mesh.yaml", "x-composemesh:\n  mtls: sometimes\n"))
    assert str(err).startswith(f"{tmp_path / 'mesh.yaml'}: x-composemesh.mtls")


@pytest.mark.parametrize(
    ("text", "taken", "owner"),
    [
        (
            "services:\n  web:\n    image: x\n  web-proxy:\n    image: y\n",
            "web-proxy",
            "'web'",
        ),
        (
            "services:\n  web:\n    image: x\n  web-netns:\n    image: y\n",
            "web-netns",
            "'web'",
        ),
        (
            "services:\n  api:\n    image: x\n    deploy: {replicas: 3}\n"
            "  api-3:\n    image: y\n",
            "api-3",
            "'api'",
        ),
        (
            "services:\n  web:\n    image: x\n  composemesh-pilot:\n    image: y\n",
            "composemesh-pilot",
            "pilot",
        ),
        (
            "x-composemesh:\n  monitoring: {prometheus: {port: 9090}}\n"
            "services:\n  web:\n    image: x\n  composemesh-prometheus:\n    image: y\n",
            "composemesh-prometheus",
            "monitoring.prometheus",
        ),
        (
            "x-composemesh:\n  monitoring: {prometheus: {port: 9090}, grafana: {port: 3000}}\n"
            "services:\n  web:\n    image: x\n  composemesh-grafana:\n    image: y\n",
            "composemesh-grafana",
            "monitoring.grafana",
        ),
    ],
)
def test_injected_names_must_be_free(tmp_path: Path, text: str, taken: str, owner: str) -> None:
    err = check(tmp_path, text)
    message = str(err)
    assert message.startswith(f"{tmp_path / 'compose.yaml'}: service '{taken}': the name is taken")
    assert owner in message
    assert err.service == taken


def test_a_disabled_owner_frees_its_names(tmp_path: Path) -> None:
    text = (
        "services:\n  web:\n    image: x\n    labels: {composemesh.enable: 'false'}\n"
        "  web-proxy:\n    image: y\n"
    )
    (tmp_path / "compose.yaml").write_text(text)
    validated = validate_project(load_project([str(tmp_path / "compose.yaml")]))
    assert validated.labels["web"].enabled is False
    assert validated.labels["web-proxy"].enabled is True


def test_an_injected_model_validates() -> None:
    validated = validate_project(loaded("already_meshed"))
    assert validated.settings.trust_domain == "meshed.example"
    assert validated.labels["api-2"].service == "api"
    assert validated.labels["api-2-netns"].service == "api"


def test_good_project_returns_labels_and_settings() -> None:
    validated = validate_project(loaded("x_composemesh"))
    assert validated.settings.trust_domain == "shop.example.com"
    assert validated.settings.mtls_overrides == {"legacy": "PERMISSIVE"}
    assert set(validated.labels) == {"reviews", "legacy"}
    bookinfo = validate_project(loaded("bookinfo"))
    assert bookinfo.labels["reviews-v2"].service == "reviews"
    assert bookinfo.labels["reviews-v2"].weight == 30
    assert bookinfo.labels["details"].protocol_for(9080) == "http"


def test_validate_model_without_a_locator() -> None:
    model = {"services": {"web": {"image": "x", "labels": {wk.LABEL_WEIGHT: "x"}}}}
    with pytest.raises(ConfigError) as info:
        validate_model(model)
    assert str(info.value) == (
        "service 'web': label composemesh.weight: 'x' is not a non-negative integer"
    )
    calls: list[tuple[str | None, str | None]] = []

    def locate(service: str | None, field: str | None) -> str:
        calls.append((service, field))
        return "f.yaml"

    with pytest.raises(ConfigError) as info:
        validate_model(model, locate=locate)
    assert str(info.value).startswith("f.yaml: service 'web'")
    assert ("web", "labels") in calls
