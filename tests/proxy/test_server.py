"""The whole proxy process: wiring, readiness, snapshot-driven labels, and a clean, quick stop."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from composemesh.healthcheck import probe
from composemesh.inject.templates import PILOT_URL
from composemesh.model import wellknown as wk
from composemesh.proxy.admin import AdminContext
from composemesh.proxy.server import ProxyConfig, ProxyError, serve
from tests.support import free_port

from .conftest import PYTHON, Processes, run_on
from .pilot_double import PilotDouble, snapshot_body


def config_on_free_ports(pilot_port: int, resolver: Callable[[object], tuple[str, int]]
                         ) -> ProxyConfig:
    return ProxyConfig(
        pilot_url=f"http://127.0.0.1:{pilot_port}", service="web", version="v1",
        compose_service="claimed-web", capture_host="127.0.0.1",
        outbound_port=free_port(), inbound_port=free_port(), admin_port=free_port(),
        health_host="127.0.0.1", health_port=free_port(),
        prometheus_host="127.0.0.1", prometheus_port=free_port(), resolver=resolver,
    )


def fetch(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_serve_becomes_ready_labels_by_the_snapshot_and_stops_cleanly(loop_kind: str) -> None:
    async def main() -> None:
        app = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = app.sockets[0].getsockname()[:2]
        pilot = PilotDouble(hold=0.2)
        pilot_port = await pilot.start()
        config = config_on_free_ports(pilot_port, lambda sock: target)
        stop = asyncio.Event()
        contexts: list[AdminContext] = []
        serving = asyncio.create_task(serve(config, stop, contexts))

        async def ready() -> bool:
            return (await asyncio.to_thread(probe, config.health_port))[0]

        for _ in range(100):
            if contexts and all(contexts[0].listeners.values()):
                break
            await asyncio.sleep(0.02)
        assert not await ready()  # listening, but no snapshot yet

        pilot.publish("v1", snapshot_body("v1", compose_service="web-v1"))
        for _ in range(200):
            if await ready():
                break
            await asyncio.sleep(0.02)
        assert await ready()
        assert pilot.answers[-1].ok and pilot.answers[-1].version == "v1"

        reader, writer = await asyncio.open_connection("127.0.0.1", config.outbound_port)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()

        metrics = await asyncio.to_thread(fetch, config.prometheus_port, "/stats/prometheus")
        opened = [line for line in metrics.splitlines()
                  if line.startswith("istio_tcp_connections_opened_total{")]
        assert len(opened) == 1
        assert 'source_workload="web-v1"' in opened[0]  # attested, not "claimed-web"
        assert 'reporter="source"' in opened[0]
        dump = json.loads(await asyncio.to_thread(fetch, config.admin_port, "/config_dump"))
        assert (dump["version"], dump["ack_state"]) == ("v1", "ACK")

        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(serving, 5)
        assert time.monotonic() - started < 2.5
        for port in (config.outbound_port, config.inbound_port, config.admin_port,
                     config.health_port, config.prometheus_port):
            with socket.socket() as sock:  # every port is free again
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
        await pilot.stop()
        app.close()

    run_on(loop_kind, main())


def test_a_taken_port_is_one_clear_error() -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            config = config_on_free_ports(free_port(), lambda sock: ("127.0.0.1", 1))
            config = ProxyConfig(**{**config.__dict__,
                                    "inbound_port": taken.getsockname()[1]})
            with pytest.raises(ProxyError, match=r"cannot listen on 127\.0\.0\.1:\d+"):
                await serve(config, asyncio.Event())

    asyncio.run(main())


def test_config_from_env() -> None:
    config = ProxyConfig.from_env({"COMPOSEMESH_PILOT_URL": "unix:///srv/mesh/pilot.sock",
                                   "COMPOSEMESH_SERVICE": "reviews",
                                   "COMPOSEMESH_VERSION": "v2",
                                   "COMPOSEMESH_COMPOSE_SERVICE": "reviews-v2"})
    assert (config.pilot_url, config.service, config.version, config.compose_service) == (
        "unix:///srv/mesh/pilot.sock", "reviews", "v2", "reviews-v2")
    # by default the pilot's socket in the socket volume, as the injector writes it
    assert ProxyConfig.from_env({}).pilot_url == "unix:///run/composemesh/pilot.sock"
    assert ProxyConfig.from_env({}).pilot_url == f"unix://{wk.PILOT_SOCKET}" == PILOT_URL
    assert ProxyConfig.from_env({"COMPOSEMESH_PILOT_URL": ""}).pilot_url == PILOT_URL
    assert ProxyConfig.from_env({}).version == "v1"
    # no second (TLS) way to the pilot any more
    assert not hasattr(config, "pilot_tls_url")
    assert ProxyConfig.from_env({"COMPOSEMESH_PILOT_TLS_URL": "https://x:15012"}) == \
        ProxyConfig.from_env({})


def test_run_proxy_exits_0_quickly_on_sigterm(
        netns: Callable[[], str], processes: Processes, tmp_path: Path) -> None:
    ns = netns()  # the well-known ports, free in a namespace of our own
    proxy = processes.start(  # its pilot's socket is not there: it starts and stops all the same
        ["ip", "netns", "exec", ns, PYTHON, "-c",
         "import sys; from composemesh.proxy.server import run_proxy; sys.exit(run_proxy())"],
        env={"COMPOSEMESH_PILOT_URL": f"unix://{tmp_path}/pilot.sock"})
    assert proxy.stderr is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proxy.stderr.readline()
        if "proxy listening" in line or not line:
            break
    assert "proxy listening" in line
    proxy.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert proxy.wait(timeout=5) == 0
    assert time.monotonic() - started < 2.0
