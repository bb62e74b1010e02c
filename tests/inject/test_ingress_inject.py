"""`check` and `up` with an ingress gateway (issue 11): the gateway's services as inject adds
them, the label shorthand merged with the file's routes, and every bad input refused with
its file, service and field before anything starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from composemesh.errors import ConfigError
from composemesh.inject import inject, validate_model
from composemesh.model import wellknown as wk
from composemesh.model.gateways import ingress_urls
from composemesh.model.ingress import IngressSettings
from composemesh.model.wire import decode
from tests.gateway_certs import Authority, stray_key

SERVICES = """
services:
  web:
    image: busybox
    expose: ["8000"]
  api:
    image: busybox
    expose: ["9000"]
    labels: {composemesh.ingress.host: shop.example.com, composemesh.ingress.path: /api/}
  other:
    image: busybox
    networks: [back]
networks:
  back: {}
"""


def model(tmp: Path, ingress: dict[str, Any] | None = None, **section: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(SERVICES)
    authority = Authority(tmp)
    authority.server("www.example.com", stem="www")
    authority.server("shop.example.com", stem="shop")
    doc["x-composemesh"] = {"gateways": {"ingress": ingress or {
        "bind": "127.0.0.1", "http_port": 8080, "https_port": 8443, "redirect_to_https": True,
        "hosts": {
            "www.example.com": {"tls": {"cert": "www.crt", "key": "www.key"},
                                "routes": [{"path": "/", "service": "web"}]},
            "shop.example.com": {"tls": {"cert": "shop.crt", "key": "shop.key"}},
        }}}, **section}
    return doc


def locate(service: str | None, field: str | None) -> str:
    return f"file-of:{service or field}"


def refused(doc: dict[str, Any], tmp: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate_model(doc, locate=locate, base_dir=str(tmp))
    assert "\n" not in str(info.value)
    return info.value


def test_inject_adds_the_gateway_holder_publishing_the_ports_and_its_proxy(tmp_path: Path) -> None:
    doc = model(tmp_path)
    checked = validate_model(doc, locate=locate, base_dir=str(tmp_path))
    result = inject(doc, checked.labels, gateways=checked.gateways)
    services = result.model["services"]
    holder, proxy = services["ingress-gateway-netns"], services["ingress-gateway-proxy"]
    assert holder["ports"] == [
        {"target": 8080, "published": "8080", "host_ip": "127.0.0.1", "protocol": "tcp",
         "mode": "ingress"},
        {"target": 8443, "published": "8443", "host_ip": "127.0.0.1", "protocol": "tcp",
         "mode": "ingress"}]
    assert set(holder["networks"]) == {"default", "back"}  # it reaches every mesh service
    assert holder["environment"][wk.ENV_EXCLUDE_INBOUND] == "8080,8443"
    assert holder["labels"][wk.LABEL_SERVICE] == "ingress-gateway"
    assert holder["labels"][wk.LABEL_GATEWAY] == proxy["labels"][wk.LABEL_GATEWAY] == "ingress"
    assert proxy["network_mode"] == "service:ingress-gateway-netns"
    assert proxy["environment"][wk.ENV_GATEWAY] == "ingress"
    assert "ports" not in proxy and not any("ports" in svc for name, svc in services.items()
                                            if name not in ("ingress-gateway-netns",))
    mounts = {v["target"]: v for v in proxy["volumes"] if v["type"] == "bind"}
    assert mounts[f"{wk.INGRESS_CERT_DIR}/www.example.com/tls.crt"]["source"] == str(
        tmp_path / "www.crt")
    assert mounts[f"{wk.INGRESS_CERT_DIR}/shop.example.com/tls.key"]["read_only"] is True
    # the pilot is told the routes as resolved: the file's and the label's
    told = decode(services[wk.PILOT_SERVICE]["environment"][wk.ENV_INGRESS], IngressSettings)
    routes = {h.name: [(r.path, r.service, r.port) for r in h.routes] for h in told.hosts}
    assert routes == {"www.example.com": [("/", "web", 8000)],
                      "shop.example.com": [("/api/", "api", 9000)]}
    assert (told.redirect_to_https, told.public_https_port) == (True, 8443)
    assert result.ingress is not None
    assert [a.name for a in result.added if a.of == "ingress-gateway"] == [
        "ingress-gateway-netns", "ingress-gateway-proxy"]


def test_injecting_the_meshed_file_again_changes_nothing(tmp_path: Path) -> None:
    doc = model(tmp_path)
    checked = validate_model(doc, locate=locate, base_dir=str(tmp_path))
    once = inject(doc, checked.labels, gateways=checked.gateways)
    again = validate_model(once.model, locate=locate, base_dir=str(tmp_path))
    twice = inject(once.model, again.labels, gateways=again.gateways)
    assert json.dumps(twice.model, sort_keys=True) == json.dumps(once.model, sort_keys=True)
    assert not twice.warnings


def test_a_policy_may_name_the_ingress_gateway_as_its_only_source(tmp_path: Path) -> None:
    doc = model(tmp_path, policies={"api": [{"from": ["ingress-gateway"]}]})
    checked = validate_model(doc, locate=locate, base_dir=str(tmp_path))
    assert checked.policies["api"][0].sources == frozenset({"ingress-gateway"})
    no_ingress: dict[str, Any] = yaml.safe_load(SERVICES)
    no_ingress["services"]["api"]["labels"] = {}
    no_ingress["x-composemesh"] = {"policies": {"api": [{"from": ["ingress-gateway"]}]}}
    assert "not a mesh identity" in str(refused(no_ingress, tmp_path))


def test_the_urls_say_how_to_reach_each_host(tmp_path: Path) -> None:
    checked = validate_model(model(tmp_path), locate=locate, base_dir=str(tmp_path))
    assert checked.gateways.ingress is not None
    assert ingress_urls(checked.gateways.ingress) == [
        ("www.example.com", "https://www.example.com:8443/",
         "curl --resolve www.example.com:8443:127.0.0.1 https://www.example.com:8443/"),
        ("shop.example.com", "https://shop.example.com:8443/",
         "curl --resolve shop.example.com:8443:127.0.0.1 https://shop.example.com:8443/"),
    ]


@pytest.mark.parametrize(("change", "field", "says"), [
    ({"cert": "missing.crt"}, "x-composemesh.gateways.ingress.hosts.www.example.com.tls.cert",
     "missing.crt"),
    ({"cert": "garbage.crt"}, "x-composemesh.gateways.ingress.hosts.www.example.com.tls.cert",
     "not a PEM certificate"),
    ({"cert": "expired.crt", "key": "expired.key"},
     "x-composemesh.gateways.ingress.hosts.www.example.com.tls.cert", "expired"),
    ({"key": "stray.key"}, "x-composemesh.gateways.ingress.hosts.www.example.com.tls.key",
     "does not match"),
])
def test_a_bad_certificate_is_one_error_naming_the_field(
        tmp_path: Path, change: dict[str, str], field: str, says: str) -> None:
    doc = model(tmp_path)
    (tmp_path / "garbage.crt").write_text("not a certificate\n")
    Authority(tmp_path, name="Other CA").server("www.example.com", expired=True, stem="expired")
    stray_key(tmp_path / "stray.key")
    doc["x-composemesh"]["gateways"]["ingress"]["hosts"]["www.example.com"]["tls"].update(change)
    err = refused(doc, tmp_path)
    assert err.field == field and says in err.message, err
    assert err.file == "file-of:x-composemesh"


def test_a_route_to_an_unknown_service_or_port_and_a_route_twice_are_refused(
        tmp_path: Path) -> None:
    doc = model(tmp_path)
    routes = doc["x-composemesh"]["gateways"]["ingress"]["hosts"]["www.example.com"]["routes"]
    routes.append({"path": "/x/", "service": "nope"})
    assert "nope" in str(refused(doc, tmp_path))
    routes[-1] = {"path": "/x/", "service": "web", "port": 1234}
    assert "1234" in str(refused(doc, tmp_path))
    routes[-1] = {"path": "/", "service": "api"}
    err = refused(doc, tmp_path)
    assert "two routes for the path /" in err.message, err
    assert err.field == "x-composemesh.gateways.ingress.hosts.www.example.com.routes[1]"


def test_a_bad_ingress_label_names_the_service_and_the_label(tmp_path: Path) -> None:
    doc = model(tmp_path)
    doc["services"]["api"]["labels"] = {"composemesh.ingress.path": "/api/"}
    err = refused(doc, tmp_path)
    assert (err.service, err.field) == ("api", "label composemesh.ingress.path"), err
    assert "needs composemesh.ingress.host" in err.message
    assert err.file == "file-of:api"
    doc["services"]["api"]["labels"] = {"composemesh.ingress.host": "Not A Host!"}
    err = refused(doc, tmp_path)
    assert (err.service, err.field) == ("api", "label composemesh.ingress.host"), err


def test_a_user_service_with_the_gateways_name_is_refused(tmp_path: Path) -> None:
    doc = model(tmp_path)
    doc["services"]["ingress-gateway"] = {"image": "busybox"}
    err = refused(doc, tmp_path)
    assert "ingress-gateway" in str(err) and err.service == "ingress-gateway"


def test_check_shows_the_gateway_it_will_add_with_its_ports_and_routes(tmp_path: Path) -> None:
    from composemesh.inject.plan import plan_rows

    doc = model(tmp_path)
    checked = validate_model(doc, locate=locate, base_dir=str(tmp_path))
    row = plan_rows(inject(doc, checked.labels, gateways=checked.gateways))[-1]
    assert row[:4] == ("ingress-gateway (added)", "v1", "ingress-gateway-netns",
                       "ingress-gateway-proxy")
    assert row[4] == ("http 127.0.0.1:8080, https 127.0.0.1:8443; www.example.com/ -> web:8000; "
                      "shop.example.com/api/ -> api:9000")
