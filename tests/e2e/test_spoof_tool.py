"""The ARP-spoofing tool (tests/e2e/spoof.py) works on a plain Docker network, with Docker's
default capabilities: so a later test in which the same attack fails against the mesh shows
the mesh's defence, not a broken tool.

On a network of its own (``cmtest-spoof-…``): a victim (sleeps), a target (an HTTP server that
answers with the client address it saw) and an attacker that runs the tool against the target
with the victim's address.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from composemesh.model.wellknown import DEMO_IMAGE
from tests.e2e.conftest import PREFIX, docker, spoof

PORT = 8080
CLOSED_PORT = 8081

# The target: answers every GET with the address of the client it saw, as JSON.
WHO_AM_I = f"""\
import http.server, json
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"client": self.client_address[0]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"""

# Run in the victim: GET http://<argv[1]>:<PORT>/, the JSON body to stdout.
GET = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
       f"'http://' + sys.argv[1] + ':{PORT}/', timeout=10).read().decode())")


@dataclass
class Net:
    name: str
    victim: str = ""
    target: str = ""
    victim_ip: str = ""
    target_ip: str = ""
    containers: list[str] = field(default_factory=list)

    def run(self, role: str, *args: str) -> str:
        """A detached container of the demo image on the network; its name."""
        name = f"{self.name}-{role}-{uuid.uuid4().hex[:4]}"
        self.containers.append(name)
        docker("run", "-d", "--name", name, "--network", self.name, "--entrypoint", "python3",
               DEMO_IMAGE, *args)
        return name

    def ip(self, container: str) -> str:
        nets = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container))
        return str(nets[self.name]["IPAddress"])

    def spoof(self, port: int, *extra: str) -> dict:
        """The tool's JSON line, run as the attacker with Docker's default capabilities."""
        return spoof(self.name, self.victim_ip, self.target_ip, port, *extra)

    def victim_get(self) -> dict:
        proc = subprocess.run(["docker", "exec", self.victim, "python3", "-c", GET,
                               self.target_ip], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"victim -> target: {proc.stdout}{proc.stderr}"
        return dict(json.loads(proc.stdout))

    def target_arp(self) -> dict[str, str]:
        """The target's ARP cache: IP -> MAC."""
        lines = docker("exec", self.target, "cat", "/proc/net/arp").splitlines()[1:]
        return {cols[0]: cols[3] for cols in (line.split() for line in lines)}


@pytest.fixture(scope="module")
def net(images: None) -> Iterator[Net]:
    net = Net(name=f"{PREFIX}-spoof-{uuid.uuid4().hex[:6]}")
    docker("network", "create", net.name)
    try:
        net.victim = net.run("victim", "-c", "import time; time.sleep(3600)")
        net.target = net.run("target", "-c", WHO_AM_I)
        net.victim_ip, net.target_ip = net.ip(net.victim), net.ip(net.target)
        deadline = time.monotonic() + 60
        while True:  # the target's server is up, and answers the victim as itself
            try:
                assert net.victim_get() == {"client": net.victim_ip}
                break
            except (AssertionError, json.JSONDecodeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield net
    finally:
        if net.containers:
            docker("rm", "-f", *net.containers, check=False)
        docker("network", "rm", net.name, check=False)


def http_body(reply: str) -> str:
    head, sep, body = reply.partition("\r\n\r\n")
    assert sep and head.startswith("HTTP/1."), f"not an HTTP answer: {reply!r}"
    return body


def test_the_attacker_connects_as_the_victim_and_the_victim_is_not_cut_off(net: Net) -> None:
    result = net.spoof(PORT, "--payload",
                       f"GET /spoofed HTTP/1.0\\r\\nHost: {net.target_ip}\\r\\n\\r\\n")
    assert result["result"] == "connected", result
    assert json.loads(http_body(result["reply"])) == {"client": net.victim_ip}, result
    assert result["own_ip"] != net.victim_ip, result
    # this container's kernel sent nothing for the spoofed flow (no RST, nothing forwarded)
    assert result["kernel_frames"] == [], result
    assert result["restored"] is True, result

    # The target's cache holds the victim's real MAC again, not the one the tool gave it...
    arp = net.target_arp()
    assert arp.get(net.victim_ip) == result["victim_mac"] != result["mac"], (arp, result)
    # ... and the victim reaches the target as before.
    assert net.victim_get() == {"client": net.victim_ip}


def test_a_port_without_listener_is_refused(net: Net) -> None:
    result = net.spoof(CLOSED_PORT)
    assert result["result"] == "refused", result
    assert result["kernel_frames"] == [], result
    assert net.target_arp().get(net.victim_ip) == result["victim_mac"], result
