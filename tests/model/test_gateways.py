"""The gateway config: decoding, the label shorthand, merging, matching, egress verdicts and
certificate checks, each mistake one ConfigError naming its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from composemesh.errors import ConfigError
from composemesh.model import gateways as gw
from composemesh.model.gateways import (
    Egress,
    EgressHost,
    HostRoute,
    IngressRoute,
    TLSOrigination,
    check_certificates,
    egress_lookup,
    egress_verdict,
    load_gateways,
    match_route,
    merge_routes,
    parse_gateways,
    route_from_labels,
)
from tests.gateway_certs import Authority, stray_key

SERVICES = {"web": frozenset({8000}), "api": frozenset({8000, 9000}), "any": frozenset()}
H = "x-composemesh.gateways.ingress.hosts.www.example.com"
E = "x-composemesh.egress.hosts[0]"


def ingress(**over: Any) -> dict[str, Any]:
    host: dict[str, Any] = {
        "tls": {"cert": "certs/www.crt", "key": "certs/www.key"},
        "routes": [
            {"path": "/api/", "service": "api", "port": 8000},
            {"path": "/", "service": "web", "port": 8000},
        ],
    }
    host.update(over.pop("host", {}))
    spec = {
        "bind": "127.0.0.1",
        "http_port": 8080,
        "https_port": 8443,
        "redirect_to_https": True,
        "hosts": {"www.example.com": host},
    }
    spec.update(over)
    return {"gateways": {"ingress": spec}}


def egress(*hosts: dict[str, Any], **over: Any) -> dict[str, Any]:
    return {
        "egress": {"policy": "REGISTRY_ONLY", "networks": ["outside"], "hosts": list(hosts), **over}
    }


def parse(section: dict[str, Any], base: Path = Path("/p")) -> gw.Gateways:
    return parse_gateways(section, base_dir=base, services=SERVICES)


def error(section: dict[str, Any], field: str, *words: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(section)
    assert info.value.field == field, str(info.value)
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value


def test_absent_sections() -> None:
    assert parse_gateways(None, base_dir=Path("/p"), services=SERVICES) == gw.Gateways()
    got = parse({})
    assert got.ingress is None and got.egress == Egress(policy="ALLOW_ANY")


def test_contract_example_decodes() -> None:
    section = {
        **ingress(),
        **egress(
            {"host": "api.partner.example", "port": 443, "protocol": "tls"},
            {
                "host": "legacy.partner.example",
                "port": 80,
                "protocol": "http",
                "tls_origination": {"port": 443, "ca": "certs/partner-ca.pem"},
            },
            {"host": "db.partner.example", "port": 5432, "protocol": "tcp", "address": "10.1.2.3"},
        ),
    }
    got = parse(section)
    assert got.ingress is not None
    assert (got.ingress.bind, got.ingress.http_port, got.ingress.https_port) == (
        "127.0.0.1",
        8080,
        8443,
    )
    assert got.ingress.redirect_to_https
    (host,) = got.ingress.hosts
    assert host.name == "www.example.com"
    assert host.tls == gw.TLSFiles(Path("/p/certs/www.crt"), Path("/p/certs/www.key"))
    assert host.routes == (IngressRoute("/api/", "api", 8000), IngressRoute("/", "web", 8000))
    assert got.ingress.host("WWW.Example.com.:8443") is host
    assert got.egress.policy == "REGISTRY_ONLY" and got.egress.networks == ("outside",)
    assert got.egress.hosts[1] == EgressHost(
        "legacy.partner.example",
        80,
        "http",
        tls_origination=TLSOrigination(443, Path("/p/certs/partner-ca.pem")),
    )
    assert got.egress.hosts[2].address == "10.1.2.3"


def test_defaults() -> None:
    got = parse(
        {
            "gateways": {
                "ingress": {
                    "http_port": 80,
                    "hosts": {"a.example": {"routes": [{"service": "web"}]}},
                }
            }
        }
    )
    assert got.ingress is not None
    assert got.ingress.bind == "0.0.0.0" and not got.ingress.redirect_to_https
    assert got.ingress.hosts[0].routes == (IngressRoute("/", "web", 8000),)
    assert got.ingress.hosts[0].tls is None


@pytest.mark.parametrize(
    ("section", "field", "words"),
    [
        ({"gateways": {"ingres": {}}}, "x-composemesh.gateways", ("'ingres'", "ingress")),
        (ingress(tcp_port=1), "x-composemesh.gateways.ingress", ("'tcp_port'", "https_port")),
        (ingress(host={"weight": 1}), H, ("'weight'", "tls, routes")),
        (ingress(host={"tls": {"cert": "a", "key": "b", "ca": "c"}}), f"{H}.tls", ("'ca'",)),
        (ingress(host={"tls": {"cert": "a"}}), f"{H}.tls.key", ("PEM",)),
        (
            ingress(host={"routes": [{"path": "/", "service": "web", "weight": 3}]}),
            f"{H}.routes[0]",
            ("'weight'",),
        ),
        (ingress(http_port=0), "x-composemesh.gateways.ingress.http_port", ("1 to 65535",)),
        (ingress(https_port=65536), "x-composemesh.gateways.ingress.https_port", ("1 to 65535",)),
        (ingress(https_port=True), "x-composemesh.gateways.ingress.https_port", ("port",)),
        (ingress(https_port=8080), "x-composemesh.gateways.ingress.https_port", ("same",)),
        (
            ingress(http_port=None, https_port=None, redirect_to_https=False),
            "x-composemesh.gateways.ingress",
            ("publishes nothing",),
        ),
        (ingress(https_port=None), "x-composemesh.gateways.ingress.redirect_to_https", ("both",)),
        (ingress(bind="localhost"), "x-composemesh.gateways.ingress.bind", ("IP address",)),
        (ingress(host={"tls": None}), f"{H}.tls", ("https_port", "tls")),
        (
            ingress(host={"routes": [{"path": "/", "service": "nope", "port": 8000}]}),
            f"{H}.routes[0].service",
            ("'nope'", "any, api, web"),
        ),
        (
            ingress(host={"routes": [{"path": "/", "service": "web", "port": 9000}]}),
            f"{H}.routes[0].port",
            ("no port 9000", "8000"),
        ),
        (
            ingress(host={"routes": [{"path": "/", "service": "api"}]}),
            f"{H}.routes[0].port",
            ("missing", "8000, 9000"),
        ),
        (
            ingress(host={"routes": [{"path": "/", "service": "web", "port": 70000}]}),
            f"{H}.routes[0].port",
            ("1 to 65535",),
        ),
        (
            ingress(host={"routes": [{"path": "api", "service": "web"}]}),
            f"{H}.routes[0].path",
            ("path prefix",),
        ),
        (
            ingress(
                host={
                    "routes": [
                        {"path": "/a", "service": "web"},
                        {"path": "/a", "service": "api", "port": 9000},
                    ]
                }
            ),
            f"{H}.routes[1]",
            ("two routes", f"{H}.routes[0] and {H}.routes[1]"),
        ),
    ],
)
def test_bad_ingress(section: dict[str, Any], field: str, words: tuple[str, ...]) -> None:
    error(section, field, *words)


def test_bad_host_name() -> None:
    section = {"gateways": {"ingress": {"http_port": 80, "hosts": {"bad host": {}}}}}
    error(section, "x-composemesh.gateways.ingress.hosts.bad host", "DNS host name")


def test_any_port_when_unknown() -> None:
    got = parse(ingress(host={"routes": [{"service": "any", "port": 1234}]}))
    assert got.ingress is not None and got.ingress.hosts[0].routes[0].port == 1234


@pytest.mark.parametrize(
    ("section", "field", "words"),
    [
        ({"egress": {"policy": "DENY"}}, "x-composemesh.egress.policy", ("REGISTRY_ONLY",)),
        ({"egress": {"hosts": [], "allow": 1}}, "x-composemesh.egress", ("'allow'", "networks")),
        (egress({"host": "a.example", "protocol": "tls"}), f"{E}.port", ("missing",)),
        (
            egress({"host": "a.example", "port": 443}),
            f"{E}.protocol",
            ("missing", "tls, http, tcp"),
        ),
        (
            egress({"host": "a.example", "port": 443, "protocol": "udp"}),
            f"{E}.protocol",
            ("'udp'", "tls, http, tcp"),
        ),
        (egress({"host": "a.example", "port": 0, "protocol": "tls"}), f"{E}.port", ("1 to 65535",)),
        (egress({"port": 443, "protocol": "tls"}), f"{E}.host", ("missing",)),
        (egress({"host": "web", "port": 443, "protocol": "tls"}), f"{E}.host", ("mesh service",)),
        (
            egress({"host": "a.example", "port": 443, "protocol": "tls", "sni": "x"}),
            E,
            ("'sni'", "tls_origination"),
        ),
        (
            egress(
                {"host": "a.example", "port": 443, "protocol": "tls"},
                {"host": "a.example", "port": 443, "protocol": "tcp"},
            ),
            "x-composemesh.egress.hosts[1]",
            ("again", E),
        ),
        (
            egress({"host": "a.example", "port": 80, "protocol": "tls", "tls_origination": {}}),
            f"{E}.tls_origination",
            ("http only",),
        ),
        (
            egress(
                {
                    "host": "a.example",
                    "port": 80,
                    "protocol": "http",
                    "tls_origination": {"port": 99999},
                }
            ),
            f"{E}.tls_origination.port",
            ("1 to 65535",),
        ),
        (
            egress(
                {
                    "host": "a.example",
                    "port": 80,
                    "protocol": "http",
                    "tls_origination": {"cert": "c.pem"},
                }
            ),
            f"{E}.tls_origination.key",
            ("both",),
        ),
        (
            egress(
                {
                    "host": "a.example",
                    "port": 80,
                    "protocol": "http",
                    "tls_origination": {"verify": False},
                }
            ),
            f"{E}.tls_origination",
            ("'verify'",),
        ),
        (
            egress(
                {"host": "a.example", "port": 80, "protocol": "tcp", "address": "not an address"}
            ),
            f"{E}.address",
            ("IP address",),
        ),
        (egress(networks="outside"), "x-composemesh.egress.networks", ("list",)),
    ],
)
def test_bad_egress(section: dict[str, Any], field: str, words: tuple[str, ...]) -> None:
    error(section, field, *words)


def test_unknown_network() -> None:
    with pytest.raises(ConfigError) as info:
        parse_gateways(egress(), base_dir=Path("/p"), services=SERVICES, networks={"default"})
    assert info.value.field == "x-composemesh.egress.networks[0]"
    assert "'outside'" in info.value.message and "default" in info.value.message


# --------------------------------------------------------------------------- labels, merging


def test_label_route() -> None:
    got = route_from_labels("web", "WWW.example.com", None, None, ports=frozenset({8000}))
    assert got == HostRoute("www.example.com", IngressRoute("/", "web", 8000))
    got = route_from_labels("api", "a.example", "/v1/", "9000", ports=frozenset({8000, 9000}))
    assert got == HostRoute("a.example", IngressRoute("/v1/", "api", 9000))
    assert route_from_labels("web", None, None, None, ports=frozenset()) is None


@pytest.mark.parametrize(
    ("host", "path", "port", "label", "words"),
    [
        (None, "/x", None, "composemesh.ingress.path", ("composemesh.ingress.host",)),
        (None, None, "80", "composemesh.ingress.port", ("composemesh.ingress.host",)),
        ("bad host", None, None, "composemesh.ingress.host", ("DNS",)),
        ("a.example", "x", None, "composemesh.ingress.path", ("path prefix",)),
        ("a.example", None, "http", "composemesh.ingress.port", ("port",)),
        ("a.example", None, "9000", "composemesh.ingress.port", ("no port 9000",)),
        ("a.example", None, "0", "composemesh.ingress.port", ("1 to 65535",)),
    ],
)
def test_bad_labels(
    host: str | None, path: str | None, port: str | None, label: str, words: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as info:
        route_from_labels("web", host, path, port, ports=frozenset({8000}))
    assert info.value.service == "web" and info.value.field == f"label {label}"
    for word in words:
        assert word in info.value.message


def test_merge_adds_label_routes_and_hosts() -> None:
    base = parse(ingress(https_port=None, redirect_to_https=False)).ingress
    labels = [
        route_from_labels("api", "www.example.com", "/v2/", "9000", ports=SERVICES["api"]),
        route_from_labels("web", "b.example", None, None, ports=SERVICES["web"]),
    ]
    merged = merge_routes(base, [r for r in labels if r is not None])
    assert merged is not None
    assert [h.name for h in merged.hosts] == ["www.example.com", "b.example"]
    assert merged.hosts[0].routes[-1] == IngressRoute("/v2/", "api", 9000)
    assert merge_routes(None, []) is None


def test_merge_same_host_and_path_names_both() -> None:
    base = parse(ingress()).ingress
    label = route_from_labels("web", "www.example.com", "/api/", None, ports=SERVICES["web"])
    assert label is not None
    with pytest.raises(ConfigError) as info:
        merge_routes(base, [label])
    assert f"{H}.routes[0]" in info.value.message
    assert "the labels of service 'web'" in info.value.message


def test_merge_errors() -> None:
    label = route_from_labels("web", "new.example", None, None, ports=SERVICES["web"])
    assert label is not None
    with pytest.raises(ConfigError) as info:
        merge_routes(None, [label])
    assert info.value.field == "x-composemesh.gateways.ingress"
    with pytest.raises(ConfigError) as info:
        merge_routes(parse(ingress()).ingress, [label])
    assert info.value.field == "x-composemesh.gateways.ingress.hosts.new.example.tls"
    with pytest.raises(ConfigError) as info:
        merge_routes(parse(ingress(host={"routes": []})).ingress, [])
    assert info.value.field == f"{H}.routes"


# --------------------------------------------------------------------------- decisions


def test_longest_prefix_wins() -> None:
    routes = (
        IngressRoute("/", "web", 1),
        IngressRoute("/api/v1/", "api", 3),
        IngressRoute("/api/", "api", 2),
    )
    assert match_route(routes, "/api/v1/x").port == 3  # type: ignore[union-attr]
    assert match_route(routes, "/api/x").port == 2  # type: ignore[union-attr]
    assert match_route(routes, "/apix").port == 1  # type: ignore[union-attr]
    assert match_route(routes[1:], "/other") is None
    assert match_route((), "/") is None


def test_egress_verdicts() -> None:
    hosts = (
        EgressHost("api.partner.example", 443, "tls"),
        EgressHost("db.partner.example", 5432, "tcp", address="10.1.2.3"),
    )
    strict = Egress(policy="REGISTRY_ONLY", hosts=hosts)
    assert egress_lookup(strict, "API.partner.example.", 443) is hosts[0]
    assert egress_lookup(strict, "api.partner.example", 80) is None
    assert egress_lookup(strict, "10.1.2.3", 5432) is hosts[1]
    assert egress_verdict(strict, "api.partner.example", 443) == gw.EgressVerdict(
        "egress", "egress-gateway", hosts[0]
    )
    assert egress_verdict(strict, "evil.example", 443) == gw.EgressVerdict(
        "refuse", "BlackHoleCluster"
    )
    assert egress_verdict(strict, None, 443).action == "refuse"
    loose = Egress(policy="ALLOW_ANY", hosts=hosts)
    assert egress_verdict(loose, "evil.example", 443) == gw.EgressVerdict(
        "passthrough", "PassthroughCluster"
    )
    assert egress_verdict(loose, "db.partner.example", 5432).host is hosts[1]


# --------------------------------------------------------------------------- certificates


@pytest.fixture
def pki(tmp_path: Path) -> Authority:
    (tmp_path / "certs").mkdir()
    return Authority(tmp_path / "certs")


def tls_section(cert: Path, key: Path, *extra: dict[str, Any]) -> dict[str, Any]:
    return {**ingress(host={"tls": {"cert": str(cert), "key": str(key)}}), **egress(*extra)}


def check(section: dict[str, Any], base: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_gateways(section, base_dir=base, services=SERVICES)
    return info.value


def test_good_certificates(pki: Authority, tmp_path: Path) -> None:
    pki.server("www.example.com", stem="www")
    client_cert, client_key = pki.server("client.example", stem="client")
    section = {
        **ingress(),
        **egress(
            {
                "host": "legacy.partner.example",
                "port": 80,
                "protocol": "http",
                "tls_origination": {
                    "ca": "certs/test-ca.pem",
                    "cert": str(client_cert),
                    "key": str(client_key),
                },
            }
        ),
    }
    got = load_gateways(section, base_dir=tmp_path, services=SERVICES)
    infos = check_certificates(got)
    assert [i.dns_names for i in infos] == [("www.example.com",), (), ("client.example",)]
    assert infos[0].not_after > gw.datetime.now(gw.UTC)


def test_certificate_missing(tmp_path: Path) -> None:
    err = check(ingress(), tmp_path)
    assert err.field == f"{H}.tls.cert" and "does not exist" in err.message


def test_certificate_not_pem(pki: Authority, tmp_path: Path) -> None:
    _, key = pki.server("www.example.com")
    (tmp_path / "junk.crt").write_text("not a certificate")
    err = check(tls_section(tmp_path / "junk.crt", key), tmp_path)
    assert err.field == f"{H}.tls.cert" and "not a PEM certificate" in err.message


def test_key_not_pem(pki: Authority, tmp_path: Path) -> None:
    cert, key = pki.server("www.example.com")
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    err = check(tls_section(cert, key), tmp_path)
    assert err.field == f"{H}.tls.key" and "not a PEM private key" in err.message


def test_certificate_expired(pki: Authority, tmp_path: Path) -> None:
    cert, key = pki.server("www.example.com", expired=True)
    err = check(tls_section(cert, key), tmp_path)
    assert err.field == f"{H}.tls.cert" and "expired on" in err.message


def test_key_does_not_match(pki: Authority, tmp_path: Path) -> None:
    cert, _ = pki.server("www.example.com")
    err = check(tls_section(cert, stray_key(tmp_path / "stray.key")), tmp_path)
    assert err.field == f"{H}.tls.key" and "does not match" in err.message


def test_certificate_for_another_host(pki: Authority, tmp_path: Path) -> None:
    cert, key = pki.server("other.example")
    err = check(tls_section(cert, key), tmp_path)
    assert err.field == f"{H}.tls.cert" and "not www.example.com" in err.message


@pytest.mark.parametrize(
    ("ca", "words"), [(False, "not a CA"), (None, "not a CA"), ("missing", "does not exist")]
)
def test_origination_ca(pki: Authority, tmp_path: Path, ca: bool | None | str, words: str) -> None:
    cert, key = pki.server("www.example.com", stem="www")
    path = "nope.pem" if ca == "missing" else str(Authority(tmp_path, "Fake CA", ca=ca).path)
    origination = {
        "host": "l.example",
        "port": 80,
        "protocol": "http",
        "tls_origination": {"ca": path},
    }
    err = check(tls_section(cert, key, origination), tmp_path)
    assert err.field == f"{E}.tls_origination.ca" and words in err.message
    assert str(err).startswith(f"{E}.tls_origination.ca: ")
