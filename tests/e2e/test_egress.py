"""The egress gateway on the real engine (issue 11): traffic leaving the mesh.

"The outside" is three servers on a network (`outside`) that only the egress gateway joins,
known there by the partner names (network aliases): an HTTPS API, a legacy server that
speaks HTTPS only (the file says the apps call it over plain HTTP and the gateway adds TLS,
verified with the partner's CA), and one that is not listed. Under REGISTRY_ONLY a meshed
app reaches the allowed HTTPS host by name (its TLS ends at the real server, whose
certificate it verifies), reaches the HTTP host through the gateway's TLS, and cannot reach
the unlisted one (502 from its own sidecar, which names BlackHoleCluster); the gateway logs
one JSON line per call with the caller's SPIFFE ID.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from composemesh.model.wellknown import DEMO_IMAGE
from tests.e2e.conftest import DEMO, Mesh, docker, meshed
from tests.gateway_certs import Authority

pytestmark = pytest.mark.e2e

API, LEGACY = "api.partner.example", "legacy.partner.example"

# python3 -c HTTPS: answers every GET with its name, over TLS with /certs/<name>.crt on 443
HTTPS = r"""
import http.server, os, ssl
NAME = os.environ["NAME"]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{NAME} says hi over TLS".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), H)
ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
ctx.load_cert_chain(f"/certs/{NAME}.crt", f"/certs/{NAME}.key")
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"""
PLAIN = r"""
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "6"); self.end_headers()
        self.wfile.write(b"reached")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 80), H).serve_forever()
"""

COMPOSE = DEMO + f"""
x-composemesh:
  mtls: STRICT
  egress:
    policy: REGISTRY_ONLY
    networks: [outside]
    hosts:
      - {{host: {API}, port: 443, protocol: tls}}
      - {{host: {LEGACY}, port: 80, protocol: http,
         tls_origination: {{port: 443, ca: certs/partner-ca.pem}}}}
x-outside: &outside
  image: {DEMO_IMAGE}
  restart: unless-stopped
  labels: {{composemesh.enable: "false"}}
  volumes: ["./certs:/certs:ro"]
services:
  app:
    <<: *demo
    command: ["ratings"]
    volumes: ["./certs:/certs:ro"]
  api:
    <<: *outside
    entrypoint: ["python3", "-c", {json.dumps(HTTPS)}]
    environment: {{NAME: {API}}}
    networks: {{outside: {{aliases: [{API}]}}}}
  legacy:
    <<: *outside
    entrypoint: ["python3", "-c", {json.dumps(HTTPS)}]
    environment: {{NAME: {LEGACY}}}
    networks: {{outside: {{aliases: [{LEGACY}]}}}}
  other:
    <<: *outside
    entrypoint: ["python3", "-c", {json.dumps(PLAIN)}]
    networks: {{outside: {{aliases: [other.partner.example]}}}}
networks:
  outside: {{}}
"""

# python3 -c FETCH URL [CAFILE]: one GET as an app makes it; prints status and body as JSON
FETCH = r"""
import json, ssl, sys, urllib.error, urllib.request
url, ca = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
ctx = ssl.create_default_context(cafile=ca) if ca else None
try:
    with urllib.request.urlopen(url, context=ctx, timeout=20) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
except Exception as e:
    print(json.dumps({"status": 0, "body": f"{type(e).__name__}: {e}"}))
"""


@pytest.fixture(scope="module")
def mesh(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    folder = tmp_path_factory.mktemp("egress")
    certs = folder / "certs"
    certs.mkdir()
    authority = Authority(certs, name="Partner CA")
    for host in (API, LEGACY):
        authority.server(host)
    for path in certs.iterdir():
        path.chmod(0o644)  # the servers run as another user than the test
    with meshed("egress", folder, COMPOSE) as m:
        yield m


def fetch(mesh: Mesh, url: str, *ca: str) -> dict[str, object]:
    out = mesh.exec("app", "python3", "-c", FETCH, url, *ca, timeout=120)
    return dict(json.loads(out.strip().splitlines()[-1]))


def gateway_log(mesh: Mesh, host: str) -> list[dict[str, object]]:
    """The egress gateway's JSON lines for ``host`` (waiting for the connection's end)."""
    lines: list[dict[str, object]] = []
    for _ in range(100):
        text = docker("logs", mesh.container("egress-gateway-proxy"))
        lines = [json.loads(line) for line in text.splitlines()
                 if line.startswith("{") and f'"host": "{host}"' in line]
        if lines:
            return lines
        time.sleep(0.1)
    return lines


def test_the_app_reaches_the_allowed_https_host_by_name_its_tls_ending_at_the_server(
        mesh: Mesh) -> None:
    got = fetch(mesh, f"https://{API}/", "/certs/partner-ca.pem")
    assert got == {"status": 200, "body": f"{API} says hi over TLS"}, got
    [line, *_] = gateway_log(mesh, API)
    assert str(line["source"]).endswith("/ns/" + mesh.project + "/sa/app"), line
    assert (line["port"], line["protocol"], line["outcome"]) == (443, "tls", "ok"), line


def test_the_app_reaches_the_http_host_through_the_gateways_tls(mesh: Mesh) -> None:
    got = fetch(mesh, f"http://{LEGACY}/")
    assert got == {"status": 200, "body": f"{LEGACY} says hi over TLS"}, got
    [line, *_] = gateway_log(mesh, LEGACY)
    assert str(line["source"]).endswith("/sa/app") and line["status"] == 200, line


def test_an_unlisted_host_is_refused_by_the_callers_sidecar(mesh: Mesh) -> None:
    other = docker("inspect", "-f",
                   "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                   mesh.container("other")).split()[0]
    got = fetch(mesh, f"http://{other}/")
    assert got["status"] == 502, got
    assert "BlackHoleCluster" in str(got["body"]), got
    assert not gateway_log(mesh, other)
