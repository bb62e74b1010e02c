"""The ingress gateway's listeners (proxy.ingress) on loopback, with real TLS: each host's
certificate by SNI (the client verifies the chain with the test CA), Host and longest path
prefix routing into two mesh services, 404 for an unknown host or path, 308 from plain HTTP
to the https URL, and what the mesh is told of the client (x-forwarded-for/-proto, the trace
headers passed on). The routing after the ingress is the outbound HTTP path's, tested in
test_http.py; the gateway in a real mesh: tests/e2e/test_ingress.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from composemesh.model.ingress import IngressHostSpec, IngressPath, IngressSettings
from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset
from composemesh.model.snapshot import (
    DeclaredProtocols,
    ProxyIdentity,
    ServiceEndpoint,
    Snapshot,
    SnapshotSettings,
    encode_snapshot,
)
from composemesh.proxy.http import HttpPath
from composemesh.proxy.ingress import mounted_certificates, start_ingress
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.router import RouterSwitch
from composemesh.proxy.server import routing_applier
from composemesh.proxy.stats import ProxyStats
from tests.gateway_certs import Authority
from tests.support import free_port

from .conftest import run_on
from .test_http_wire import RawUpstream, Request, header, read_responses

WEB, API = "127.0.0.2", "127.0.0.3"
WWW, SHOP = "www.example.com", "shop.example.com"
GATEWAY = ProxyIdentity("shop-ingress-gateway-netns-1", "shop", "ingress-gateway",
                        "ingress-gateway", "v1")


def says(name: bytes):  # type: ignore[no-untyped-def]
    def respond(request: Request, index: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(name), name)
    return respond


@dataclass
class Ingress:
    https: int
    http: int
    ca: ssl.SSLContext
    web: RawUpstream
    api: RawUpstream

    async def request(self, host: str, target: str, *, sni: str | None = None,
                      tls: bool = True, extra: bytes = b"") -> tuple[dict[str, object], object]:
        """One GET with ``Host: host``; the response and the server's certificate."""
        if tls:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", self.https, ssl=self.ca, server_hostname=sni or host)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.http)
        try:
            writer.write(b"GET %s HTTP/1.1\r\nhost: %s\r\n%s\r\n"
                         % (target.encode(), host.encode(), extra))
            messages, _ = await read_responses(reader)
            der = writer.get_extra_info("ssl_object").getpeercert(True) if tls else None
            cert = x509.load_der_x509_certificate(der) if der else None
            return messages[0], cert
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def ingress(tmp: Path, redirect: bool = True) -> AsyncIterator[Ingress]:
    authority = Authority(tmp)
    certs = tmp / "mounted"
    for host in (WWW, SHOP):
        cert, key = authority.server(host)
        (certs / host).mkdir(parents=True)
        shutil.copy(cert, certs / host / "tls.crt")
        shutil.copy(key, certs / host / "tls.key")
    web, api = RawUpstream(WEB, says(b"web")), RawUpstream(API, says(b"api"))
    port = await web.start()
    await api.start(port)

    def service(name: str) -> ServiceRouting:
        return ServiceRouting(name, (HttpRoute("default", (), (WeightedSubset("v1", 1),)),))

    settings = SnapshotSettings(
        services={"web": (ServiceEndpoint("shop-web-netns-1", "v1", WEB),),
                  "api": (ServiceEndpoint("shop-api-netns-1", "v1", API),)},
        routing={"web": service("web"), "api": service("api")},
        protocols={"web": DeclaredProtocols("http"), "api": DeclaredProtocols("http")},
        ingress=IngressSettings(
            http=True, https=True, redirect_to_https=redirect, public_https_port=8443,
            hosts=(IngressHostSpec(WWW, tls=True, routes=(IngressPath("/api/", "api", port),
                                                          IngressPath("/", "web", port))),
                   IngressHostSpec(SHOP, tls=True, routes=(IngressPath("/", "api", port),)))))
    switch = RouterSwitch()
    http = HttpPath(ProxyStats(), switch=switch)
    answer = ConfigStore([routing_applier(switch, http, random.Random(1))]).offer(
        encode_snapshot(Snapshot("1", GATEWAY, settings=settings)))
    assert answer.ok, answer.reason
    https_port, http_port = free_port(), free_port()
    servers = await start_ingress(http, host="127.0.0.1", http_port=http_port,
                                  https_port=https_port, cert_dir=certs)
    client = ssl.create_default_context(cafile=str(authority.path))
    try:
        yield Ingress(https_port, http_port, client, web, api)
    finally:
        for server in servers:
            server.close()
        http.close()
        web.close()
        api.close()


def test_the_mounted_certificates_are_found_by_host(tmp_path: Path) -> None:
    authority = Authority(tmp_path)
    cert, key = authority.server(WWW)
    (tmp_path / "m" / WWW).mkdir(parents=True)
    (tmp_path / "m" / "half").mkdir()
    shutil.copy(cert, tmp_path / "m" / WWW / "tls.crt")
    shutil.copy(key, tmp_path / "m" / WWW / "tls.key")
    shutil.copy(cert, tmp_path / "m" / "half" / "tls.crt")  # no key: not served
    found = mounted_certificates(tmp_path / "m")
    assert list(found) == [WWW]
    assert mounted_certificates(tmp_path / "none") == {}


def test_https_by_sni_routes_by_host_and_longest_path_and_says_where_from(
        loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with ingress(tmp_path) as gw:
            answer, cert = await gw.request(WWW, "/api/items?q=1", extra=(
                b"x-forwarded-for: 203.0.113.9\r\nx-forwarded-proto: http\r\n"
                b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n"))
            assert answer["body"] == b"api"
            assert cert is not None
            assert cert.extensions.get_extension_for_class(  # type: ignore[attr-defined]
                x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [WWW]
            seen = gw.api.requests[-1]
            names = {n.lower(): v for n, v in seen.headers}
            assert seen.url == b"/api/items?q=1"
            assert names[b"x-forwarded-for"] == b"203.0.113.9, 127.0.0.1"
            assert names[b"x-forwarded-proto"] == b"https"  # the client's own is not believed
            assert names[b"traceparent"].startswith(b"00-4bf92f3577b34da6")
            assert names[b"host"] == WWW.encode()

            answer, _ = await gw.request(WWW, "/apix")  # a prefix of characters, not /api/
            assert answer["body"] == b"web"
            answer, cert = await gw.request(SHOP, "/")
            assert answer["body"] == b"api"
            assert cert.subject.rfc4514_string() == f"CN={SHOP}"  # type: ignore[attr-defined]
            assert len(gw.web.requests) == 1 and len(gw.api.requests) == 2

    run_on(loop_kind, main())


def test_an_unknown_host_is_404_after_the_default_certificate(
        loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with ingress(tmp_path) as gw:
            client = ssl.create_default_context(cafile=str(tmp_path / "test-ca.pem"))
            client.check_hostname = False  # the client names a host nobody serves
            gw.ca = client
            answer, cert = await gw.request("nope.example.com", "/")
            assert answer["body"] == b"" and header(answer, b"server") == b"composemesh"
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", gw.https, ssl=client, server_hostname="nope.example.com")
            writer.write(b"GET / HTTP/1.1\r\nhost: nope.example.com\r\n\r\n")
            _, raw = await read_responses(reader)
            writer.close()
            assert raw.startswith(b"HTTP/1.1 404 ")
            assert not gw.web.requests and not gw.api.requests

    run_on(loop_kind, main())


def test_plain_http_is_redirected_308_to_the_https_url(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with ingress(tmp_path) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.http)
            writer.write(b"POST /cart?id=7 HTTP/1.1\r\nhost: www.example.com:8080\r\n"
                         b"content-length: 0\r\n\r\n")
            messages, raw = await read_responses(reader)
            writer.close()
            assert raw.startswith(b"HTTP/1.1 308 Permanent Redirect\r\n")
            assert header(messages[0], b"location") == b"https://www.example.com:8443/cart?id=7"
            assert not gw.web.requests

    run_on(loop_kind, main())


def test_plain_http_is_routed_when_not_redirected(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with ingress(tmp_path, redirect=False) as gw:
            answer, _ = await gw.request(WWW, "/", tls=False)
            assert answer["body"] == b"web"
            names = {n.lower(): v for n, v in gw.web.requests[-1].headers}
            assert names[b"x-forwarded-proto"] == b"http"

    run_on(loop_kind, main())


def test_hostile_requests_at_the_ingress_get_envoys_statuses(loop_kind: str,
                                                             tmp_path: Path) -> None:
    """The ingress is the outbound HTTP path with the same limits: an oversized head is 431,
    a broken request 400, a CONNECT 405; nothing reaches the mesh."""
    async def main() -> None:
        async with ingress(tmp_path) as gw:
            for request, status in (
                    (b"GET / HTTP/1.1\r\nhost: www.example.com\r\nx-big: "
                     + b"a" * 200_000 + b"\r\n\r\n", b"431"),
                    (b"GET / HTTP/1.1\r\nhost: www.example.com\r\ncontent-length: x\r\n\r\n",
                     b"400"),
                    (b"CONNECT api:443 HTTP/1.1\r\nhost: api:443\r\n\r\n", b"405")):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", gw.https, ssl=gw.ca, server_hostname=WWW)
                writer.write(request)
                try:
                    head = await asyncio.wait_for(reader.read(100), 10)
                finally:
                    writer.close()
                assert head.startswith(b"HTTP/1.1 " + status), (status, head)
            assert not gw.web.requests and not gw.api.requests

    run_on(loop_kind, main())
