"""`check` and `inject` with ``x-composemesh.consul`` (issue 13): the east-west gateway added as
a mesh service publishing ``east_west_port``, the pilot given the section with the token file
mounted read-only (or the variables passed by name), never the token itself in the output;
every bad input one error naming the file and the field, nothing written.

Through the CLI (``composemesh.cli:main``) with the real `docker compose config` (no engine).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from composemesh.cli import main
from composemesh.inject import inject, validate_model
from composemesh.inject.plan import plan_rows
from composemesh.model import wellknown as wk
from composemesh.model.settings import parse_settings

TOKEN = "b3c1a2f0-5e1d-4c6a-9f7e-secret-token"
ENV_TOKEN = "e7d9c8b6-env-only-secret"

SECTION = """
x-composemesh:
  consul:
    address: http://consul.internal:8500
    token_file: ./consul.token
    datacenter: dc1
    host_address: 192.0.2.10
    east_west_port: 15443
"""

SERVICES = """
services:
  web:
    image: busybox
    ports: ["8080:80"]
    networks: [front, back]
  db:
    image: busybox
    networks: [back]
networks:
  front: {}
  back: {}
  shared: {external: true}
"""


@pytest.fixture(autouse=True)
def no_consul_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)


def project(tmp: Path, section: str = SECTION, services: str = SERVICES,
            token: str | None = TOKEN) -> Path:
    folder = tmp / "app"
    folder.mkdir(exist_ok=True)
    if token is not None:
        (folder / "consul.token").write_text(token + "\n")
    file = folder / "compose.yaml"
    file.write_text(textwrap.dedent(section) + textwrap.dedent(services))
    return file


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def injected(file: Path, out: Path | None = None, env: dict[str, str] | None = None
             ) -> dict[str, Any]:
    target = out or file.parent / "meshed.yaml"
    result = run("inject", "-f", str(file), "-o", str(target), env=env)
    assert result.exit_code == 0, result.output
    text = target.read_text()
    assert TOKEN not in text and ENV_TOKEN not in text
    model: dict[str, Any] = yaml.safe_load(text)
    return model


# --------------------------------------------------------------------------- what is added


def test_the_east_west_gateway_is_a_mesh_service_publishing_the_port(tmp_path: Path) -> None:
    services = injected(project(tmp_path))["services"]
    holder = services["east-west-gateway-netns"]
    proxy = services["east-west-gateway-proxy"]
    assert holder["ports"] == [{"mode": "ingress", "protocol": "tcp", "published": "15443",
                                "target": wk.PORT_EAST_WEST}]
    assert "ports" not in proxy  # the holder owns the namespace: it publishes
    assert set(holder["networks"]) == {"front", "back"}  # every own network, no external one
    assert holder["environment"][wk.ENV_EXCLUDE_INBOUND] == str(wk.PORT_EAST_WEST)
    assert proxy["network_mode"] == "service:east-west-gateway-netns"
    assert proxy["environment"][wk.ENV_GATEWAY] == "east-west"
    assert proxy["environment"]["COMPOSEMESH_SERVICE"] == "east-west-gateway"
    for svc in (holder, proxy):
        assert svc["labels"][wk.LABEL_GATEWAY] == "east-west"
        assert svc["labels"][wk.LABEL_SERVICE] == "east-west-gateway"
    assert holder["labels"][wk.LABEL_ROLE] == wk.ROLE_NETNS
    assert proxy["labels"][wk.LABEL_ROLE] == wk.ROLE_PROXY


def test_the_pilot_gets_the_token_file_read_only_and_a_copy_naming_the_mount(
        tmp_path: Path) -> None:
    file = project(tmp_path)
    model = injected(file)
    pilot = model["services"][wk.PILOT_SERVICE]
    mount = next(v for v in pilot["volumes"] if v["target"] == wk.PILOT_CONSUL_TOKEN)
    assert mount == {"type": "bind", "source": str(file.parent / "consul.token"),
                     "target": wk.PILOT_CONSUL_TOKEN, "read_only": True}
    copy = json.loads(pilot["environment"]["COMPOSEMESH_SETTINGS"])["consul"]
    assert copy == {"address": "http://consul.internal:8500", "token_file": wk.PILOT_CONSUL_TOKEN,
                    "datacenter": "dc1", "host_address": "192.0.2.10", "east_west_port": 15443}
    assert "CONSUL_HTTP_TOKEN" not in pilot["environment"]
    # an agent on the host is reachable as host.docker.internal, on Linux too
    assert pilot["extra_hosts"] == ["host.docker.internal:host-gateway"]
    assert "CONSUL_HTTP_ADDR" not in pilot["environment"]
    # the meshed file's own section names the host's file by its absolute path
    assert model["x-composemesh"]["consul"]["token_file"] == str(file.parent / "consul.token")
    # what the pilot parses in its container (the mount standing in for the target) is what
    # `check` parsed on the host
    in_container = json.loads(pilot["environment"]["COMPOSEMESH_SETTINGS"])
    in_container["consul"]["token_file"] = mount["source"]
    assert parse_settings(in_container, environ={}).consul == parse_settings(
        model["x-composemesh"], environ={}).consul
    assert parse_settings(in_container, environ={}).consul.token == TOKEN  # type: ignore[union-attr]


def test_a_token_and_an_address_from_the_environment_pass_by_name_only(tmp_path: Path) -> None:
    file = project(tmp_path, section="""
        x-composemesh:
          consul:
            host_address: 192.0.2.10
        """, token=None)
    env = {"CONSUL_HTTP_TOKEN": ENV_TOKEN, "CONSUL_HTTP_ADDR": "consul.internal:8500"}
    model = injected(file, env=env)
    pilot = model["services"][wk.PILOT_SERVICE]
    assert pilot["environment"]["CONSUL_HTTP_TOKEN"] is None  # compose takes it at `up`
    assert pilot["environment"]["CONSUL_HTTP_ADDR"] is None
    assert not [v for v in pilot["volumes"] if v["target"] == wk.PILOT_CONSUL_TOKEN]
    assert json.loads(pilot["environment"]["COMPOSEMESH_SETTINGS"])["consul"] == {
        "host_address": "192.0.2.10"}
    # read back through compose with the variables set, and injected again: still no token
    again = injected(file.parent / "meshed.yaml", out=tmp_path / "again.yaml", env=env)
    assert again == model


def test_the_address_may_come_from_the_projects_env_file(tmp_path: Path) -> None:
    """Where compose takes CONSUL_HTTP_ADDR from at `up` (the environment, then ``.env``)."""
    file = project(tmp_path, section="""
        x-composemesh:
          consul:
            host_address: 192.0.2.10
        """, token=None)
    (file.parent / ".env").write_text("CONSUL_HTTP_ADDR=http://consul.internal:8500\n")
    result = run("check", "-f", str(file))
    assert result.exit_code == 0, result.output


def test_injecting_the_meshed_file_again_changes_nothing(tmp_path: Path) -> None:
    file = project(tmp_path)
    once = injected(file)
    elsewhere = tmp_path / "deploy"
    elsewhere.mkdir()
    twice = injected(file.parent / "meshed.yaml", out=elsewhere / "meshed.yaml")
    assert twice == once
    result = run("check", "-f", str(elsewhere / "meshed.yaml"))
    assert result.exit_code == 0, result.output
    assert "injected earlier, dropped now" not in result.output


def test_check_lists_the_gateway_as_added(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from composemesh import cli

    monkeypatch.setattr(cli.out, "width", 250)  # one table row a line
    result = run("check", "-f", str(project(tmp_path)))
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "east-west-gateway (added)" in line)
    assert "east-west-gateway-netns" in row and "tcp *:15443" in row
    assert TOKEN not in result.output


def test_the_plan_row_names_the_port(tmp_path: Path) -> None:
    doc = yaml.safe_load(SECTION + SERVICES)
    (tmp_path / "consul.token").write_text(TOKEN)
    checked = validate_model(doc, base_dir=str(tmp_path), environ={})
    row = plan_rows(inject(doc, checked.labels, gateways=checked.gateways))[-1]
    assert row[:4] == ("east-west-gateway (added)", "v1", "east-west-gateway-netns",
                       "east-west-gateway-proxy")
    assert row[4].startswith("tcp *:15443")


def test_policies_may_name_the_east_west_gateway(tmp_path: Path) -> None:
    doc = yaml.safe_load(SECTION + SERVICES)
    doc["x-composemesh"]["policies"] = {"db": [{"from": ["east-west-gateway", "web"]}]}
    (tmp_path / "consul.token").write_text(TOKEN)
    checked = validate_model(doc, base_dir=str(tmp_path), environ={})
    assert checked.policies["db"][0].sources == frozenset({"east-west-gateway", "web"})
    assert checked.settings.consul is not None
    assert TOKEN not in repr(checked.settings)


def test_without_the_section_the_gateway_goes_with_a_warning(tmp_path: Path) -> None:
    doc = yaml.safe_load(SECTION + SERVICES)
    (tmp_path / "consul.token").write_text(TOKEN)
    checked = validate_model(doc, base_dir=str(tmp_path), environ={})
    once = inject(doc, checked.labels, gateways=checked.gateways).model
    del once["x-composemesh"]["consul"]
    twice = inject(once)
    assert "east-west-gateway-netns" not in twice.model["services"]
    assert any("no consul section any more" in w for w in twice.warnings)
    pilot = twice.model["services"][wk.PILOT_SERVICE]
    assert not [v for v in pilot["volumes"] if v["target"] == wk.PILOT_CONSUL_TOKEN]


# --------------------------------------------------------------------------- bad input


BAD = [
    ("unknown key", {"tokne_file": "./consul.token"}, "x-composemesh.consul", "unknown key"),
    ("bad address", {"address": "consul.internal:8500/x"}, "x-composemesh.consul.address",
     "is not an http:// or https:// URL"),
    ("address with a path", {"address": "http://consul.internal:8500/v1"},
     "x-composemesh.consul.address", "must be the agent's address alone"),
    ("no address", {"address": None}, "x-composemesh.consul.address", "CONSUL_HTTP_ADDR"),
    ("unreadable token file", {"token_file": "./nowhere.token"},
     "x-composemesh.consul.token_file", "cannot read"),
    ("empty token file", {"token_file": "./empty.token"}, "x-composemesh.consul.token_file",
     "is empty"),
    ("bad datacenter", {"datacenter": "DC 1"}, "x-composemesh.consul.datacenter",
     "not a Consul datacenter name"),
    ("no host address", {"host_address": None}, "x-composemesh.consul.host_address",
     "is missing"),
    ("bad host address", {"host_address": "host.example"}, "x-composemesh.consul.host_address",
     "is not an IP address"),
    ("unreachable host address", {"host_address": "0.0.0.0"},
     "x-composemesh.consul.host_address", "not an address other hosts can reach"),
    ("port 0", {"east_west_port": 0}, "x-composemesh.consul.east_west_port", "is not a port"),
    ("port not a number", {"east_west_port": "x"}, "x-composemesh.consul.east_west_port",
     "is not a port"),
    ("port taken by a service", {"east_west_port": 8080}, "x-composemesh.consul.east_west_port",
     "published on the host by service 'web' already"),
    ("port taken by prometheus", {"east_west_port": 9090},
     "x-composemesh.consul.east_west_port", "x-composemesh.monitoring.prometheus"),
]


def bad_section(change: dict[str, Any]) -> str:
    consul: dict[str, Any] = {"address": "http://consul.internal:8500",
                              "token_file": "./consul.token", "datacenter": "dc1",
                              "host_address": "192.0.2.10", "east_west_port": 15443}
    for key, value in change.items():
        if value is None:
            consul.pop(key, None)
        else:
            consul[key] = value
    section: dict[str, Any] = {"consul": consul}
    if consul.get("east_west_port") == 9090:
        section["monitoring"] = {"prometheus": {"port": 9090}}
    return yaml.safe_dump({"x-composemesh": section}, sort_keys=False)


@pytest.mark.parametrize(("change", "field", "says"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
@pytest.mark.parametrize("command", ["check", "inject"])
def test_bad_input_is_one_error_naming_the_file_and_the_field(
        tmp_path: Path, command: str, change: dict[str, Any], field: str, says: str) -> None:
    file = project(tmp_path, section=bad_section(change))
    (file.parent / "empty.token").write_text("\n")
    out = tmp_path / "meshed.yaml"
    args = ["check", "-f", str(file)] if command == "check" else [
        "inject", "-f", str(file), "-o", str(out)]
    result = run(*args)
    assert result.exit_code != 0, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert str(file) in errors[0] and f"{field}:" in errors[0] and says in errors[0], errors[0]
    assert TOKEN not in result.output
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("name", ["east-west-gateway", "east-west-gateway-netns",
                                  "east-west-gateway-proxy"])
def test_a_user_service_with_the_gateways_name_is_refused(tmp_path: Path, name: str) -> None:
    file = project(tmp_path, services=SERVICES.replace(
        "  db:\n", f"  {name}:\n    image: busybox\n  db:\n"))
    result = run("check", "-f", str(file))
    assert result.exit_code != 0
    assert str(file) in result.output and f"service {name!r}" in result.output
    assert "the east-west gateway is 'east-west-gateway'" in result.output


def test_a_bad_token_in_the_environment_is_refused_without_showing_it(tmp_path: Path) -> None:
    file = project(tmp_path, section="""
        x-composemesh:
          consul:
            address: http://consul.internal:8500
            host_address: 192.0.2.10
        """, token=None)
    result = run("check", "-f", str(file), env={"CONSUL_HTTP_TOKEN": "two\tparts"})
    assert result.exit_code != 0
    assert "x-composemesh.consul.token_file" in result.output
    assert "two\tparts" not in result.output


def test_the_pilot_is_told_every_name_docker_answers_in_the_project(tmp_path: Path) -> None:
    """A catalog service of one of these names never takes the local one's place."""
    services = SERVICES.replace("    networks: [back]\n", "    container_name: the-db\n"
                                "    networks:\n      back: {aliases: [database]}\n", 1)
    pilot = injected(project(tmp_path, services=services))["services"][wk.PILOT_SERVICE]
    names = pilot["environment"][wk.ENV_LOCAL_NAMES].split(",")
    assert {"web", "db", "the-db", "database"} <= set(names)
    assert names == sorted(names)


def test_every_app_holder_captures_dns_in_a_federated_mesh_and_none_without(
        tmp_path: Path) -> None:
    services = injected(project(tmp_path))["services"]
    holders = [s for s in services.values()
               if (s.get("labels") or {}).get(wk.LABEL_ROLE) == wk.ROLE_NETNS]
    apps = [h for h in holders if wk.LABEL_GATEWAY not in h["labels"]]
    gateways = [h for h in holders if wk.LABEL_GATEWAY in h["labels"]]
    assert apps and all(h["environment"][wk.ENV_CAPTURE_DNS] == "true" for h in apps)
    assert gateways and not any(wk.ENV_CAPTURE_DNS in (h.get("environment") or {})
                                for h in gateways)  # no app there: no DNS to answer
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "compose.yaml").write_text(textwrap.dedent(SERVICES))
    others = injected(plain / "compose.yaml")["services"]
    assert not any(wk.ENV_CAPTURE_DNS in (s.get("environment") or {}) for s in others.values())
