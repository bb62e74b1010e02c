"""A mesh across two Docker "hosts" federated through Consul (issue 13), on the real engine.

The two hosts are two compose projects, ``A`` and ``B``, each on its own networks: Docker's
isolation keeps A's containers from B's addresses (a test shows it). The one way between them
is each project's east-west gateway, whose port (``east_west_port``) is published on the
host, at ``host_address``: the address of the engine's host that containers reach, here the
default bridge's gateway. Both meshes share one trust root (the user's own, ``mtls.root``).

Consul is ``tests/consul/agent_double.py``, run by this test on the host: it stands in for a
Consul agent, which cannot be installed on these machines (not in Debian, PyPI or npm, and no
image can be pulled). It answers the documented endpoints the pilots use, and its
``restart()`` is an agent coming back without its state. This module drives the double (it
restarts it, registers a VM in it, changes its token); the pilot's Consul source is tested
against a real agent too where one is at hand (``tests/pilot/test_consul_source.py``).

- A has ``client`` (and ``other``, a second caller) and ``reviews``; B has ``payments``
  (nowhere in A's file), ``reviews`` too and the ``ratings`` its reviews call. B's policy
  lets A's client call payments and refuses A's other.
- A is brought up while Consul does not answer yet (one warning, the mesh works locally),
  then Consul comes and both register.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from composemesh.ca.pki import make_root
from tests.consul.agent_double import AgentDouble
from tests.e2e.conftest import (
    DEMO,
    Mesh,
    bring_up,
    composemesh,
    docker,
    force_remove,
    tear_down,
    unique_project,
)
from tests.support import free_port

pytestmark = pytest.mark.e2e

T = TypeVar("T")
TD = "cluster.local"


class ConsulOnHost:
    """The agent double (see the module's docstring: it stands in for a Consul agent) served
    on every interface of the host from a thread of its own, started and stopped at will."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.double: AgentDouble = self.call(lambda: AgentDouble(node="host-consul"))
        self.runner: web.AppRunner | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the double's loop (its state is the loop's alone)."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return done.result(timeout=30)

    def start(self) -> None:
        async def serve() -> web.AppRunner:
            runner = web.AppRunner(self.double.make_app(), shutdown_timeout=2.0)
            await runner.setup()
            await web.TCPSite(runner, "0.0.0.0", self.port).start()  # noqa: S104
            return runner

        self.runner = asyncio.run_coroutine_threadsafe(serve(), self.loop).result(timeout=30)

    def close(self) -> None:
        if self.runner is not None:
            self.call(self.double.cut)  # its blocking queries end, as an agent's exit ends them
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def registrations(self, project: str | None = None) -> dict[str, dict[str, Any]]:
        """The registered services (by ID), of ``project`` only if given."""
        def snapshot() -> dict[str, dict[str, Any]]:
            return {sid: {"name": s.name, "tags": list(s.tags), "meta": dict(s.meta),
                          "address": s.address, "port": s.port}
                    for sid, s in self.double.services.items() if sid != "consul"}
        found = self.call(snapshot)
        return {sid: r for sid, r in found.items()
                if project is None or r["meta"].get("project") == project}

    def checks(self) -> dict[str, str]:
        return self.call(lambda: {c.service_id: c.status for c in self.double.checks.values()})


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 90.0) -> T:
    """``probe()``'s first truthy answer, asked until ``timeout``; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def host_address() -> str:
    """An address of the engine's host that every container reaches: the default bridge's
    gateway (what ``host_address`` is on a real fleet: the host's own address)."""
    return docker("network", "inspect", "bridge", "-f", "{{(index .IPAM.Config 0).Gateway}}")


def write_root(folder: Path) -> None:
    cert, key = make_root("fleet root", TD, timedelta(days=30))
    (folder / "root.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "root-key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    os.chmod(folder / "root-key.pem", 0o600)


def consul_section(consul: str, host: str, east_west_port: int) -> str:
    return f"""
x-composemesh:
  mtls:
    root: {{cert: root.pem, key: root-key.pem}}
  consul:
    address: {consul}
    host_address: {host}
    east_west_port: {east_west_port}
"""


def compose_a(consul: str, host: str, port: int) -> str:
    return DEMO + consul_section(consul, host, port) + """
services:
  client:
    <<: *demo
    command: ["ratings"]
  other:
    <<: *demo
    command: ["ratings"]
  reviews:
    <<: *demo
    command: ["reviews"]
    environment: {VERSION: v1}
"""


def compose_b(consul: str, host: str, port: int, project_a: str) -> str:
    return DEMO + consul_section(consul, host, port) + f"""
  policies:
    payments:
      - name: only-a-client
        from: [{project_a}/client]
services:
  payments:
    <<: *demo
    command: ["ratings"]
  reviews:
    <<: *demo
    command: ["reviews"]
    environment: {{VERSION: b}}
    labels: {{composemesh.version: v1}}
  ratings:
    <<: *demo
    command: ["ratings"]
"""


class Fleet:
    def __init__(self, consul: ConsulOnHost, a: Mesh, b: Mesh, host: str, ports: tuple[int, int],
                 registered_s: float) -> None:
        self.consul, self.a, self.b, self.host = consul, a, b, host
        self.ports = ports
        self.registered_s = registered_s  # from Consul's start to both projects registered
        self.down: set[str] = set()  # projects a test took down already


@pytest.fixture(scope="module")
def fleet(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("fleet")
    write_root(folder)
    consul = ConsulOnHost(free_port())
    host = host_address()
    address = f"http://{host}:{consul.port}"
    ports = (free_port(), free_port())
    a_name, b_name = unique_project("fa"), unique_project("fb")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    for side in ("a", "b"):
        for name in ("root.pem", "root-key.pem"):
            (folder / side / name).write_bytes((folder / name).read_bytes())
        os.chmod(folder / side / "root-key.pem", 0o600)
    file_a = folder / "a" / "compose.yaml"
    file_b = folder / "b" / "compose.yaml"
    file_a.write_text(compose_a(address, host, ports[0]))
    file_b.write_text(compose_b(address, host, ports[1], a_name))
    meshes: list[Mesh] = []
    built: Fleet | None = None
    try:
        # A comes up while Consul does not answer: a warning, and the mesh works locally
        proc = composemesh("up", "-f", str(file_a), "-p", a_name)
        a = Mesh(project=a_name, files=[file_a], up_output=proc.stdout + proc.stderr)
        meshes.append(a)
        assert proc.returncode == 0, a.up_output
        consul.start()
        started = time.monotonic()
        b = bring_up(b_name, [file_b], {})
        meshes.append(b)
        wait_for("A's and B's registrations", lambda: (
            len(consul.registrations(a_name)) == 3 and len(consul.registrations(b_name)) == 3))
        built = Fleet(consul, a, b, host, ports, time.monotonic() - started)
        yield built
    finally:
        failures: list[AssertionError] = []
        for mesh in reversed(meshes):  # each goes (tear_down removes it whatever `down` said)
            if built is None or mesh.project not in built.down:
                try:
                    tear_down(mesh)
                except AssertionError as exc:  # the next one still goes; then this fails
                    failures.append(exc)
        consul.close()
        if failures:
            raise failures[0]


def get(mesh: Mesh, service: str, url: str) -> dict[str, Any]:
    (answer,) = mesh.get_json(service, url)
    return answer


def test_up_without_consul_warns_once_and_the_mesh_works_locally(fleet: Fleet) -> None:
    out = fleet.a.up_output
    warnings = [line for line in out.splitlines() if line.startswith("warning: Consul at")]
    assert len(warnings) == 1 and "does not answer" in warnings[0], out
    assert get(fleet.a, "client", "http://reviews:9080/reviews/0")["status"] == 200


def test_each_instance_is_registered_with_version_identity_and_its_gateway(fleet: Fleet) -> None:
    regs = fleet.consul.registrations(fleet.b.project)
    payments = next(r for r in regs.values() if r["name"] == "payments")
    assert payments["tags"] == ["v1"]
    assert payments["meta"]["version"] == "v1"
    assert payments["meta"]["spiffe"] == f"spiffe://{TD}/ns/{fleet.b.project}/sa/payments"
    assert (payments["address"], payments["port"]) == (fleet.host, fleet.ports[1])
    checks = fleet.consul.checks()
    assert all(checks[sid] == "passing" for sid in regs), checks
    assert not [r for r in fleet.consul.registrations().values()
                if r["name"] in ("east-west-gateway", "ingress-gateway", "egress-gateway")]
    print(f"\nboth projects registered {fleet.registered_s:.1f}s after Consul came")


def test_a_service_only_on_the_other_host_is_reachable_by_name_through_its_gateway(
        fleet: Fleet) -> None:
    answer = get(fleet.a, "client", "http://payments:9080/ratings/0")
    assert answer["status"] == 200 and answer["service"] == "ratings", answer
    # B's payments saw A's client by its certificate, over mTLS end to end
    metrics = wait_for("B's payments to count A's call", lambda: [
        line for line in fleet.b.prometheus("payments").splitlines()
        if line.startswith("istio_requests_total{") and 'reporter="destination"' in line
        and f'source_principal="spiffe://{TD}/ns/{fleet.a.project}/sa/client"' in line])
    assert 'connection_security_policy="mutual_tls"' in metrics[0], metrics


def test_the_other_host_policy_allows_a_client_and_refuses_another(fleet: Fleet) -> None:
    """payments' port is not declared, so A's sidecars detect its protocol from the app's
    first bytes: HTTP as a rule (a refusal is a 403), TCP when those bytes come later than
    the sniffing window, as on a loaded machine (a refusal is then the connection closed,
    as Istio closes a TCP connection its policy denies). Either way: never an answer."""
    for _ in range(3):
        assert get(fleet.a, "client", "http://payments:9080/ratings/0")["status"] == 200
        refused = get(fleet.a, "other", "http://payments:9080/ratings/0")
        assert refused["status"] == 403 or (
            refused["status"] == 0 and "closed connection" in refused["error"]), refused
        assert "ratings" not in refused


def test_the_only_path_between_the_hosts_is_the_east_west_gateway(fleet: Fleet) -> None:
    target = fleet.b.address("payments")
    direct = get(fleet.a, "client", f"http://{target}:9080/ratings/0")  # Docker keeps them apart
    assert direct["status"] == 0, direct
    # a stranger on the host's side (no mesh certificate) gets nothing through the gateway
    hello = ("import socket,sys\ns = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)"
             "\ns.sendall(b'GET / HTTP/1.1\\r\\nHost: payments\\r\\n\\r\\n')\ns.settimeout(5)"
             "\ntry:\n print(repr(s.recv(100)))\nexcept OSError as e:\n print('error', e)")
    out = fleet.a.exec("client", "python3", "-c", hello, fleet.host, str(fleet.ports[1]))
    assert out.strip() in ("b''",) or out.startswith("error"), out


def test_a_stranger_at_the_gateway_gets_no_further_than_without_a_certificate(
        fleet: Fleet) -> None:
    """From the host, at B's published east-west port: TLS naming B's payments but with no
    certificate fails at payments' own sidecar (STRICT); a name of another project, a proxy
    port or no SNI at all is closed by the gateway with nothing written."""
    import socket
    import ssl

    def hello(sni: str | None) -> str:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((fleet.host, fleet.ports[1]), timeout=10) as raw:
            try:
                with context.wrap_socket(raw, server_hostname=sni) as tls:
                    tls.sendall(b"GET /ratings/0 HTTP/1.1\r\nHost: payments\r\n\r\n")
                    return "answered " + repr(tls.recv(200))
            except (ssl.SSLError, OSError) as exc:
                return f"refused {type(exc).__name__}"

    b, a = fleet.b.project, fleet.a.project
    for sni in (f"outbound_.9080_.v1_.payments.{b}.svc.{TD}",  # no client certificate
                f"outbound_.9080_.v1_.client.{a}.svc.{TD}",  # another project's name
                f"outbound_.15000_.v1_.payments.{b}.svc.{TD}",  # a proxy port
                None):
        said = hello(sni)
        assert said.startswith("refused") or said == "answered b''", (sni, said)


def test_a_catalog_change_reaches_the_proxies_within_a_second(fleet: Fleet) -> None:
    """A VM-like service registered in Consul (no mesh identity) becomes routable by name; the
    time from the registration to A's client's sidecar holding it is printed."""
    with vm_server() as port:
        body = {"ID": "legacy-1", "Name": "legacy", "Address": fleet.host, "Port": port,
                "Check": {"TTL": "60s", "Status": "passing"}}
        started = time.monotonic()
        fleet.consul.call(lambda: fleet.consul.double.register(body))
        wait_for("legacy in A's client's sidecar", lambda: "legacy" in json.loads(
            fleet.a.admin("client", "/config_dump"))["routing_table"], timeout=30)
        took = time.monotonic() - started
        print(f"\ncatalog change at A's client's sidecar in {took * 1000:.0f} ms (an upper "
              f"bound: each look is a docker exec)")
        stats = docker("stats", "--no-stream", "--format", "{{.CPUPerc}} {{.MemUsage}}",
                       fleet.a.container("composemesh-pilot"))
        print(f"A's pilot: {stats}")
        answer = get(fleet.a, "client", "http://legacy:80/")
        assert answer["status"] == 200 and answer.get("vm") is True, answer
        fleet.consul.call(lambda: fleet.consul.double._deregister("legacy-1"))
        wait_for("legacy gone from A's client's sidecar", lambda: "legacy" not in json.loads(
            fleet.a.admin("client", "/config_dump"))["routing_table"], timeout=30)


@contextlib.contextmanager
def vm_server() -> Iterator[int]:
    """A plain HTTP server on the host, as a VM's service would be (not in any mesh)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = json.dumps({"service": "legacy", "vm": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)  # noqa: S104
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


STREAM = r"""
import json, sys, time, urllib.request
until = time.monotonic() + float(sys.argv[1])
while time.monotonic() < until:
    try:
        with urllib.request.urlopen("http://reviews:9080/reviews/0", timeout=10) as r:
            print(json.dumps({"t": time.monotonic(), "status": r.status,
                              "version": json.load(r).get("version")}), flush=True)
    except Exception as e:
        print(json.dumps({"t": time.monotonic(), "status": getattr(e, "code", 0),
                          "error": str(e)}), flush=True)
    time.sleep(0.02)
"""


def test_failover_from_local_to_the_other_host_while_a_stream_runs(fleet: Fleet) -> None:
    a = fleet.a
    assert get(a, "client", "http://reviews:9080/reviews/0")["version"] == "v1"  # local first
    stream = subprocess.Popen(
        ["docker", "exec", a.container("client"), "python3", "-c", STREAM, "12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        docker("stop", "-t", "2", a.container("reviews"))
        out, err = stream.communicate(timeout=60)
    finally:
        if stream.poll() is None:
            stream.kill()
        docker("start", a.container("reviews"), check=False)
    answers = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(answers) > 50, f"{out}\n{err}"
    failed = [x for x in answers if x["status"] != 200]
    versions = [x.get("version") for x in answers if x["status"] == 200]
    if len(failed) > 2:
        logs = subprocess.run(["docker", "logs", "--tail", "60", a.container("client-proxy")],
                              capture_output=True, text=True).stdout
        print("\nCLIENT PROXY LOG\n" + "\n".join(line for line in logs.splitlines()
                                                 if '"response_code": 50' in line
                                                 or "reviews" in line)[-6000:])
    assert len(failed) <= 2, failed[:5]  # no more than were in flight when it stopped
    assert versions[0] == "v1" and versions[-1] == "b", versions
    print(f"\n{len(answers)} requests, {len(failed)} failed, "
          f"{versions.count('b')} served by the other host")
    wait_for("A's reviews back", lambda: get(a, "client", "http://reviews:9080/reviews/0")
             .get("version") == "v1")


def test_consul_restarted_without_its_state_gets_every_registration_back(fleet: Fleet) -> None:
    before = set(fleet.consul.registrations())
    started = time.monotonic()
    fleet.consul.call(fleet.consul.double.restart)
    assert not fleet.consul.registrations()
    def back() -> list[str] | None:
        now = set(fleet.consul.registrations())
        return None if now != before else sorted(now)

    try:
        wait_for("the registrations back", back)
    except AssertionError:
        now = set(fleet.consul.registrations())
        raise AssertionError(f"missing {sorted(before - now)}, extra {sorted(now - before)}, "
                             f"checks {fleet.consul.checks()}") from None
    print(f"\nregistrations back {time.monotonic() - started:.1f}s after Consul lost them")
    assert get(fleet.a, "client", "http://payments:9080/ratings/0")["status"] == 200


def test_status_shows_what_is_exported_and_imported(fleet: Fleet) -> None:
    proc = composemesh("status", "-p", fleet.a.project, "--json")
    assert proc.returncode == 0, proc.stderr
    consul = json.loads(proc.stdout)["consul"]
    assert consul["reachable"] is True
    assert set(consul["exported"]) == {"client", "other", "reviews"}
    assert {"payments", "reviews"} <= set(consul["imported"])
    table = composemesh("status", "-p", fleet.a.project)
    assert "Consul" in table.stdout and "payments" in table.stdout, table.stdout


def test_down_leaves_nothing_registered(fleet: Fleet, tmp_path: Path) -> None:
    """Last in the module: B goes down, and none of its registrations stays in Consul."""
    assert fleet.consul.registrations(fleet.b.project)
    tear_down(fleet.b)
    fleet.down.add(fleet.b.project)
    assert fleet.consul.registrations(fleet.b.project) == {}
    assert fleet.consul.registrations(fleet.a.project)  # A's stay


def test_a_bad_token_is_one_clear_error_and_nothing_starts(fleet: Fleet, tmp_path: Path) -> None:
    token = tmp_path / "consul.token"
    token.write_text("not-a-token\n")
    fleet.consul.call(lambda: setattr(fleet.consul.double, "token", "the-real-one"))
    project = unique_project("ftok")
    try:
        (tmp_path / "compose.yaml").write_text(DEMO + f"""
x-composemesh:
  consul:
    address: http://{fleet.host}:{fleet.consul.port}
    token_file: ./consul.token
    host_address: {fleet.host}
    east_west_port: {free_port()}
services:
  web:
    <<: *demo
    command: ["ratings"]
""")
        proc = composemesh("up", "-f", str(tmp_path / "compose.yaml"), "-p", project)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if "token" in line]
        assert len(errors) == 1 and "token_file" in errors[0], proc.stderr
        assert "not-a-token" not in proc.stdout + proc.stderr
        assert not docker("ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
                          "-q")
    finally:
        fleet.consul.call(lambda: setattr(fleet.consul.double, "token", None))
        force_remove(project)  # were anything started after all

