"""Mutual TLS and authorization on the real engine: STRICT and PERMISSIVE, a foreign root,
policies, certificate rotation under a steady stream, a root rotation under load, and a
root the user brings.

One mesh for the module. A steady request stream (frontend -> reviews, over both sidecars)
starts as soon as the mesh is up and runs for STREAM_S while the other tests run beside it;
``test_a_steady_stream_sees_rotations_and_no_failure`` collects it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from composemesh.ca import cert_from_pem, cert_to_pem, fingerprint, key_to_pem, make_root
from composemesh.model import wellknown as wk
from tests.e2e.conftest import DEMO, Mesh, composemesh, logs_of, meshed

pytestmark = pytest.mark.e2e

TTL_S = 120
STREAM_S = 300  # the five minutes: at least two renewals at a 2-minute lifetime

FRONTEND_AND_REVIEWS = """\
  frontend:
    <<: *demo
    command: ["ratings"]
  reviews:
    <<: *demo
    command: ["reviews"]
    environment: {VERSION: v1}"""

COMPOSE = f"""\
x-composemesh:
  mtls:
    mode: STRICT
    services: {{legacy: PERMISSIVE}}
    workload_cert_ttl: {TTL_S}s
  policies:
    reviews:
      - name: only-frontend
        from: [frontend]

{DEMO}
services:
{FRONTEND_AND_REVIEWS}
  ratings:
    <<: *demo
    command: ["ratings"]
  legacy:
    <<: *demo
    command: ["ratings"]
"""

# Run with python3 in an app container: requests to argv[1] for argv[2] seconds, each round
# one on a kept-alive connection and one on a new connection; prints a JSON summary.
STREAM = r"""
import http.client, json, sys, time, urllib.parse
url, seconds = urllib.parse.urlsplit(sys.argv[1]), float(sys.argv[2])
statuses, errors, kept = {}, [], None
def one(conn):
    conn.request("GET", url.path or "/")
    response = conn.getresponse()
    response.read()
    return response.status
end = time.monotonic() + seconds
while time.monotonic() < end:
    for fresh in (False, True):
        try:
            if fresh:
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
                status = one(conn)
                conn.close()
            else:
                if kept is None:
                    kept = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
                status = one(kept)
        except Exception as exc:
            status = 0
            errors.append(f"{time.time():.3f} fresh={fresh} {type(exc).__name__}: {exc}")
            kept = None
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    time.sleep(0.05)
print(json.dumps({"statuses": statuses, "errors": errors[:20]}))
"""

# Run with python3 in a mesh-image container on the project's network: a TLS client with a
# certificate from a root of its own, naming frontend; says what the server did.
FOREIGN_CLIENT = r"""
import socket, ssl, sys
from composemesh.ca import cert_to_pem, key_to_pem, make_csr, make_root, sign_workload
from composemesh.ca.pki import generate_key
from composemesh.ca.tls import client_context
root, root_key = make_root("impostor root", "cluster.local")
key = generate_key()
leaf = sign_workload(make_csr(key), root, root_key, sys.argv[3])
ctx = client_context(cert_to_pem(leaf), key_to_pem(key), cert_to_pem(root))
ctx.verify_mode = ssl.CERT_NONE  # it cannot check the mesh's server; the server checks it
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n")
            data = tls.recv(100)
    print("answered: " + repr(data[:40]) if data else "closed")
except (ssl.SSLError, OSError) as exc:
    print(f"refused: {type(exc).__name__}: {exc}")
"""

@dataclass
class Stream:
    process: subprocess.Popen[str]
    certs_before: dict[str, dict[str, Any]]

    def result(self) -> dict[str, Any]:
        out, err = self.process.communicate(timeout=STREAM_S + 120)
        assert self.process.returncode == 0, f"stream failed: {out}{err}"
        return dict(json.loads(out.strip().splitlines()[-1]))


@contextlib.contextmanager
def streaming(mesh: Mesh, seconds: float) -> Iterator[Stream]:
    """STREAM from frontend to reviews for ``seconds``; stopped if the test ends before it."""
    before = {s: mesh.certs(s) for s in ("frontend", "reviews")}
    process = subprocess.Popen(
        ["docker", "exec", mesh.container("frontend"), "python3", "-c", STREAM,
         "http://reviews:9080/reviews/0", str(seconds)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield Stream(process, before)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def mesh(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with meshed("mtls", tmp_path_factory.mktemp("mtls"), COMPOSE) as m:
        yield m


@pytest.fixture(scope="module")
def stream(mesh: Mesh) -> Iterator[Stream]:
    with streaming(mesh, STREAM_S) as s:
        yield s


def outsider(mesh: Mesh, image: str, *cmd: str) -> str:
    """What ``cmd`` printed in a container on the project's network, not in the mesh (the
    demo image's entrypoint is demo.py: its ``cmd`` starts with a demo command)."""
    proc = mesh.outsider(image, *cmd)
    return proc.stdout + proc.stderr


def inbound_errors(mesh: Mesh, service: str) -> dict[str, int]:
    return dict(mesh.proxy_stats(service)["inbound"]["errors_by_kind"])


# --------------------------------------------------------------------------- peers


def test_calls_between_services_are_mutual_tls(mesh: Mesh, stream: Stream) -> None:
    answers = mesh.get_json("frontend", "http://reviews:9080/reviews/0", "--count", "5")
    assert [a["status"] for a in answers] == [200] * 5
    metrics = mesh.prometheus("reviews")
    assert 'reporter="destination"' in metrics
    principal = f'source_principal="spiffe://cluster.local/ns/{mesh.project}/sa/frontend"'
    assert principal in metrics
    assert 'connection_security_policy="mutual_tls"' in metrics


def test_strict_refuses_plaintext_from_a_container_outside_the_mesh(mesh: Mesh,
                                                                    stream: Stream) -> None:
    before = inbound_errors(mesh, "reviews")["plaintext_refused"]
    out = outsider(mesh, wk.DEMO_IMAGE, "get",
                   "http://reviews:9080/reviews/0")
    assert json.loads(out.strip().splitlines()[-1])["status"] == 0, out  # no answer at all
    assert inbound_errors(mesh, "reviews")["plaintext_refused"] > before


def test_permissive_lets_the_same_plaintext_in(mesh: Mesh, stream: Stream) -> None:
    out = outsider(mesh, wk.DEMO_IMAGE, "get",
                   "http://legacy:9080/ratings/0")
    assert json.loads(out.strip().splitlines()[-1])["status"] == 200, out
    metrics = mesh.prometheus("legacy")
    assert 'connection_security_policy="none"' in metrics


def test_a_certificate_from_another_root_is_refused(mesh: Mesh, stream: Stream) -> None:
    before = inbound_errors(mesh, "reviews")["tls_handshake"]
    frontend = f"spiffe://cluster.local/ns/{mesh.project}/sa/frontend"
    out = outsider(mesh, wk.MESH_IMAGE, "python3", "-c", FOREIGN_CLIENT, "reviews", "9080",
                   frontend)
    assert out.startswith(("refused", "closed")), out
    assert inbound_errors(mesh, "reviews")["tls_handshake"] > before


# --------------------------------------------------------------------------- policies


def test_only_frontend_may_call_reviews(mesh: Mesh, stream: Stream) -> None:
    allowed = mesh.get_json("frontend", "http://reviews:9080/reviews/0")
    assert allowed[0]["status"] == 200 and allowed[0]["service"] == "reviews"
    denied = mesh.get_json("ratings", "http://reviews:9080/reviews/0")
    assert denied[0]["status"] == 403, denied
    assert "RBAC: access denied" in json.dumps(denied[0])
    # the policy is the destination's: ratings itself may still be called by anyone
    assert mesh.get_json("reviews", "http://ratings:9080/ratings/0")[0]["status"] == 200


# --------------------------------------------------------------------------- rotation


def test_a_steady_stream_sees_rotations_and_no_failure(mesh: Mesh, stream: Stream) -> None:
    result = stream.result()
    assert result["errors"] == [] and set(result["statuses"]) == {"200"}, result
    assert sum(result["statuses"].values()) > STREAM_S * 5  # it was steady
    for service in ("frontend", "reviews"):
        after = mesh.certs(service)
        renewed = after["certificates_issued"] - stream.certs_before[service][
            "certificates_issued"]
        assert renewed >= 2, f"{service}: {renewed} renewals in {STREAM_S}s"
        assert after["serial"] != stream.certs_before[service]["serial"]
    assert all(v == 0 for k, v in mesh.proxy_stats("frontend")["outbound"]["errors_by_kind"]
               .items() if k.startswith("tls")), mesh.proxy_stats("frontend")


def test_a_root_rotation_under_load_fails_no_request(mesh: Mesh) -> None:
    old = mesh.pilot_get("/v1/ca")
    with streaming(mesh, 45) as load:
        time.sleep(3)
        proc = composemesh("certs", "rotate-root", "-f", str(mesh.files[0]), "-p", mesh.project)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = load.result()
    assert result["errors"] == [] and set(result["statuses"]) == {"200"}, result
    new = mesh.pilot_get("/v1/ca")
    assert new["fingerprint"] != old["fingerprint"]
    assert [t["fingerprint"] for t in new["trusted"]] == [new["fingerprint"]]  # old one gone
    for service in ("frontend", "reviews", "ratings", "legacy"):
        held = mesh.certs(service)
        assert held["issuer_fingerprint"] == new["fingerprint"], service
        assert [r["fingerprint"] for r in held["trust_bundle"]] == [new["fingerprint"]]
    # and a new connection after it all still works
    assert mesh.get_json("frontend", "http://reviews:9080/reviews/0")[0]["status"] == 200


def test_no_private_key_in_logs_after_all_this(mesh: Mesh) -> None:
    for name in mesh.containers():
        assert "PRIVATE KEY" not in logs_of(name), name
    assert "PRIVATE KEY" not in mesh.admin("reviews", "/config_dump")


# --------------------------------------------------------------------------- your own root


BYO = f"""\
x-composemesh:
  mtls:
    root:
      cert: ca/root.pem
      key: ca/root-key.pem

{DEMO}
services:
{FRONTEND_AND_REVIEWS}
"""


def test_a_root_the_user_brings_signs_the_mesh(images: None, tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir()
    root, key = make_root("ACME mesh root", "cluster.local")
    (tmp_path / "ca" / "root.pem").write_bytes(cert_to_pem(root))
    key_file = tmp_path / "ca" / "root-key.pem"
    key_file.write_bytes(key_to_pem(key))
    key_file.chmod(0o600)
    with meshed("byo", tmp_path, BYO) as m:
        ca = m.pilot_get("/v1/ca")
        assert ca["source"] == "user" and ca["fingerprint"] == fingerprint(root)
        for service in ("frontend", "reviews"):
            held = m.certs(service)
            assert held["issuer_fingerprint"] == fingerprint(root)
            leaf = cert_from_pem(held["cert_pem"])
            assert leaf.issuer == root.subject
        assert m.get_json("frontend", "http://reviews:9080/reviews/0")[0]["status"] == 200
        mounted = m.exec(wk.PILOT_SERVICE, "python3", "-c",
                         "import os;print(os.environ['COMPOSEMESH_CA_KEY_FILE'])")
        assert "PRIVATE KEY" not in logs_of(m.container(wk.PILOT_SERVICE)) and mounted.strip()
