"""`check` and `up` with an egress section (issue 11): each listed host's name resolves to its
VIP in every meshed namespace, the egress gateway is added on the project's networks and the
outside ones, the origination files mounted; bad input refused with its field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from composemesh.errors import ConfigError
from composemesh.inject import inject, validate_model
from composemesh.inject.plan import plan_rows
from composemesh.model import wellknown as wk
from composemesh.model.egress import EgressSettings
from composemesh.model.wire import decode
from tests.gateway_certs import Authority

SERVICES = """
services:
  app:
    image: busybox
    extra_hosts: ["own.example:10.0.0.9"]
  worker:
    image: busybox
networks:
  default: {}
  outside: {}
"""


def model(tmp: Path, **egress: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SERVICES)
    Authority(tmp, name="Partner CA")
    doc["x-composemesh"] = {"egress": {
        "policy": "REGISTRY_ONLY", "networks": ["outside"],
        "hosts": [
            {"host": "api.partner.example", "port": 443, "protocol": "tls"},
            {"host": "legacy.partner.example", "port": 80, "protocol": "http",
             "tls_origination": {"port": 443, "ca": "partner-ca.pem"}},
            {"host": "db.partner.example", "port": 5432, "protocol": "tcp",
             "address": "10.1.2.3"},
        ], **egress}}
    return doc


def locate(service: str | None, field: str | None) -> str:
    return f"file-of:{service or field}"


def meshed(tmp: Path, doc: dict[str, Any]) -> Any:
    checked = validate_model(doc, locate=locate, base_dir=str(tmp))
    return inject(doc, checked.labels, gateways=checked.gateways)


def test_each_listed_host_resolves_to_its_vip_in_every_meshed_namespace(tmp_path: Path) -> None:
    services = meshed(tmp_path, model(tmp_path)).model["services"]
    assert services["app-netns"]["extra_hosts"] == [
        "own.example:10.0.0.9", "api.partner.example:240.240.0.1",
        "legacy.partner.example:240.240.0.2", "db.partner.example:240.240.0.3"]
    assert "db.partner.example:240.240.0.3" in services["worker-netns"]["extra_hosts"]
    assert "extra_hosts" not in services["egress-gateway-netns"]  # it resolves the real names


def test_the_egress_gateway_joins_the_outside_and_gets_the_origination_files(
        tmp_path: Path) -> None:
    result = meshed(tmp_path, model(tmp_path))
    services = result.model["services"]
    holder, proxy = services["egress-gateway-netns"], services["egress-gateway-proxy"]
    assert set(holder["networks"]) == {"default", "outside"}
    assert not any("outside" in (svc.get("networks") or {}) for name, svc in services.items()
                   if not name.startswith("egress-gateway"))  # it alone reaches the outside
    assert holder["environment"][wk.ENV_EXCLUDE_INBOUND] == str(wk.EGRESS_PORT)
    assert holder["labels"][wk.LABEL_GATEWAY] == proxy["environment"][wk.ENV_GATEWAY] == "egress"
    mounts = {v["target"]: v for v in proxy["volumes"] if v["type"] == "bind"}
    assert mounts[f"{wk.EGRESS_FILES_DIR}/1/ca.pem"]["source"] == str(tmp_path / "partner-ca.pem")
    assert mounts[f"{wk.EGRESS_FILES_DIR}/1/ca.pem"]["read_only"] is True
    told = decode(services[wk.PILOT_SERVICE]["environment"][wk.ENV_EGRESS], EgressSettings)
    assert told.policy == "REGISTRY_ONLY"
    assert [(h.host, h.port, h.protocol, h.vip, h.address) for h in told.hosts] == [
        ("api.partner.example", 443, "tls", "240.240.0.1", None),
        ("legacy.partner.example", 80, "http", "240.240.0.2", None),
        ("db.partner.example", 5432, "tcp", "240.240.0.3", "10.1.2.3")]
    assert told.hosts[1].origination is not None
    assert told.hosts[1].origination.ca == f"{wk.EGRESS_FILES_DIR}/1/ca.pem"
    row = plan_rows(result)[-1]
    assert row[0] == "egress-gateway (added)" and row[4].startswith("REGISTRY_ONLY; ")


def test_injecting_again_changes_nothing(tmp_path: Path) -> None:
    doc = model(tmp_path)
    once = meshed(tmp_path, doc)
    twice = meshed(tmp_path, once.model)
    assert json.dumps(twice.model, sort_keys=True) == json.dumps(once.model, sort_keys=True)


def test_registry_only_without_hosts_adds_no_gateway_but_tells_the_proxies(
        tmp_path: Path) -> None:
    services = meshed(tmp_path, model(tmp_path, hosts=[], networks=[])).model["services"]
    assert "egress-gateway-netns" not in services
    told = decode(services[wk.PILOT_SERVICE]["environment"][wk.ENV_EGRESS], EgressSettings)
    assert (told.policy, told.hosts) == ("REGISTRY_ONLY", ())


@pytest.mark.parametrize(("host", "field", "says"), [
    ({"host": "x.example", "protocol": "tls"}, "x-composemesh.egress.hosts[0].port",
     "is missing"),
    ({"host": "x.example", "port": 1, "protocol": "udp"},
     "x-composemesh.egress.hosts[0].protocol", "'udp' is not a protocol"),
    ({"host": "x.example", "port": 1, "protocol": "http",
      "tls_origination": {"ca": "leaf.crt"}},
     "x-composemesh.egress.hosts[0].tls_origination.ca", "not a CA"),
])
def test_bad_egress_hosts_are_refused_with_their_field(
        tmp_path: Path, host: dict[str, Any], field: str, says: str) -> None:
    Authority(tmp_path).server("leaf.example", stem="leaf")
    doc = model(tmp_path, hosts=[host])
    with pytest.raises(ConfigError) as info:
        validate_model(doc, locate=locate, base_dir=str(tmp_path))
    assert info.value.field == field and says in info.value.message, info.value
