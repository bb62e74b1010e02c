"""The ingress gateway on the real engine (issue 11): traffic entering the mesh from the host.

From the host, as a user's browser or curl would: HTTPS to the published port with the
host's name in SNI, the chain verified with the user's own CA; a host routed by a path
prefix to `reviews` (80/20 between v1 and v2 by their labels, within 5 points over 1,000
requests) and by `/` to `ratings`; a second host with a certificate of its own, its route
given by a label of `ratings`; an unknown host 404; plain HTTP 308 to the https URL. A policy
lets only `ingress-gateway` call `ratings`: the ingress gets in, a meshed peer (reviews v2,
and a request from reviews v1's namespace) is refused.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import DEMO, Mesh, composemesh, meshed
from tests.gateway_certs import Authority
from tests.support import free_port

pytestmark = pytest.mark.e2e

WWW, SHOP = "www.example.com", "shop.example.com"

COMPOSE = DEMO + """
x-composemesh:
  mtls: STRICT
  gateways:
    ingress:
      bind: 127.0.0.1
      http_port: {http_port}
      https_port: {https_port}
      redirect_to_https: true
      hosts:
        www.example.com:
          tls: {{cert: certs/www.crt, key: certs/www.key}}
          routes:
            - {{path: /reviews/, service: reviews, port: 9080}}
            - {{path: /, service: ratings, port: 9080}}
        shop.example.com:
          tls: {{cert: certs/shop.crt, key: certs/shop.key}}
  policies:
    ratings:
      - {{name: only-the-ingress, from: [ingress-gateway]}}
services:
  reviews-v1:
    <<: *demo
    command: ["reviews"]
    environment: {{VERSION: v1}}
    labels: {{composemesh.service: reviews, composemesh.version: v1, composemesh.weight: "80"}}
  reviews-v2:
    <<: *demo
    command: ["reviews"]
    environment: {{VERSION: v2}}
    labels: {{composemesh.service: reviews, composemesh.version: v2, composemesh.weight: "20"}}
  ratings:
    <<: *demo
    command: ["ratings"]
    labels:
      composemesh.ingress.host: shop.example.com
      composemesh.ingress.port: "9080"
"""


class Gateway:
    """The host's way in: HTTPS connections to the published port, SNI and Host a name."""

    def __init__(self, https_port: int, http_port: int, ca: Path) -> None:
        self.https_port = https_port
        self.http_port = http_port
        self.context = ssl.create_default_context(cafile=str(ca))

    def connection(self, host: str) -> http.client.HTTPSConnection:
        context = self.context

        class Named(http.client.HTTPSConnection):
            def connect(self) -> None:  # the address is 127.0.0.1, the name ``host``
                raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
                self.sock = context.wrap_socket(raw, server_hostname=host)

        return Named("127.0.0.1", self.https_port, timeout=30)

    def get(self, host: str, path: str) -> tuple[int, bytes, dict[str, str]]:
        conn = self.connection(host)
        try:
            conn.request("GET", path, headers={"Host": host})
            response = conn.getresponse()
            return response.status, response.read(), dict(response.getheaders())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def ingress(images: None, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Mesh, Gateway]]:
    folder = tmp_path_factory.mktemp("ingress")
    (folder / "certs").mkdir()
    authority = Authority(folder / "certs", name="Users CA")
    for host, stem in ((WWW, "www"), (SHOP, "shop")):
        authority.server(host, stem=stem)
    https_port, http_port = free_port(), free_port()
    compose = COMPOSE.format(https_port=https_port, http_port=http_port)
    with meshed("ingress", folder, compose) as mesh:
        yield mesh, Gateway(https_port, http_port, authority.path)


def test_up_prints_the_ingress_urls_and_status_shows_the_gateway(
        ingress: tuple[Mesh, Gateway]) -> None:
    mesh, gw = ingress
    assert f"https://{WWW}:{gw.https_port}/" in mesh.up_output
    assert f"curl --resolve {SHOP}:{gw.https_port}:127.0.0.1" in mesh.up_output
    status = composemesh("status", "-p", mesh.project)
    assert status.returncode == 0, status.stderr
    section = status.stdout.split("gateways of", 1)[1].split("proxies of", 1)[0]
    row = next(line for line in section.splitlines() if "ingress-gateway" in line)
    assert "ready" in row and "in sync" in row, status.stdout
    assert " 2 " in row and " 3 " in row, status.stdout  # hosts, routes (one by a label)


def test_https_with_sni_reaches_the_routed_service_verified_with_the_users_ca(
        ingress: tuple[Mesh, Gateway]) -> None:
    _, gw = ingress
    status, body, _ = gw.get(WWW, "/reviews/0")
    assert status == 200, body
    assert json.loads(body)["service"] == "reviews"
    status, body, _ = gw.get(WWW, "/ratings/0")  # the longest prefix: "/" here
    assert status == 200 and json.loads(body)["service"] == "ratings", body
    conn = gw.connection(SHOP)
    conn.request("GET", "/ratings/0", headers={"Host": SHOP})
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["service"] == "ratings"
    cert = conn.sock.getpeercert()  # type: ignore[union-attr]
    assert ("DNS", SHOP) in cert["subjectAltName"]  # its own certificate, by SNI
    conn.close()


def test_a_wrong_host_gets_404(ingress: tuple[Mesh, Gateway]) -> None:
    _, gw = ingress
    status, _, headers = gw.get(WWW, "/")
    assert status == 200  # the host is served ...
    conn = gw.connection(WWW)  # ... and a name it does not serve, on the same TLS, is not
    conn.request("GET", "/", headers={"Host": "other.example.com"})
    response = conn.getresponse()
    assert response.status == 404
    conn.close()


def test_the_weighted_route_through_the_ingress_holds_80_20_over_1000(
        ingress: tuple[Mesh, Gateway]) -> None:
    _, gw = ingress
    conn = gw.connection(WWW)
    versions: Counter[str] = Counter()
    try:
        for _ in range(1000):
            conn.request("GET", "/reviews/0", headers={"Host": WWW})
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, body
            versions[json.loads(body)["version"]] += 1
    finally:
        conn.close()
    assert sum(versions.values()) == 1000
    assert abs(versions["v1"] / 10 - 80) <= 5, versions


def test_plain_http_is_redirected_308_to_https(ingress: tuple[Mesh, Gateway]) -> None:
    _, gw = ingress
    conn = http.client.HTTPConnection("127.0.0.1", gw.http_port, timeout=30)
    conn.request("GET", "/reviews/0?x=1", headers={"Host": f"{WWW}:{gw.http_port}"})
    response = conn.getresponse()
    assert response.status == 308
    assert response.getheader("location") == f"https://{WWW}:{gw.https_port}/reviews/0?x=1"
    conn.close()


def test_a_service_only_the_ingress_may_call_refuses_a_meshed_peer(
        ingress: tuple[Mesh, Gateway]) -> None:
    mesh, gw = ingress
    status, body, _ = gw.get(WWW, "/ratings/0")
    assert status == 200, body  # the ingress gets in
    [direct] = mesh.get_json("reviews-v1", "http://ratings:9080/ratings/0")
    assert direct["status"] == 403, direct
    v2 = [json.loads(gw.get(WWW, "/reviews/0")[1]) for _ in range(40)]
    called = [r for r in v2 if r["version"] == "v2"]
    assert called, "no request reached v2 in 40"
    assert all(r["ratings"] == {"error": 403} for r in called), called
