"""x-composemesh: mtls: as the CA reads it: modes, its own root's paths, the workload TTL."""

from __future__ import annotations

from pathlib import Path

import pytest

from composemesh.errors import ConfigError
from composemesh.model.ca_config import (
    DEFAULT_WORKLOAD_TTL_S,
    CAConfig,
    parse_ca_config,
    parse_ttl,
)

M = "x-composemesh.mtls"
BASE = Path("/srv/shop")


def error(section: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_ca_config(section, BASE)
    return info.value


def test_defaults() -> None:
    sections: tuple[object, ...] = (None, {})
    for section in sections:
        config = parse_ca_config(section, BASE)
        assert config == CAConfig()
        assert config.mode == "STRICT" and config.overrides == {}
        assert config.workload_ttl_s == DEFAULT_WORKLOAD_TTL_S == 86400
        assert not config.user_root
    assert parse_ca_config("permissive", BASE).mode == "PERMISSIVE"


def test_full_section() -> None:
    config = parse_ca_config(
        {
            "mode": "strict",
            "services": {"legacy": "PERMISSIVE"},
            "root": {"cert": "certs/root.pem", "key": "/etc/keys/root-key.pem"},
            "workload_cert_ttl": "2h",
        },
        BASE,
    )
    assert config == CAConfig(
        mode="STRICT",
        overrides={"legacy": "PERMISSIVE"},
        root_cert_path=BASE / "certs/root.pem",
        root_key_path=Path("/etc/keys/root-key.pem"),
        workload_ttl_s=7200,
    )
    assert config.user_root


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("24h", 86400),
        ("2m", 120),
        ("90s", 90),
        ("90", 90),
        (3600, 3600),
        ("1.5h", 5400),
        ("7d", 604800),
        (" 1m ", 60),
    ],
)
def test_ttl(value: object, seconds: float) -> None:
    assert parse_ttl(value, "f") == seconds
    assert parse_ca_config({"workload_cert_ttl": value}, BASE).workload_ttl_s == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "too short"),
        (0, "too short"),
        ("abc", "'abc' is not a duration"),
        ("-5m", "is not a duration"),
        (-60, "too short"),
        ("30s", "too short: a workload certificate lives at least 1m"),
        ("91d", "too long"),
        ("", "is not a duration"),
        (True, "is not a duration"),
        (None, "is not a duration"),
        ("1e3", "is not a duration"),
        (float("inf"), "is not a duration"),
    ],
)
def test_ttl_errors(value: object, message: str) -> None:
    err = error({"workload_cert_ttl": value})
    assert err.field == f"{M}.workload_cert_ttl"
    assert message in err.message


@pytest.mark.parametrize(
    ("section", "field", "message"),
    [
        (3, M, "must be STRICT, PERMISSIVE or a mapping"),
        ("LOOSE", M, "'LOOSE' is not one of STRICT, PERMISSIVE"),
        ({"ca": {}}, M, "unknown key 'ca'; the keys are mode, services, root, workload_cert_ttl"),
        ({"mode": "OFF"}, f"{M}.mode", "is not one of STRICT, PERMISSIVE"),
        ({"services": ["a"]}, f"{M}.services", "must be a mapping"),
        ({"services": {"a": "OFF"}}, f"{M}.services.a", "is not one of"),
        ({"root": "certs/root.pem"}, f"{M}.root", "must be a mapping with cert and key"),
        (
            {"root": {"cert": "a.pem"}},
            f"{M}.root.key",
            "is missing; a root needs both cert and key",
        ),
        ({"root": {"key": "a.pem"}}, f"{M}.root.cert", "is missing"),
        ({"root": {"cert": "a", "key": "b", "chain": "c"}}, f"{M}.root", "unknown key 'chain'"),
        ({"root": {"cert": "", "key": "b"}}, f"{M}.root.cert", "must be the path of a PEM file"),
        ({"root": {"cert": "a", "key": 5}}, f"{M}.root.key", "must be the path of a PEM file"),
    ],
)
def test_errors(section: object, field: str, message: str) -> None:
    err = error(section)
    assert err.field == field
    assert message in err.message
