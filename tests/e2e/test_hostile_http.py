"""Hostile HTTP on the real engine (issue 8, sections 3 and 4), each attack performed as an
attacker would: from a meshed app through its own sidecar (outbound), and from a container
outside the mesh straight into a destination's sidecar (inbound, a PERMISSIVE service).

- framing that breaks after the head: 400 and a closed connection at once, nothing held;
- a 100 MB header: 431, the sidecar's memory within a few MiB of where it was;
- slowloris (a byte a second): closed after the header timeout, set short by label;
- 300 idle connections to a port declared http: no tunnel to the app, closed by the timeout;
- the issue's path list against DENY /admin/* and ALLOW /public/* in front of Python's
  http.server (a server we did not write, which decodes %2F): the policy's answer and the
  app's agree, and the denied file is never served.

The attacks are Python scripts (ATTACK) run with python3 in the attacking container.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from composemesh.model import wellknown as wk
from composemesh.model.policy import Operation, Policy, authorize, request_path
from tests.e2e.conftest import DEMO, Mesh, meshed

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT_S = 2  # composemesh.proxy.request_headers_timeout of the attacked sidecars
SECRET = "SECRET-FILE"
PUBLIC = "PUBLIC-FILE"

# Python's http.server over a small tree: /admin/secret, /public/x, /healthz (the demo
# anchor's healthcheck asks for it).
FILE_SERVER = (
    "mkdir -p /srv/admin /srv/public && "
    f"echo {SECRET} > /srv/admin/secret && echo {PUBLIC} > /srv/public/x && "
    "echo ok > /srv/healthz && cd /srv && exec python3 -m http.server 9080"
)

COMPOSE = f"""\
x-composemesh:
  mtls:
    mode: STRICT
    services: {{reviews: PERMISSIVE}}
  policies:
    files:
      - name: no-admin
        action: DENY
        to: [{{paths: ["/admin/*"]}}]
    public:
      - name: public-only
        to: [{{paths: ["/public/*"]}}]

{DEMO}
services:
  client:
    <<: *demo
    command: ["ratings"]
    labels:
      composemesh.proxy.request_headers_timeout: "{HEADER_TIMEOUT_S}s"
  reviews:
    <<: *demo
    command: ["reviews"]
    labels:
      composemesh.protocol: http
      composemesh.proxy.request_headers_timeout: "{HEADER_TIMEOUT_S}s"
  files:
    <<: *demo
    entrypoint: ["sh", "-c"]
    command: ["{FILE_SERVER}"]
    labels: {{composemesh.protocol: http}}
  public:
    <<: *demo
    entrypoint: ["sh", "-c"]
    command: ["{FILE_SERVER}"]
    labels: {{composemesh.protocol: http}}
"""

# python3 -c ATTACK MODE HOST PORT [ARGS...]: one attack, a JSON line of what it saw.
ATTACK = r"""
import json, socket, sys, threading, time
mode, host, port, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def until_closed(sock, limit):
    # everything until the peer closes (EOF or reset), and how long that took
    start, data = time.monotonic(), b""
    sock.settimeout(limit)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        return data, None
    except OSError:
        pass
    return data, time.monotonic() - start

def head(data):
    return data.split(b"\r\n\r\n", 1)[0].decode("latin-1")

out = {}
if mode == "framing":  # 20 connections, each a request whose body framing is broken
    results = []
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(20)]
    for s in socks:
        s.sendall(b"POST / HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                  b"Transfer-Encoding: xchunked\r\n\r\nabc")
    for s in socks:
        data, took = until_closed(s, 10)
        results.append({"head": head(data), "closed_after": took})
    out = {"results": results}
elif mode == "bigheader":  # a 100 MB header value, streamed
    s = socket.create_connection((host, port), timeout=30)
    sent = [0]
    def send():
        chunk = b"a" * (1 << 20)
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Big: ")
            while sent[0] < int(args[0]) << 20:
                s.sendall(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass
    t = threading.Thread(target=send, daemon=True)
    t.start()
    data, took = until_closed(s, 60)
    t.join(30)
    out = {"head": head(data), "closed_after": took, "sent_mb": sent[0] >> 20}
elif mode == "slowloris":  # a request head at one byte a second
    s = socket.create_connection((host, port), timeout=10)
    start, data = time.monotonic(), b""
    request = b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nX-Slow: " + b"b" * 100
    s.settimeout(1.0)
    for byte in request:
        try:
            s.sendall(bytes([byte]))
            chunk = s.recv(65536)  # waits up to a second: the pace of the attack
            if not chunk:
                break
            data += chunk
            rest, _ = until_closed(s, 5)
            data += rest
            break
        except socket.timeout:
            continue
        except OSError:
            break
    out = {"head": head(data), "closed_after": time.monotonic() - start}
elif mode == "idle":  # N connections that never say a word
    n, hold = int(args[0]), float(args[1])
    socks = [socket.create_connection((host, port), timeout=10) for _ in range(n)]
    print(json.dumps({"opened": n}), flush=True)
    start, closed = time.monotonic(), []
    for s in socks:
        data, took = until_closed(s, max(0.1, hold - (time.monotonic() - start)))
        if took is not None:
            closed.append(time.monotonic() - start)
    out = {"closed": len(closed), "last_closed_after": max(closed) if closed else None}
elif mode == "paths":  # one GET per raw request target, each on a new connection
    answers = []
    for target in args:
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"GET " + target.encode("latin-1") + b" HTTP/1.1\r\nHost: " + host.encode()
                  + b"\r\nConnection: close\r\n\r\n")
        data, _ = until_closed(s, 10)
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
        body = data.split(b"\r\n\r\n", 1)[1].decode("latin-1") if b"\r\n\r\n" in data else ""
        answers.append({"target": target, "status": status, "body": body[:200]})
        s.close()
    out = {"answers": answers}
print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def mesh(images: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    with meshed("hostile", tmp_path_factory.mktemp("hostile"), COMPOSE) as m:
        yield m


def attack_from_app(mesh: Mesh, *args: str, timeout: float = 180) -> dict[str, Any]:
    """ATTACK run in the meshed app "client": its connections go through its sidecar."""
    out = mesh.exec("client", "python3", "-c", ATTACK, *args, timeout=timeout)
    return dict(json.loads(out.strip().splitlines()[-1]))


def attack_from_outside(mesh: Mesh, *args: str, timeout: float = 180) -> dict[str, Any]:
    """ATTACK run in a container on the project's network, outside the mesh."""
    proc = mesh.outsider(wk.MESH_IMAGE, "python3", "-c", ATTACK, *args, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def memory_current(mesh: Mesh, proxy: str) -> int:
    """The sidecar container's memory as its cgroup counts it, in bytes (cgroup v2's
    memory.current, or v1's memory.usage_in_bytes)."""
    return int(mesh.exec(proxy, "sh", "-c", "cat /sys/fs/cgroup/memory.current 2>/dev/null"
                         " || cat /sys/fs/cgroup/memory/memory.usage_in_bytes"))


def peak_rss_kib(mesh: Mesh, proxy: str) -> tuple[int, int]:
    """The proxy process's (PID 1's) RSS now and its peak since the last reset, in KiB."""
    status = mesh.exec(proxy, "cat", "/proc/1/status")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def descriptors(mesh: Mesh, proxy: str) -> int:
    return len(mesh.exec(proxy, "ls", "/proc/1/fd").split())


def app_connections(mesh: Mesh, service: str, port: int = 9080) -> int:
    """Established TCP connections to ``port`` in the app's namespace (/proc/net/tcp)."""
    table = mesh.exec(service, "cat", "/proc/net/tcp", "/proc/net/tcp6")
    count = 0
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1].endswith(f":{port:04X}") and fields[3] == "01":
            count += 1
    return count


# --------------------------------------------------------------------------- framing


@pytest.mark.parametrize("side", ["outbound", "inbound"])
def test_broken_framing_after_the_head_is_400_and_closed_at_once(mesh: Mesh, side: str) -> None:
    proxy = "client-proxy" if side == "outbound" else "reviews-proxy"
    before = descriptors(mesh, proxy)
    attack = attack_from_app if side == "outbound" else attack_from_outside
    results = attack(mesh, "framing", "reviews", "9080")["results"]
    assert len(results) == 20
    for result in results:
        assert result["head"].startswith("HTTP/1.1 400 Bad Request\r\n"), result
        assert "\r\nconnection: close" in result["head"]
        assert result["closed_after"] is not None and result["closed_after"] < 5, result
    time.sleep(2)  # the linger after the answer, then nothing is held
    assert descriptors(mesh, proxy) <= before + 2, f"{proxy} holds descriptors"


# --------------------------------------------------------------------------- a 100 MB header


@pytest.mark.parametrize("side", ["outbound", "inbound"])
def test_a_100_mb_header_is_431_and_the_sidecar_memory_stays(mesh: Mesh, side: str) -> None:
    proxy = "client-proxy" if side == "outbound" else "reviews-proxy"
    mesh.exec(proxy, "sh", "-c", "echo 5 > /proc/1/clear_refs")  # peak RSS from here
    cgroup_before = memory_current(mesh, proxy)
    rss_before, _ = peak_rss_kib(mesh, proxy)
    attack = attack_from_app if side == "outbound" else attack_from_outside
    result = attack(mesh, "bigheader", "reviews", "9080", "100")
    cgroup_after = memory_current(mesh, proxy)
    _, peak = peak_rss_kib(mesh, proxy)
    print(f"\n{side}: {proxy} cgroup memory {cgroup_before >> 10} KiB -> {cgroup_after >> 10} "
          f"KiB; process RSS {rss_before} KiB, peak during the attack {peak} KiB; the client "
          f"sent {result['sent_mb']} MiB")
    assert result["head"].startswith("HTTP/1.1 431 Request Header Fields Too Large\r\n"), result
    assert result["closed_after"] is not None
    assert peak - rss_before < 4 * 1024, f"the proxy's peak RSS grew by {peak - rss_before} KiB"
    assert cgroup_after - cgroup_before < 8 << 20, "the sidecar's cgroup grew by more than 8 MiB"


# --------------------------------------------------------------------------- slowloris


@pytest.mark.parametrize("side", ["outbound", "inbound"])
def test_slowloris_is_closed_after_the_header_timeout(mesh: Mesh, side: str) -> None:
    attack = attack_from_app if side == "outbound" else attack_from_outside
    result = attack(mesh, "slowloris", "reviews", "9080")
    print(f"\n{side}: slowloris answered and closed after {result['closed_after']:.2f} s")
    assert result["head"].startswith("HTTP/1.1 408 Request Timeout\r\n"), result
    # the label's timeout (the default, 10 s, would be past the bound)
    assert HEADER_TIMEOUT_S * 0.8 <= result["closed_after"] < HEADER_TIMEOUT_S + 5, result


# --------------------------------------------------------------------------- idle connections


def test_300_idle_connections_are_no_tunnels_and_are_closed(mesh: Mesh) -> None:
    """The issue's attack: 300 silent connections to reviews:9080 (declared http) from a
    meshed app; before, each became a tunnel to the app (241 threads)."""
    baseline = app_connections(mesh, "reviews")
    rss_before, _ = peak_rss_kib(mesh, "client-proxy")
    process = subprocess.Popen(
        ["docker", "exec", mesh.container("client"), "python3", "-c", ATTACK, "idle",
         "reviews", "9080", "300", str(HEADER_TIMEOUT_S + 20)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert json.loads(process.stdout.readline()) == {"opened": 300}
        time.sleep(1)  # past the sniffing delay of an undeclared port
        during = app_connections(mesh, "reviews")
        rss_during, _ = peak_rss_kib(mesh, "client-proxy")
        out, err = process.communicate(timeout=HEADER_TIMEOUT_S + 60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    result = json.loads(out.strip().splitlines()[-1])
    print(f"\nidle: the app had {baseline} connections before, {during} with 300 idle ones "
          f"open; client-proxy RSS {rss_before} KiB -> {rss_during} KiB; all closed after "
          f"{result['last_closed_after']} s")
    assert during <= baseline + 5, f"{during} connections reached the app"
    assert result["closed"] == 300, result
    assert result["last_closed_after"] < HEADER_TIMEOUT_S + 10, result


# --------------------------------------------------------------------------- paths

DENY_ADMIN = (Policy(name="no-admin", action="DENY", operations=(Operation(paths=("/admin/*",)),)),)
ALLOW_PUBLIC = (Policy(name="public-only", operations=(Operation(paths=("/public/*",)),)),)

PATHS = [
    "/public/x", "/admin/secret", "/admin%2Fsecret", "/admin%2fsecret", "/admin%5Csecret",
    "/admin%5csecret",
    "/admin\\secret", "/admin/..\\x", "/admin/..\\public/x", "/public/..%2Fadmin/secret",
    "/public/../admin/secret", "/public/%2E%2E/admin/secret", "/public/%2e%2e/admin/secret",
    "/%2e/admin/secret", "/public/./x", "//admin//secret", "/public//x", "/admin;x/secret",
    "/admin/secret;x", "/admin%00/secret", "/public/x%00", "/admin%C0%AFsecret",
    "/public%C0%AF../admin/secret", "/admin#x", "/public/x#y", "/%61dmin/secret",
    "/public/%78", "/public/x?next=/admin/secret", "/public%2Fx", "/public/%252e%252e/admin",
]


@pytest.mark.parametrize(("service", "policies"), [("files", DENY_ADMIN),
                                                   ("public", ALLOW_PUBLIC)])
def test_the_policy_and_the_app_agree_on_every_path(mesh: Mesh, service: str,
                                                    policies: tuple[Policy, ...]) -> None:
    answers = attack_from_app(mesh, "paths", service, "9080", *PATHS)["answers"]
    assert [a["target"] for a in answers] == PATHS
    for answer in answers:
        target, status, body = answer["target"], answer["status"], answer["body"]
        forwarded = request_path(target.split("?", 1)[0])
        if forwarded is None:
            assert status == 400, answer  # refused before the app: it cannot read it otherwise
            continue
        if not authorize(policies, "client", "GET", forwarded).allowed:
            assert status == 403 and body.startswith("RBAC: access denied"), answer
            continue
        # the app answered: it served what the policy allowed, never what it denies
        assert status in (200, 404), answer
        assert SECRET not in body, f"{target} reached the denied file: {answer}"
        if status == 200 and service == "public":
            assert body.strip() == PUBLIC, answer
    served = {a["target"]: a["body"].strip() for a in answers if a["status"] == 200}
    assert served.get("/public/x") == PUBLIC
    assert served.get("/public/./x") == PUBLIC
    assert all(body != SECRET for body in served.values())
