"""The gateways' TLS contexts over real TLS on a socketpair: the ingress serves each host its
own certificate by SNI (the first one without SNI or for an unknown name), the egress's
origination verifies the server against the configured CA and name."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509

from composemesh.model.gateways import TLSFiles
from composemesh.proxy.gateway_tls import ingress_context, origination_context
from tests.gateway_certs import Authority


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[x509.Certificate | None, str | None]:
    """A real TLS handshake over a socketpair; the certificate the client got and the ALPN."""
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            failure.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(a, server_hostname=server_hostname) as tls:
            assert tls.recv(2) == b"ok"
            der = tls.getpeercert(binary_form=True)
            alpn = tls.selected_alpn_protocol()
    finally:
        a.close()
        thread.join(10)
        b.close()
    return (x509.load_der_x509_certificate(der) if der else None), alpn


def common_name(cert: x509.Certificate | None) -> str:
    assert cert is not None
    return str(cert.subject.rfc4514_string())


@pytest.fixture
def pki(tmp_path: Path) -> Authority:
    return Authority(tmp_path)


@pytest.fixture
def hosts(pki: Authority) -> dict[str, TLSFiles]:
    return {name: TLSFiles(*pki.server(name)) for name in ("www.example.com", "api.example.com")}


def user_client(pki: Authority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.path))
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def test_each_host_gets_its_certificate(pki: Authority, hosts: dict[str, TLSFiles]) -> None:
    server = ingress_context(hosts)
    for name in hosts:
        cert, alpn = handshake(server, user_client(pki), name)
        assert common_name(cert) == f"CN={name}"
        assert alpn == "http/1.1"
    cert, _ = handshake(server, user_client(pki), "API.Example.com")
    assert common_name(cert) == "CN=api.example.com"


def test_no_sni_or_unknown_gets_the_first(pki: Authority, hosts: dict[str, TLSFiles]) -> None:
    server = ingress_context(hosts)
    loose = user_client(pki)
    loose.check_hostname = False
    for name in (None, "unknown.example.com"):
        cert, _ = handshake(server, loose, name)
        assert common_name(cert) == "CN=www.example.com"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, user_client(pki), "unknown.example.com")


def test_tls_12_and_later(pki: Authority, hosts: dict[str, TLSFiles]) -> None:
    assert ingress_context(hosts).minimum_version == ssl.TLSVersion.TLSv1_2
    assert origination_context(pki.path).minimum_version == ssl.TLSVersion.TLSv1_2
    client = user_client(pki)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    cert, _ = handshake(ingress_context(hosts), client, "api.example.com")
    assert common_name(cert) == "CN=api.example.com"


def test_ingress_needs_a_host() -> None:
    with pytest.raises(ValueError):
        ingress_context({})


def test_origination_verifies_ca_and_name(pki: Authority, tmp_path: Path) -> None:
    server = ingress_context(
        {"legacy.partner.example": TLSFiles(*pki.server("legacy.partner.example"))}
    )
    cert, alpn = handshake(server, origination_context(pki.path), "legacy.partner.example")
    assert common_name(cert) == "CN=legacy.partner.example" and alpn == "http/1.1"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, origination_context(pki.path), "other.partner.example")
    (tmp_path / "other").mkdir()
    other = Authority(tmp_path / "other", name="Other CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, origination_context(other.path), "legacy.partner.example")


def test_origination_client_certificate(pki: Authority) -> None:
    server = ingress_context(
        {"mtls.partner.example": TLSFiles(*pki.server("mtls.partner.example"))}
    )
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=str(pki.path))
    cert, key = pki.server("client.example", stem="client")
    got, _ = handshake(server, origination_context(pki.path, cert, key), "mtls.partner.example")
    assert common_name(got) == "CN=mtls.partner.example"
    with pytest.raises(ValueError):
        origination_context(pki.path, cert, None)
