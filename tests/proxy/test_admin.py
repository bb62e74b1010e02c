"""The proxy's HTTP faces: readiness, stats, config dump, Prometheus, and the readiness probe."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from composemesh import healthcheck
from composemesh.healthcheck import probe
from composemesh.proxy.admin import (
    PROMETHEUS_CONTENT_TYPE,
    AdminContext,
    build_admin_app,
    build_health_app,
    build_prometheus_app,
)
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.stats import INBOUND, OUTBOUND, PeerLabels, ProxyStats, passthrough_labels
from tests.support import free_port

from .pilot_double import snapshot_body


def context() -> AdminContext:
    return AdminContext(stats=ProxyStats(), store=ConfigStore(),
                        listeners={OUTBOUND: False, INBOUND: False})


def test_ready_needs_both_listeners_and_a_snapshot() -> None:
    ctx = context()
    assert ctx.readiness() == (False, "capture listeners are not bound yet")
    ctx.listeners[OUTBOUND] = True
    assert not ctx.readiness()[0]
    ctx.listeners[INBOUND] = True
    assert ctx.readiness() == (False, "no snapshot applied from the pilot yet")
    ctx.store.offer(snapshot_body("v1"))
    assert ctx.readiness() == (True, "LIVE")
    assert not AdminContext(stats=ProxyStats(), store=ctx.store).readiness()[0]


async def get(app: web.Application, path: str,
              headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    async with TestClient(TestServer(app)) as client:
        response = await client.get(path, headers=headers)
        return response.status, response.headers["Content-Type"], await response.text()


def test_admin_endpoints() -> None:
    async def main() -> None:
        ctx = context()
        app = build_admin_app(ctx)
        assert (await get(app, "/ready"))[0] == 503
        status, _, body = await get(build_health_app(ctx), "/healthz/ready")
        assert (status, body) == (503, "not ready: capture listeners are not bound yet\n")

        ctx.listeners.update({OUTBOUND: True, INBOUND: True})
        ctx.store.offer(snapshot_body("v7"))
        ctx.stats.tcp(passthrough_labels(OUTBOUND, PeerLabels())).opened = 2
        assert await get(build_admin_app(ctx), "/ready") == (
            200, "text/plain; charset=utf-8", "LIVE\n")
        assert (await get(build_health_app(ctx), "/healthz/ready"))[0] == 200

        _, _, stats = await get(build_admin_app(ctx), "/stats")
        assert json.loads(stats)[OUTBOUND]["connections_opened"] == 2
        assert {"http", "http_inbound"} <= set(json.loads(stats))  # both HTTP directions

        _, _, dump_text = await get(build_admin_app(ctx), "/config_dump")
        dump = json.loads(dump_text)
        assert dump["version"] == "v7"
        assert dump["ack_state"] == "ACK"
        assert dump["snapshot"]["identity"]["node"] == "shop-web-netns-1"
        assert dump["last_answer"] == {"node": "shop-web-netns-1", "version": "v7",
                                       "ok": True, "reason": ""}

        _, _, info = await get(build_admin_app(ctx), "/server_info")
        assert json.loads(info)["state"] == "LIVE"

        status, content_type, text = await get(build_prometheus_app(ctx), "/stats/prometheus")
        assert status == 200
        assert content_type == PROMETHEUS_CONTENT_TYPE
        assert "istio_tcp_connections_opened_total{" in text

    asyncio.run(main())


# What Prometheus sends by default: OpenMetrics first, the 0.0.4 text as a fallback.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,"
                     "application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.mark.parametrize("build", [build_admin_app, build_prometheus_app])  # 15000 and 15090
def test_the_metrics_endpoint_speaks_the_format_the_scraper_accepts(build: Any) -> None:
    async def main() -> None:
        ctx = context()
        ctx.stats.tcp(passthrough_labels(OUTBOUND, PeerLabels())).opened = 2
        ctx.stats.http_request(PeerLabels(app="web"), "reviews", "v1", "reviews-v1", None, 200,
                               "-", 1.5, 10, 20, principal="spiffe://cluster.local/ns/s/sa/r")
        app = build(ctx)
        for accept in (None, "text/plain;version=0.0.4", "*/*"):
            status, content_type, text = await get(
                app, "/stats/prometheus", {"Accept": accept} if accept else None)
            assert (status, content_type) == (200, PROMETHEUS_CONTENT_TYPE)
            assert not text.endswith("# EOF\n")
            families = {f.name: f for f in text_string_to_metric_families(text)}
            assert families["istio_tcp_connections_opened"].samples[0].value == 2
        status, content_type, text = await get(app, "/stats/prometheus",
                                               {"Accept": PROMETHEUS_ACCEPT})
        assert status == 200
        assert content_type.startswith("application/openmetrics-text; version=1.0.0;")
        assert text.endswith("# EOF\n")
        families = {f.name: f for f in openmetrics_families(text)}
        requests = families["istio_requests"].samples[0]
        assert (requests.name, requests.value) == ("istio_requests_total", 1)
        assert requests.labels["destination_principal"] == "spiffe://cluster.local/ns/s/sa/r"

    asyncio.run(main())


def test_a_nack_shows_in_the_config_dump_beside_the_snapshot_kept() -> None:
    ctx = context()
    ctx.store.offer(snapshot_body("v1"))
    ctx.store.offer(b'{"version": "v2", "schema": 9}')
    dump = ctx.config_dump()
    assert dump["version"] == "v1"
    assert dump["ack_state"] == "NACK"
    assert dump["last_answer"]["version"] == "v2"
    assert "schema" in dump["last_answer"]["reason"]


def test_the_probe_follows_the_health_endpoint() -> None:
    async def main() -> None:
        ctx = context()
        port = free_port()
        runner = web.AppRunner(build_health_app(ctx), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            assert (await asyncio.to_thread(probe, port))[0] is False
            # what the healthcheck prints (Docker keeps it; `up` shows it): the proxy's reason
            assert await asyncio.to_thread(probe, port) == (
                False, "not ready: capture listeners are not bound yet")
            ctx.listeners.update({OUTBOUND: True, INBOUND: True})
            ctx.store.offer(snapshot_body("v1"))
            assert (await asyncio.to_thread(probe, port))[0] is True
        finally:
            await runner.cleanup()
        assert (await asyncio.to_thread(probe, port))[0] is False  # nobody listening
        ready, reason = await asyncio.to_thread(probe, port)
        assert not ready and reason.startswith(f"the health port {port} did not answer")

    asyncio.run(main())


def test_the_healthcheck_command_says_why_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """``python3 -m composemesh.healthcheck PORT`` as Docker runs it: 0/1 and one line."""
    with socket.socket() as server:  # something that answers, but not HTTP
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(10)  # the thread ends even if the probe never connects
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        assert healthcheck.main([str(port)]) == 1
        thread.join()
    assert "answered no HTTP: 'SSH-2.0-OpenSSH'" in capsys.readouterr().out
    assert healthcheck.main([str(port)]) == 1  # now nobody listens
    assert f"the health port {port} did not answer" in capsys.readouterr().out
    assert healthcheck.main([]) == 2 and "usage" in capsys.readouterr().err
