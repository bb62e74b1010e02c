"""Attacks on the mesh's control plane and inbound ports, as a neighbour on the network would
make them: with Docker's default capabilities, raw sockets where it takes them.

Each was a hole (issue 8): an outsider that fakes a workload's address (ARP answers and a
TCP handshake made by hand, tests/e2e/spoof.py) got that workload's certificate from the
pilot's plaintext port, and with the bridge gateway's address it changed routes and rotated
the root; an app listening on a port left out of capture was reached in plaintext; a holder of
a workload's identity could ACK for its proxy. Each test performs the attack, shows the
attacker's tool working against a target that trusts addresses (so a refusal means the mesh
refused), and shows the mesh unchanged afterwards.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from composemesh.ca import csr_to_pem, generate_key, make_csr
from composemesh.model import wellknown as wk
from tests.e2e.conftest import DEMO, Mesh, composemesh, docker, logs_of, meshed, spoof

pytestmark = pytest.mark.e2e

MARKER = "APP-LISTENER-REACHED"
# Ports an app might listen on that a proxy uses or once left uncaptured; the app binds each
# it can (the proxy holds 15001, 15006, 15021 and 15090 on every address, 15000 on loopback).
TRAP_PORTS = (15000, 15001, 15006, 15010, 15012, 15020, 15021, 15053, 15090)
# The app that listens on them: one thread per port that could be bound, answering MARKER to
# each request.
TRAP_APP = f"""\
import socket, sys, threading, time
bound = []
def serve(s):
    while True:
        c, _ = s.accept()
        try:
            c.settimeout(5)
            head = b""
            while b"\\r\\n\\r\\n" not in head and len(head) < 65536:
                chunk = c.recv(4096)
                if not chunk:
                    break
                head += chunk
            c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: {len(MARKER)}\\r\\n\\r\\n{MARKER}")
        except OSError:
            pass
        finally:
            c.close()
for port in {TRAP_PORTS!r}:
    s = socket.socket()
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        try:  # the proxy holds 127.0.0.1:15000: the namespace's own address is still free
            s.bind((socket.gethostbyname(socket.gethostname()), port))
        except OSError:
            continue
    s.listen(16)
    bound.append(port)
    threading.Thread(target=serve, args=(s,), daemon=True).start()
print("bound", " ".join(map(str, bound)), flush=True)
while True:
    time.sleep(3600)
"""
# The target of the control attack: trusts addresses, answers with the client it saw.
WHO_AM_I = """\
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"client": self.client_address[0]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        self.do_GET()
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""
COMPOSE = f"""\
x-composemesh:
  mtls:
    mode: STRICT

{DEMO}
services:
  web:
    <<: *demo
    command: ["ratings"]
  reviews:
    <<: *demo
    command: ["reviews"]
  trap:
    image: {wk.DEMO_IMAGE}
    entrypoint: ["python3", "-c", {json.dumps(TRAP_APP)}]
  whoami:
    image: {wk.DEMO_IMAGE}
    entrypoint: ["python3", "-c", {json.dumps(WHO_AM_I)}]
    labels:
      composemesh.enable: "false"
"""
# Run with python3 in a container of the mesh image: one request to the pilot's socket
# (argv: METHOD PATH BODY), printing "<status> <body>"; "unreachable <why>" if it cannot.
ON_SOCKET = f"""\
import sys
from composemesh.engine.pilot_api import over_socket
try:
    answer = over_socket({wk.PILOT_SOCKET!r}, sys.argv[1], sys.argv[2],
                         sys.argv[3].encode() if len(sys.argv) > 3 else None)
except OSError as exc:
    print("unreachable", exc)
else:
    print(answer.status, answer.body.decode())
"""


@pytest.fixture(scope="module")
def mesh(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with meshed("attacks", tmp_path_factory.mktemp("attacks"), COMPOSE) as m:
        yield m


def address_of(mesh: Mesh, container: str) -> str:
    nets = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container))
    return str(nets[mesh.network()]["IPAddress"])


def gateway(mesh: Mesh) -> str:
    config = json.loads(docker("network", "inspect", "-f", "{{json .IPAM.Config}}",
                               mesh.network()))
    return str(config[0]["Gateway"])


def http_request(method: str, path: str, body: bytes = b"") -> str:
    """A request as the spoofing tool's --payload-b64."""
    head = (f"{method} {path} HTTP/1.1\r\nHost: {wk.PILOT_SERVICE}\r\n"
            f"Content-Type: application/pkcs10\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode()
    return base64.b64encode(head + body).decode()


def csr(spiffe: str | None = None) -> bytes:
    return csr_to_pem(make_csr(generate_key(), spiffe))


def pilot_state(mesh: Mesh) -> tuple[str, str, dict[str, int]]:
    """What the attacks must not change: the root, its rotation phase, reviews' split."""
    ca = mesh.pilot_get("/v1/ca")
    status = mesh.pilot_get("/v1/status")
    return ca["fingerprint"], ca["rotation_phase"], status["services"]["reviews"]["split"]


# --------------------------------------------------------------------------- faked addresses


def test_the_spoofing_tool_works_here_against_a_target_that_trusts_addresses(mesh: Mesh) -> None:
    """The control: the same tool, on this project's network, is taken for the workload."""
    reviews = mesh.address("reviews")
    target = address_of(mesh, mesh.container("whoami"))
    result = spoof(mesh.network(), reviews, target, 8080,
                   "--payload-b64", http_request("POST", "/v1/certificate", csr()))
    assert result["result"] == "connected", result
    assert json.loads(result["reply"].partition("\r\n\r\n")[2]) == {"client": reviews}, result


@pytest.mark.parametrize("victim", ["workload", "gateway"])
def test_a_faked_address_gets_no_certificate_and_steers_nothing(mesh: Mesh, victim: str) -> None:
    """As reviews' address (the issue's certificate theft) or as the bridge gateway's (the
    issue's route change and root rotation), at every port the pilot ever had: no listener
    answers, so nothing is issued and nothing changes."""
    before = pilot_state(mesh)
    issued_before = logs_of(mesh.container(wk.PILOT_SERVICE)).count("certificate issued")
    pilot = address_of(mesh, mesh.container(wk.PILOT_SERVICE))
    as_ = mesh.address("reviews") if victim == "workload" else gateway(mesh)
    for port, payload in (
        (15010, http_request("POST", "/v1/certificate", csr())),
        (15012, http_request("POST", "/v1/certificate", csr())),
        (15010, http_request("PUT", "/v1/routes/reviews")),
        (15010, http_request("POST", "/v1/ca/rotate")),
    ):
        result = spoof(mesh.network(), as_, pilot, port, "--payload-b64", payload)
        assert result["result"] == "refused" and result["reply"] == "", (port, result)
    assert pilot_state(mesh) == before
    assert logs_of(mesh.container(wk.PILOT_SERVICE)).count("certificate issued") == issued_before


def test_the_pilot_listens_on_no_network_port_but_its_read_only_monitoring_one(
        mesh: Mesh) -> None:
    """Nothing of the pilot's API is on a network: it is on its Unix socket alone. The one
    port on the networks is 15014 (Istio's istiod monitoring port: metrics and Prometheus's
    service discovery, read-only, see the next test); the other TCP listener in its
    namespace is Docker's embedded DNS on 127.0.0.11."""
    pilot = mesh.container(wk.PILOT_SERVICE)
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in docker("exec", pilot, "cat", table).splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A":  # LISTEN
                listening.append(cols[1])
    monitoring = f":{wk.PORT_PILOT_MONITORING:04X}"
    assert all(local.startswith("0B00007F:") or local.endswith(monitoring)
               for local in listening), listening
    assert docker("exec", pilot, "stat", "-c", "%F", wk.PILOT_SOCKET) == "socket"
    assert docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", pilot) in ("{}", "null")


def test_the_monitoring_port_changes_nothing_and_tells_no_secret(mesh: Mesh) -> None:
    """From a faked address (reviews', the bridge gateway's), the API's paths on 15014 are
    not there (404) or not for that method (405); nothing is issued or changed. What it
    does tell (metrics, scrape targets) holds no certificate, key or token."""
    before = pilot_state(mesh)
    issued_before = logs_of(mesh.container(wk.PILOT_SERVICE)).count("certificate issued")
    pilot = address_of(mesh, mesh.container(wk.PILOT_SERVICE))
    port = wk.PORT_PILOT_MONITORING
    for as_ in (mesh.address("reviews"), gateway(mesh)):
        for method, path, statuses in (
            ("POST", "/v1/certificate", {"404"}),
            ("PUT", "/v1/routes/reviews", {"404"}),
            ("POST", "/v1/ca/rotate", {"404"}),
            ("POST", "/metrics", {"405"}),
            ("DELETE", "/sd/prometheus", {"405"}),
        ):
            body = csr() if path == "/v1/certificate" else b""
            result = spoof(mesh.network(), as_, pilot, port, "--payload-b64",
                           http_request(method, path, body))
            assert result["result"] == "connected", (method, path, result)
            status = result["reply"].split(" ", 2)[1] if result["reply"] else ""
            assert status in statuses, (method, path, result["reply"][:200])
    assert pilot_state(mesh) == before
    assert logs_of(mesh.container(wk.PILOT_SERVICE)).count("certificate issued") == issued_before
    for path in ("/metrics", "/sd/prometheus"):
        told = mesh.exec("reviews", "python3", "-c",
                         "import urllib.request,sys;sys.stdout.write(urllib.request.urlopen("
                         f"'http://{wk.PILOT_SERVICE}:{port}{path}',timeout=10).read().decode())")
        assert told and "BEGIN" not in told and "PRIVATE" not in told, told[:300]
        assert "token" not in told.lower(), told[:300]


def test_a_plaintext_request_from_a_faked_address_does_not_reach_a_strict_service(
        mesh: Mesh) -> None:
    """The data plane takes identities from certificates: a connection that claims to be
    reviews by its address gets no answer from web's app."""
    web = mesh.address("web")
    result = spoof(mesh.network(), mesh.address("reviews"), web, 9080, "--payload",
                   "GET /ratings/0 HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n")
    assert result["result"] in ("connected", "refused"), result
    assert "ratings" not in result["reply"] and "200 OK" not in result["reply"], result


# --------------------------------------------------------------------------- who can ask at all


def test_an_app_cannot_reach_the_pilot_in_any_way(mesh: Mesh) -> None:
    """An app shares its proxy's network namespace, not its mounts: no socket to open, no port
    to dial (so it cannot ask for its proxy's certificate, nor ACK for it)."""
    app = mesh.container("reviews")
    proc = subprocess.run(["docker", "exec", app, "ls", wk.PILOT_SOCKET_DIR],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "No such file" in proc.stderr
    dial = ("import socket, sys\n"
            "for port in (15010, 15012):\n"
            "    try:\n"
            "        s = socket.create_connection(('composemesh-pilot', port), timeout=5)\n"
            "        s.sendall(b'GET /v1/status HTTP/1.0\\r\\n\\r\\n')\n"
            "        print(port, repr(s.recv(100)))\n"
            "    except OSError as exc:\n"
            "        print(port, 'refused', type(exc).__name__)\n")
    out = mesh.exec("reviews", "python3", "-c", dial)
    for line in out.splitlines():  # refused, or taken by the proxy and closed: never HTTP
        assert "refused" in line or line.endswith("b''"), out


def test_a_proxy_may_ask_for_its_own_workload_only(mesh: Mesh) -> None:
    """web's proxy (which can open the socket) may not ACK or NACK for reviews' proxy, take
    reviews' identity, read the mesh's status, change a route or rotate the root."""
    before = pilot_state(mesh)
    reviews_node = next(p["node"] for p in mesh.pilot_get("/v1/status")["proxies"]
                        if p["service"] == "reviews")
    forged = json.dumps({"node": reviews_node, "version": "forged", "ok": False,
                         "reason": "a NACK that did not happen"})
    spiffe = f"spiffe://cluster.local/ns/{mesh.project}/sa/reviews"
    proxy = "web-proxy"
    for args, why in (
        (("POST", "/v1/ack", forged), "node does not match"),
        (("POST", "/v1/certificate", csr(spiffe).decode()), "attested as"),
        (("GET", "/v1/status"), "not for the proxy"),
        (("PUT", "/v1/routes/reviews", '{"weights": {"v1": 100}}'), "not for the proxy"),
        (("POST", "/v1/ca/rotate", '{"step": "begin"}'), "not for the proxy"),
    ):
        out = mesh.exec(proxy, "python3", "-c", ON_SOCKET, *args)
        assert out.startswith("403 ") and why in out, (args[:2], out)
    after = mesh.pilot_get("/v1/status")
    row = next(p for p in after["proxies"] if p["node"] == reviews_node)
    assert row["nacked_version"] is None and row["in_sync"], row
    assert pilot_state(mesh) == before


def test_injected_containers_have_no_raw_sockets_and_no_capabilities_to_spare(mesh: Mesh) -> None:
    """Forging ARP answers takes NET_RAW: no container the injector adds has it. The holder
    keeps NET_ADMIN (its iptables rules), nothing else; none may gain privileges."""
    raw = "import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)"
    for service in ("web-proxy", "web-netns", wk.PILOT_SERVICE):
        container = mesh.container(service)
        proc = subprocess.run(["docker", "exec", container, "python3", "-c", raw],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "PermissionError" in proc.stderr, (service, proc)
        caps = json.loads(docker("inspect", "-f", "{{json .HostConfig}}", container))
        assert caps["CapDrop"] == ["ALL"], service
        added = [c.removeprefix("CAP_") for c in caps["CapAdd"] or []]
        assert added == (["NET_ADMIN"] if service == "web-netns" else []), service
        assert "no-new-privileges:true" in (caps["SecurityOpt"] or []), service
    # and yet they work: the mesh is up, capture is in force, the pilot attests
    assert mesh.get_json("web", "http://reviews:9080/reviews/0")[0]["status"] == 200


# --------------------------------------------------------------------------- capture


def test_an_app_listening_on_the_proxys_ports_is_not_reached_from_outside(mesh: Mesh) -> None:
    """Only the ports the proxy itself serves on the namespace's address are left out of
    capture (15021, 15090: the proxy holds them); an app's listener on any other port, the
    15000s included, is reached through the proxy or not at all, never in plaintext past
    STRICT."""
    logs = logs_of(mesh.container("trap"))
    bound = next(line for line in logs.splitlines() if line.startswith("bound")).split()[1:]
    assert {"15000", "15010", "15012", "15020", "15053"} <= set(bound), logs  # it did listen
    assert not {"15001", "15006", "15021", "15090"} & set(bound), logs  # the proxy's
    target = mesh.address("trap")
    probe = ("import socket, sys\n"
             "for port in map(int, sys.argv[2:]):\n"
             "    try:\n"
             "        s = socket.create_connection((sys.argv[1], port), timeout=5)\n"
             "        s.settimeout(5)\n"
             "        s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
             "        data = b''\n"
             "        while chunk := s.recv(4096):\n"
             "            data += chunk\n"
             "        print(port, repr(data[:200]))\n"
             "    except OSError as exc:\n"
             "        print(port, 'error', type(exc).__name__)\n")
    proc = mesh.outsider(wk.MESH_IMAGE, "python3", "-c", probe, target,
                         *map(str, TRAP_PORTS))
    lines = proc.stdout.splitlines()
    assert len(lines) == len(TRAP_PORTS), proc.stdout + proc.stderr
    assert MARKER not in proc.stdout, proc.stdout
    # the mesh's callers still reach it, through the proxies (mTLS), on a port it serves
    answer = mesh.exec("web", "python3", "-c", probe, "trap", "15010")
    assert MARKER in answer, answer


def test_check_warns_of_an_app_that_could_leave_its_proxy(tmp_path: Path) -> None:
    """A root app with NET_ADMIN can rewrite its namespace's capture rules, and any root app
    can setuid to the proxy's uid (1337), whose traffic is never captured (Istio's limit too)."""
    compose = tmp_path / "compose.yaml"
    compose.write_text(f"""\
services:
  tool:
    image: {wk.DEMO_IMAGE}
    cap_add: [NET_ADMIN]
  plain:
    image: {wk.DEMO_IMAGE}
    user: "1000"
""")
    proc = composemesh("check", "-f", str(compose))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "service 'tool'" in out and "NET_ADMIN" in out, out
    assert "service 'plain'" not in out, out
