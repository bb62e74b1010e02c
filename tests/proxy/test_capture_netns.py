"""Real capture: iptables in a namespace of our own sends an app's TCP through its proxy.

Two namespaces joined by a veth pair (10.233.0.1 in A, 10.233.0.2 in B; nothing leaves the
machine). A holds what a meshed service's namespace holds: the `composemesh netns` holder's
rules, the proxy running as uid 1337, an app server, and a client. The pilot is the test double
of pilot_double.py (the real one needs the Docker engine), on a Unix socket as the pilot's API
is: the proxy's way to it is no TCP connection, so capture has nothing to leave out for it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import PYTHON, Processes, sh, wait_for_text

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "netns_tools.py")
A_ADDR, B_ADDR = "10.233.0.1", "10.233.0.2"


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def tool(ns: str, *args: str) -> str:
    return sh(*in_ns(ns, PYTHON, TOOLS, *args)).stdout


def admin(ns: str, path: str) -> str:
    status, _, body = tool(ns, "get", f"http://127.0.0.1:15000{path}").partition("\n")
    assert status == "200", body
    return body


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A directory the proxy's uid can reach (tmp_path is root's alone), as the socket volume
    is to the proxies."""
    path = tempfile.mkdtemp(prefix="cm-pilot-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_app_traffic_is_captured_both_ways_and_counted(
    netns: Callable[[], str], processes: Processes, tmp_path: Path, socket_dir: str,
) -> None:
    a, b = netns(), netns()
    sh("ip", "link", "add", "cmveth-a", "netns", a, "type", "veth",
       "peer", "name", "cmveth-b", "netns", b)
    for ns, dev, addr in ((a, "cmveth-a", A_ADDR), (b, "cmveth-b", B_ADDR)):
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")

    def start(name: str, ns: str, argv: list[str], ready: str,
              env: dict[str, str] | None = None) -> None:
        log = str(tmp_path / f"{name}.log")
        proc = processes.start(in_ns(ns, *argv), env=env, log=log)
        wait_for_text(log, ready, proc)

    start("remote", b, [PYTHON, TOOLS, "serve", B_ADDR, "7000"], "serving")
    start("app", a, [PYTHON, TOOLS, "serve", "0.0.0.0", "8080"], "serving")
    start("app-local", a, [PYTHON, TOOLS, "serve", "127.0.0.1", "8081"], "serving")
    start("holder", a, [PYTHON, "-c", "import sys; from composemesh.proxy.netns import "
                        "run_netns_holder; sys.exit(run_netns_holder())"], "rules applied")
    sock = os.path.join(socket_dir, "pilot.sock")
    start("pilot", a, [PYTHON, os.path.join(HERE, "pilot_double.py"), f"unix:{sock}",
                       "shop-web-netns-1", "web"], "pilot double ready")
    start("proxy", a, ["setpriv", "--reuid", "1337", "--regid", "1337", "--clear-groups",
                       PYTHON, "-c", "import sys; from composemesh.proxy.server import "
                       "run_proxy; sys.exit(run_proxy())"], "ACK snapshot v1",
          env={"COMPOSEMESH_PILOT_URL": f"unix://{sock}",
               "COMPOSEMESH_SERVICE": "web", "COMPOSEMESH_COMPOSE_SERVICE": "web-v1"})
    ready = sh(*in_ns(a, PYTHON, "-m", "composemesh.healthcheck", "15021"), check=False)
    assert ready.returncode == 0, ready.stdout

    # Outbound: the app's client in A dials B; A's proxy carries it.
    assert tool(a, "call", B_ADDR, "7000", "hello B") == f"peer {A_ADDR}\nhello B"
    stats = json.loads(admin(a, "/stats"))
    assert stats["outbound"]["connections_opened"] == 1
    assert stats["outbound"]["bytes_received"] == len("hello B")
    assert stats["outbound"]["bytes_sent"] == len(f"peer {A_ADDR}\nhello B")

    # Inbound: B dials A's app; A's proxy takes it on 15006 and hands it to the app, which
    # therefore sees the proxy's connection (from A's own address), not B's.
    assert tool(b, "call", A_ADDR, "8080", "hello A") == f"peer {A_ADDR}\nhello A"
    stats = json.loads(admin(a, "/stats"))
    assert stats["inbound"]["connections_opened"] == 1
    assert stats["inbound"]["bytes_received"] == len("hello A")

    # Not captured: the proxy's own health port from outside, and loopback inside A.
    status, _, _ = tool(b, "get", f"http://{A_ADDR}:15021/healthz/ready").partition("\n")
    assert status == "200"
    assert tool(a, "call", "127.0.0.1", "8081", "local") == "peer 127.0.0.1\nlocal"
    time.sleep(0.2)
    stats = json.loads(admin(a, "/stats"))
    assert stats["inbound"]["connections_opened"] == 1
    assert stats["outbound"]["connections_opened"] == 1
    assert stats["outbound"]["connections_closed"] == 1
    assert stats["outbound"]["errors"] == stats["inbound"]["errors"] == 0

    metrics = tool(a, "get", "http://127.0.0.1:15090/stats/prometheus")
    sent = [line for line in metrics.splitlines()
            if line.startswith("istio_tcp_received_bytes_total{")]
    source = next(line for line in sent if 'reporter="source"' in line)
    destination = next(line for line in sent if 'reporter="destination"' in line)
    assert 'source_workload="web-v1"' in source
    assert float(source.rsplit(" ", 1)[1]) == len("hello B")
    assert 'destination_workload="web-v1"' in destination
    assert 'destination_service="web"' in destination

    dump = json.loads(admin(a, "/config_dump"))
    assert (dump["version"], dump["ack_state"]) == ("v1", "ACK")

    # Captured now: the admin port from outside (it listens on loopback; the capture, which
    # no longer leaves 15000 out, hands the connection to the proxy, which will not forward a
    # connection to its own port): B gets nothing of the admin, and it is counted.
    outside = sh(*in_ns(b, PYTHON, TOOLS, "get", f"http://{A_ADDR}:15000/config_dump"),
                 check=False)
    assert outside.returncode != 0 and not outside.stdout.startswith("200"), outside.stdout
    stats = json.loads(admin(a, "/stats"))
    assert stats["inbound"]["errors"] == 1
    assert stats["outbound"]["errors"] == 0
