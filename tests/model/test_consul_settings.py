"""x-composemesh.consul: the issue's contract read as written, one sentence naming each bad key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from composemesh.errors import ConfigError
from composemesh.model.consul import ConsulSettings, parse_consul

CONTRACT = {
    "address": "http://consul.internal:8500",
    "token_file": "./consul.token",
    "datacenter": "dc1",
    "host_address": "192.0.2.10",
    "east_west_port": 15443,
}
SECRET = "b1gs3cr3t-0000-4000-8000-000000000000"


def parse(section: Any, tmp_path: Path, env: dict[str, str] | None = None) -> ConsulSettings:
    settings = parse_consul(section, environ=env or {}, base_dir=tmp_path)
    assert settings is not None
    return settings


def test_the_issues_example_reads_as_written(tmp_path: Path) -> None:
    (tmp_path / "consul.token").write_text(f"{SECRET}\n")
    assert parse(CONTRACT, tmp_path) == ConsulSettings(
        address="http://consul.internal:8500", token=SECRET, datacenter="dc1",
        host_address="192.0.2.10", east_west_port=15443)


def test_absent_means_no_consul() -> None:
    assert parse_consul(None, environ={"CONSUL_HTTP_ADDR": "http://x:8500"}, base_dir=".") is None


def test_the_token_never_shows_in_repr(tmp_path: Path) -> None:
    (tmp_path / "consul.token").write_text(SECRET)
    settings = parse(CONTRACT, tmp_path)
    assert SECRET not in repr(settings) and SECRET not in str(settings)


def test_environment_fills_what_the_file_leaves_out(tmp_path: Path) -> None:
    env = {"CONSUL_HTTP_ADDR": "https://consul.example:8501", "CONSUL_HTTP_TOKEN": f" {SECRET} "}
    settings = parse({"host_address": "192.0.2.10"}, tmp_path, env)
    assert settings == ConsulSettings(address="https://consul.example:8501", token=SECRET,
                                      datacenter=None, host_address="192.0.2.10")
    # host:port without a scheme, as Consul's CLI reads CONSUL_HTTP_ADDR
    assert parse({"host_address": "192.0.2.10"}, tmp_path,
                 {"CONSUL_HTTP_ADDR": "10.0.0.5:8500"}).address == "http://10.0.0.5:8500"


def test_the_file_wins_over_the_environment(tmp_path: Path) -> None:
    (tmp_path / "consul.token").write_text(SECRET)
    env = {"CONSUL_HTTP_ADDR": "http://elsewhere:8500", "CONSUL_HTTP_TOKEN": "other"}
    settings = parse(CONTRACT, tmp_path, env)
    assert (settings.address, settings.token) == ("http://consul.internal:8500", SECRET)


def test_no_token_anywhere_is_none_and_paths_resolve_from_the_compose_dir(
        tmp_path: Path) -> None:
    assert parse({"address": "http://c:8500", "host_address": "::1"}, tmp_path).token is None
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "t").write_text(SECRET)
    absolute = tmp_path / "secrets" / "t"
    for path in ("secrets/t", str(absolute)):
        settings = parse({**CONTRACT, "token_file": path}, tmp_path)
        assert settings.token == SECRET
    assert parse({**CONTRACT, "token_file": "secrets/t", "host_address": "2001:DB8::1"},
                 tmp_path).host_address == "2001:db8::1"


def test_a_trailing_slash_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "consul.token").write_text(SECRET)
    assert parse({**CONTRACT, "address": "http://consul:8500/"}, tmp_path).address == \
        "http://consul:8500"


@pytest.mark.parametrize(("change", "field", "says"), [
    ({"tokenfile": "x"}, "x-composemesh.consul", "unknown key 'tokenfile'"),
    ({"address": "consul.internal:8500"}, "x-composemesh.consul.address",
     "not an http:// or https:// URL"),
    ({"address": "unix:///var/run/consul.sock"}, "x-composemesh.consul.address",
     "not an http:// or https:// URL"),
    ({"address": "http://consul:99999"}, "x-composemesh.consul.address",
     "not an http:// or https:// URL"),
    ({"address": "http://consul:8500/v1"}, "x-composemesh.consul.address", "no path"),
    ({"address": 8500}, "x-composemesh.consul.address", "not an http"),
    ({"token_file": "./missing.token"}, "x-composemesh.consul.token_file", "missing.token"),
    ({"token_file": ""}, "x-composemesh.consul.token_file", "must be the path"),
    ({"datacenter": "DC 1"}, "x-composemesh.consul.datacenter",
     "not a Consul datacenter name"),
    ({"datacenter": "Dc1"}, "x-composemesh.consul.datacenter", "lower-case"),
    ({"datacenter": 1}, "x-composemesh.consul.datacenter", "not a Consul datacenter name"),
    ({"host_address": "consul.internal"}, "x-composemesh.consul.host_address",
     "not an IP address"),
    ({"host_address": "0.0.0.0"}, "x-composemesh.consul.host_address", "other hosts"),
    ({"host_address": None}, "x-composemesh.consul.host_address", "is missing"),
    ({"east_west_port": 0}, "x-composemesh.consul.east_west_port", "not a port (1-65535)"),
    ({"east_west_port": 65536}, "x-composemesh.consul.east_west_port", "not a port"),
    ({"east_west_port": "15443"}, "x-composemesh.consul.east_west_port", "not a port"),
    ({"east_west_port": True}, "x-composemesh.consul.east_west_port", "not a port"),
])
def test_each_bad_key_is_named(tmp_path: Path, change: dict[str, Any], field: str,
                               says: str) -> None:
    (tmp_path / "consul.token").write_text(SECRET)
    section = {k: v for k, v in {**CONTRACT, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        parse_consul(section, environ={}, base_dir=tmp_path)
    assert caught.value.field == field
    assert says in caught.value.message
    assert SECRET not in str(caught.value)


def test_not_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_consul(["address"], environ={}, base_dir=".")
    assert (caught.value.field, caught.value.message) == ("x-composemesh.consul",
                                                          "must be a mapping")


def test_an_unreadable_token_file_names_the_path(tmp_path: Path) -> None:
    token = tmp_path / "consul.token"
    token.write_text(SECRET)
    token.chmod(0)
    try:
        if os.access(token, os.R_OK):
            pytest.skip("running as root: every file is readable")
        with pytest.raises(ConfigError) as caught:
            parse_consul(CONTRACT, environ={}, base_dir=tmp_path)
        assert caught.value.field == "x-composemesh.consul.token_file"
        assert str(token) in caught.value.message and "ermission denied" in caught.value.message
    finally:
        token.chmod(0o600)


def test_a_directory_or_empty_file_is_no_token(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "dir").mkdir()
    for path, says in (("empty", "is empty"), ("dir", "cannot read")):
        with pytest.raises(ConfigError) as caught:
            parse_consul({**CONTRACT, "token_file": path}, environ={}, base_dir=tmp_path)
        assert caught.value.field == "x-composemesh.consul.token_file"
        assert says in caught.value.message and str(tmp_path / path) in caught.value.message


def test_a_token_with_a_space_inside_is_refused_without_showing_it(tmp_path: Path) -> None:
    (tmp_path / "consul.token").write_text("abc def")
    with pytest.raises(ConfigError) as caught:
        parse_consul(CONTRACT, environ={}, base_dir=tmp_path)
    assert "abc" not in str(caught.value) and "spaces" in caught.value.message


def test_no_address_anywhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_consul({"host_address": "192.0.2.10"}, environ={}, base_dir=tmp_path)
    assert caught.value.field == "x-composemesh.consul.address"
    assert "CONSUL_HTTP_ADDR" in caught.value.message
    with pytest.raises(ConfigError) as caught:
        parse_consul({"host_address": "192.0.2.10"},
                     environ={"CONSUL_HTTP_ADDR": "unix:///tmp/c.sock"}, base_dir=tmp_path)
    assert "from CONSUL_HTTP_ADDR" in caught.value.message
