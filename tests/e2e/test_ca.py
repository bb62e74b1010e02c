"""The CA on the real engine: attested workload certificates, renewal, refusals, no key leaked."""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from composemesh.ca import cert_from_pem, fingerprint, spiffe_of, verify_chain
from composemesh.model import wellknown as wk
from tests.e2e.conftest import DEMO, Mesh, composemesh, docker, logs_of, meshed

pytestmark = pytest.mark.e2e

SERVICES = ("web", "reviews")
TTL_S = 120  # short, so that a renewal happens while the tests run (at about half-life)
COMPOSE = f"""\
x-composemesh:
  mtls:
    workload_cert_ttl: {TTL_S}s

{DEMO}
services:
  web:
    <<: *demo
    command: ["ratings"]
  reviews:
    <<: *demo
    command: ["reviews"]
"""
STATE = "/var/lib/composemesh/ca"
# Run with python3 in a proxy's container (the mesh image, the socket mounted): a fresh key
# and a CSR (with the URI SAN in argv[1], if any) POSTed to the pilot's socket; prints status,
# answer and milliseconds.
POST_CSR = rf"""
import json, sys, time
from composemesh.ca import csr_to_pem, generate_key, make_csr
from composemesh.engine.pilot_api import over_socket
started = time.perf_counter()
csr = csr_to_pem(make_csr(generate_key(), sys.argv[1] or None))
answer = over_socket({wk.PILOT_SOCKET!r}, "POST", "/v1/certificate", csr)
ms = (time.perf_counter() - started) * 1000
print(json.dumps({{"status": answer.status, "body": json.loads(answer.body), "ms": ms}}))
"""



@pytest.fixture(scope="module")
def mesh(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with meshed("ca", tmp_path_factory.mktemp("ca"), COMPOSE) as m:
        yield m


def spiffe(mesh: Mesh, service: str) -> str:
    return f"spiffe://cluster.local/ns/{mesh.project}/sa/{service}"


def python_in(container: str, code: str, *args: str, timeout: float = 60) -> str:
    proc = subprocess.run(["docker", "exec", container, "python3", "-c", code, *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"python in {container}: {proc.stdout}{proc.stderr}"
    return proc.stdout








def post_csr(container: str, san: str = "") -> dict[str, Any]:
    return dict(json.loads(python_in(container, POST_CSR, san)))








# --------------------------------------------------------------------------- issuance


def test_every_proxy_holds_a_certificate_for_its_own_service(mesh: Mesh) -> None:
    ca = mesh.pilot_get("/v1/ca")
    root = cert_from_pem(ca["trust_bundle_pem"])
    assert ca["fingerprint"] == fingerprint(root)
    for service in SERVICES:
        held = mesh.certs(service)
        cert = cert_from_pem(held["cert_pem"])
        assert spiffe_of(cert) == spiffe(mesh, service) == held["identity"]
        assert held["serial"] == f"{cert.serial_number:x}"
        assert held["issuer_fingerprint"] == ca["fingerprint"]
        verify_chain(cert, [], [root])
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert life.total_seconds() == TTL_S + 60  # the TTL, back-dated a minute for skew
        assert mesh.admin(service, "/ready").strip() == "LIVE"


def test_status_shows_each_proxys_identity_and_expiry(mesh: Mesh) -> None:
    proc = composemesh("status", "-p", mesh.project)
    assert proc.returncode == 0, proc.stderr
    for service in SERVICES:
        line = next(ln for ln in proc.stdout.splitlines() if f"/sa/{service} " in ln)
        assert spiffe(mesh, service) in line
        assert " in " in line.split(spiffe(mesh, service))[1]  # "in 1m 12s"
    data = json.loads(composemesh("status", "-p", mesh.project, "--json").stdout)
    for row in data["proxies"]:
        assert row["identity"] == spiffe(mesh, row["service"])
        assert row["cert_not_after"] and row["cert_serial"]


def test_certs_shows_the_root_and_every_identity(mesh: Mesh) -> None:
    ca = mesh.pilot_get("/v1/ca")
    proc = composemesh("certs", "-p", mesh.project)
    assert proc.returncode == 0, proc.stderr
    assert ca["fingerprint"] in proc.stdout
    assert "1 root, " in proc.stdout and ca["subject"] in proc.stdout
    for service in SERVICES:
        assert spiffe(mesh, service) in proc.stdout
    data = json.loads(composemesh("certs", "-p", mesh.project, "--json").stdout)
    assert data["ca"]["fingerprint"] == ca["fingerprint"]


def test_the_root_key_is_private_on_the_pilots_volume(mesh: Mesh) -> None:
    pilot = mesh.container(wk.PILOT_SERVICE)
    assert docker("exec", pilot, "stat", "-c", "%a", f"{STATE}/root-key.pem") == "600"
    assert docker("exec", pilot, "stat", "-c", "%a", STATE) == "700"
    stored = cert_from_pem(docker("exec", pilot, "cat", f"{STATE}/root.pem") + "\n")
    assert fingerprint(stored) == mesh.pilot_get("/v1/ca")["fingerprint"]


# --------------------------------------------------------------------------- refusals


def test_a_csr_for_another_services_identity_is_refused(mesh: Mesh) -> None:
    proxy = mesh.container("web-proxy")
    answer = post_csr(proxy, spiffe(mesh, "reviews"))
    assert answer["status"] == 403, answer
    assert f"attested as {spiffe(mesh, 'web')}" in answer["body"]["error"]
    own = post_csr(proxy, spiffe(mesh, "web"))  # the same request for its own identity: fine
    assert own["status"] == 200, own
    assert spiffe_of(cert_from_pem(own["body"]["cert_pem"])) == spiffe(mesh, "web")
    logs = logs_of(mesh.container(wk.PILOT_SERVICE))
    refused = [ln for ln in logs.splitlines() if "certificate refused to" in ln]
    node = mesh.container("web-netns")
    assert any(f"proxy of {node}" in ln and spiffe(mesh, "reviews") in ln for ln in refused)


def test_a_container_outside_the_project_has_no_way_to_ask(mesh: Mesh) -> None:
    """Not on any port of the pilot's (its API listens on none; 15014 is read-only
    monitoring; tests/e2e/test_attacks.py fakes addresses too), and it mounts no socket."""
    dial = ("import socket\n"
            "for port in (15010, 15012):\n"
            "    try:\n"
            "        socket.create_connection(('composemesh-pilot', port), timeout=5)\n"
            "        print(port, 'connected')\n"
            "    except OSError as exc:\n"
            "        print(port, type(exc).__name__)\n")
    proc = mesh.outsider(wk.MESH_IMAGE, "python3", "-c", dial)
    refused = ["15010", "ConnectionRefusedError", "15012", "ConnectionRefusedError"]
    assert proc.stdout.split() == refused, proc.stdout + proc.stderr


def test_time_to_issue_a_certificate_inside_the_mesh(mesh: Mesh) -> None:
    proxy = mesh.container("reviews-proxy")
    times = []
    for _ in range(10):
        answer = post_csr(proxy)
        assert answer["status"] == 200, answer
        times.append(answer["ms"])
    held = mesh.certs("reviews")
    print(f"\nCSR -> certificate inside the mesh (key, CSR, POST, answer): median "
          f"{statistics.median(times):.1f} ms, max {max(times):.1f} ms over {len(times)}; "
          f"the proxy's own last issuance: {held['last_issuance_ms']} ms")
    assert statistics.median(times) < 1000


# --------------------------------------------------------------------------- lifecycle


def test_no_private_key_in_snapshots_logs_or_cli_output(mesh: Mesh) -> None:
    for service in SERVICES:
        dump = mesh.admin(service, "/config_dump")
        assert "PRIVATE KEY" not in dump
        assert json.loads(dump)["identity"]["identity"] == spiffe(mesh, service)
        assert "BEGIN CERTIFICATE" in json.loads(dump)["snapshot"]["settings"]["trust_bundle"]
        assert "PRIVATE KEY" not in mesh.admin(service, "/certs")
    for name in mesh.containers():
        logs = logs_of(name)
        if "proxy" in name or wk.PILOT_SERVICE in name:  # these do log: the right streams
            assert "certificate" in logs, name
        assert "PRIVATE KEY" not in logs, name
    for args in (("status",), ("status", "--json"), ("certs",), ("certs", "--json")):
        proc = composemesh(*args, "-p", mesh.project)
        assert proc.returncode == 0 and "PRIVATE KEY" not in proc.stdout + proc.stderr
    for path in ("/v1/ca", "/v1/status"):
        assert "PRIVATE KEY" not in json.dumps(mesh.pilot_get(path))


def test_certificates_renew_before_they_expire_and_the_proxy_stays_ready(mesh: Mesh) -> None:
    first = mesh.certs("web")
    deadline = time.monotonic() + TTL_S
    while time.monotonic() < deadline:
        now = mesh.certs("web")
        if now["serial"] != first["serial"]:
            break
        time.sleep(2)
    else:
        raise AssertionError(f"no renewal within {TTL_S}s: {first}")
    assert now["not_after"] > first["not_after"]
    assert now["identity"] == first["identity"]
    assert mesh.admin("web", "/ready").strip() == "LIVE"
    rows = json.loads(composemesh("status", "-p", mesh.project, "--json").stdout)["proxies"]
    web = next(r for r in rows if r["service"] == "web")
    assert web["cert_serial"] != first["serial"]


def test_a_restarted_pilot_keeps_its_root(mesh: Mesh) -> None:
    before = mesh.pilot_get("/v1/ca")
    pilot = mesh.container(wk.PILOT_SERVICE)
    docker("restart", "-t", "3", pilot)
    deadline = time.monotonic() + 60
    while True:
        try:
            after = mesh.pilot_get("/v1/ca")
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert after["fingerprint"] == before["fingerprint"]
    assert after["source"] == "stored"
    status = mesh.pilot_get("/v1/status")  # what it issued before is remembered
    assert all(row["identity"] for row in status["proxies"])
    assert docker("exec", pilot, "stat", "-c", "%a", f"{STATE}/root-key.pem") == "600"

