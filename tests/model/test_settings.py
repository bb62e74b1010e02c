"""The x-composemesh: decoder: pure, one ConfigError naming the key per mistake."""

from __future__ import annotations

import pytest

from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.settings import KEYS, MeshSettings, parse_settings


def error(section: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_settings(section)
    assert info.value.service is None
    return info.value


def test_absent_section_gives_defaults() -> None:
    settings = parse_settings(None)
    assert settings == MeshSettings()
    assert settings.trust_domain == wk.DEFAULT_TRUST_DOMAIN == "cluster.local"
    assert settings.mtls_mode == "STRICT"


def test_full_section() -> None:
    section = {
        "trust_domain": "shop.example.com",
        "mtls": {"mode": "permissive", "services": {"legacy": "strict"}},
        "routes": {"reviews": {"timeout": "2s"}},
        "policies": {},
        "egress": {"policy": "REGISTRY_ONLY"},
        "gateways": {},
        "consul": {"address": "http://consul:8500", "host_address": "192.0.2.10"},
        "monitoring": {},
    }
    settings = parse_settings(section)
    assert settings.trust_domain == "shop.example.com"
    assert settings.mtls_mode == "PERMISSIVE"
    assert settings.mtls_overrides == {"legacy": "STRICT"}
    assert settings.raw == section
    assert set(section) == set(KEYS)


def test_mtls_as_a_plain_string() -> None:
    assert parse_settings({"mtls": "PERMISSIVE"}).mtls_mode == "PERMISSIVE"


def test_section_must_be_a_mapping() -> None:
    assert str(error(["trust_domain"])) == "x-composemesh: must be a mapping"


def test_unknown_key() -> None:
    err = error({"trustdomain": "x"})
    assert str(err).startswith(
        "x-composemesh: unknown key 'trustdomain'; the keys are trust_domain"
    )


@pytest.mark.parametrize(
    "key", ["routes", "policies", "egress", "gateways", "consul", "monitoring"]
)
def test_sections_must_be_mappings(key: str) -> None:
    assert str(error({key: ["x"]})) == f"x-composemesh.{key}: must be a mapping"


@pytest.mark.parametrize("domain", ["Example.com", "-bad", "a b", 42, ""])
def test_bad_trust_domain(domain: object) -> None:
    err = error({"trust_domain": domain})
    assert err.field == "x-composemesh.trust_domain"
    assert "is not a valid trust domain" in str(err)


@pytest.mark.parametrize(
    ("mtls", "field"),
    [
        ("LOOSE", "x-composemesh.mtls"),
        ({"mode": "OFF"}, "x-composemesh.mtls.mode"),
        ({"services": {"web": "NONE"}}, "x-composemesh.mtls.services.web"),
        ({"services": ["web"]}, "x-composemesh.mtls.services"),
        ({"level": "STRICT"}, "x-composemesh.mtls"),
        (["STRICT"], "x-composemesh.mtls"),
    ],
)
def test_bad_mtls(mtls: object, field: str) -> None:
    assert error({"mtls": mtls}).field == field
