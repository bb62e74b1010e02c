"""The pilot's metrics move exactly with what happens: snapshots pushed, ACKs and NACKs,
certificates issued and refused, proxies connected, engine events; the decisions behind them
are pure and tested as such.

The API runs on a real loopback socket; who the caller is comes from
``tests/pilot/callers.Callers`` (the kernel's attestation is tested for real in
test_attest.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from composemesh import __version__
from composemesh.ca import csr_to_pem, generate_key, make_csr
from composemesh.clock import system_clock
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.settings import MeshSettings
from composemesh.model.snapshot import Ack, decode_snapshot
from composemesh.model.wire import encode
from composemesh.pilot.ca_service import CAService
from composemesh.pilot.main import CountedEngineAPI, serve_monitoring
from composemesh.pilot.metrics import (
    CERTIFICATE_OUTCOMES,
    CONNECTED_GRACE_S,
    Convergence,
    PilotMetrics,
    connected_proxies,
    counted,
    mesh_services,
    refusal_outcome,
    running_workloads,
)
from composemesh.pilot.server import Pilot, make_app
from tests.pilot.callers import Callers
from tests.support import free_port

WEB = Workload(
    node="shop-web-netns-1",
    project="shop",
    compose_service="web",
    service="web",
    version="v1",
    addresses=("10.9.0.2",),
    running=True,
    proxy_container="shop-web-proxy-1",
    proxy_container_id="a" * 64,
)
WEB2 = replace(WEB, node="shop-web-v2-netns-1", compose_service="web-v2", version="v2",
               addresses=("10.9.0.3",), proxy_container_id="b" * 64)
DB = replace(WEB, node="shop-db-netns-1", compose_service="db", service="db",
             addresses=("10.9.0.9",), running=False, proxy_container_id="c" * 64)


def value(pilot: Pilot, name: str, **labels: str) -> float | None:
    return pilot.metrics.registry.get_sample_value(name, labels)


def csr(spiffe: str | None = None) -> bytes:
    return csr_to_pem(make_csr(generate_key(), spiffe))


Body = Callable[[Pilot, TestClient], Awaitable[None]]


def run(body: Body, workloads: tuple[Workload, ...] = (WEB,), ca: CAService | None = None) -> Pilot:
    pilot = Pilot(MeshState(project="shop", workloads=workloads), None, ca,
                  attestor=Callers(WEB.node))
    pilot.synced = True

    async def main() -> None:
        async with TestClient(TestServer(make_app(pilot), host="127.0.0.1")) as client:
            await body(pilot, client)

    asyncio.run(main())
    return pilot


# --------------------------------------------------------------------------- pure decisions


def test_connected_means_a_poll_open_or_a_contact_within_the_grace() -> None:
    now = 1000.0
    assert connected_proxies({}, {}, now) == 0
    assert connected_proxies({"a": 1, "b": 0}, {}, now) == 1  # b's poll closed
    assert connected_proxies({"a": 2}, {"a": now - 500}, now) == 1  # one proxy, counted once
    assert connected_proxies({}, {"a": now - CONNECTED_GRACE_S, "b": now - 11.0}, now) == 1
    assert connected_proxies({"c": 1}, {"a": now - 1.0, "b": now - 60.0}, now) == 2


def test_convergence_is_from_the_version_becoming_current_to_its_first_ack() -> None:
    c = Convergence()
    c.current("a", "v1", 10.0)
    assert c.acked("a", "v0", 11.0) is None  # not the version current for it
    c.current("a", "v1", 15.0)  # the same version again: still current since 10
    assert c.acked("a", "v1", 12.5) == 2.5
    assert c.acked("a", "v1", 13.0) is None  # a repeated ACK is not observed twice
    c.current("a", "v2", 20.0)
    assert c.acked("a", "v2", 21.0) == 1.0
    assert c.acked("b", "v2", 21.0) is None  # never current for b
    c.current("b", "v3", 30.0)
    c.forget({"a"})
    assert c.acked("b", "v3", 31.0) is None  # b is gone


def test_services_and_running_workloads_of_a_state() -> None:
    state = MeshState(project="shop", workloads=(WEB, WEB2, DB))
    assert mesh_services(state) == 2  # web (two versions) and db
    assert running_workloads(state) == 2  # db is not running
    assert (mesh_services(MeshState(project="shop")), running_workloads(MeshState("shop"))) == (
        0, 0)


def test_a_refusal_is_bad_csr_unless_the_ca_could_not_sign() -> None:
    assert refusal_outcome("the CSR is malformed: no PEM") == "bad_csr"
    assert refusal_outcome("cannot sign: the issuer has expired") == "error"


# --------------------------------------------------------------------------- the registry


def test_every_series_exists_from_the_start_at_zero_with_the_version() -> None:
    pilot = Pilot(MeshState(project="shop", workloads=(WEB, WEB2, DB)), attestor=Callers())
    assert value(pilot, "pilot_info", version=__version__) == 1.0
    assert value(pilot, "pilot_xds_pushes_total", type="snapshot") == 0.0
    assert value(pilot, "pilot_xds_acks_total", outcome="ack") == 0.0
    assert value(pilot, "pilot_xds_acks_total", outcome="nack") == 0.0
    for outcome in ("issued", "attestation_failed", "bad_csr", "error"):
        assert value(pilot, "citadel_server_certificates_total", outcome=outcome) == 0.0
    assert set(CERTIFICATE_OUTCOMES) == {"issued", "attestation_failed", "bad_csr", "error"}
    assert value(pilot, "pilot_proxy_convergence_time_count") == 0.0
    assert value(pilot, "pilot_docker_events_total") == 0.0
    assert value(pilot, "pilot_xds") == 0.0
    assert value(pilot, "pilot_services") == 2.0
    assert value(pilot, "pilot_workloads") == 2.0


def test_each_pilot_has_its_own_registry_and_the_gauges_follow_its_state() -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        other = Pilot(MeshState(project="shop"), attestor=Callers())
        assert (await client.get("/v1/snapshot")).status == 200
        assert value(pilot, "pilot_xds_pushes_total", type="snapshot") == 1.0
        assert value(other, "pilot_xds_pushes_total", type="snapshot") == 0.0
        assert isinstance(other.metrics, PilotMetrics)
        await pilot.publish(replace(pilot.state, workloads=(WEB, WEB2, DB)))
        assert (value(pilot, "pilot_services"), value(pilot, "pilot_workloads")) == (2.0, 2.0)
        await pilot.publish(replace(pilot.state, workloads=(WEB,)))
        assert (value(pilot, "pilot_services"), value(pilot, "pilot_workloads")) == (1.0, 1.0)

    run(body)


# --------------------------------------------------------------------------- pushes and answers


def test_n_snapshots_delivered_count_n_pushes_and_a_304_none() -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        have = ""
        for n in range(1, 4):
            resp = await client.get("/v1/snapshot", params={"version": have, "wait": "0"})
            assert resp.status == 200
            have = decode_snapshot(await resp.read()).version
            assert value(pilot, "pilot_xds_pushes_total", type="snapshot") == float(n)
            db = replace(DB, node=f"shop-db-netns-{n}", addresses=(f"10.9.1.{n}",))
            await pilot.publish(replace(pilot.state, workloads=(*pilot.state.workloads, db)))
        have = decode_snapshot(await (await client.get("/v1/snapshot")).read()).version
        assert value(pilot, "pilot_xds_pushes_total", type="snapshot") == 4.0
        resp = await client.get("/v1/snapshot", params={"version": have, "wait": "0.1"})
        assert resp.status == 304
        assert value(pilot, "pilot_xds_pushes_total", type="snapshot") == 4.0
        pilot.attestor.stranger()  # refused: nothing delivered
        assert (await client.get("/v1/snapshot", params={"wait": "0"})).status == 503
        assert value(pilot, "pilot_xds_pushes_total", type="snapshot") == 4.0

    run(body)


def test_acks_and_nacks_are_counted_and_an_ack_observes_the_convergence_time() -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        snap = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        before = time.monotonic()
        pilot.published_at = before - 2.0  # the push was 2 s ago
        pilot.convergence = Convergence()  # ... as the pilot saw it first then
        pilot.snapshot_current(WEB, snap.version)
        resp = await client.post("/v1/ack", data=encode(Ack(WEB.node, snap.version, True)))
        assert resp.status == 200
        assert value(pilot, "pilot_xds_acks_total", outcome="ack") == 1.0
        assert value(pilot, "pilot_xds_acks_total", outcome="nack") == 0.0
        assert value(pilot, "pilot_proxy_convergence_time_count") == 1.0
        took = value(pilot, "pilot_proxy_convergence_time_sum")
        assert took is not None and 2.0 <= took < 2.0 + (time.monotonic() - before) + 0.01
        assert value(pilot, "pilot_proxy_convergence_time_bucket", le="1.0") == 0.0
        assert value(pilot, "pilot_proxy_convergence_time_bucket", le="2.5") == 1.0
        # the same ACK again (a proxy resends one whose answer it missed): counted, not timed
        await client.post("/v1/ack", data=encode(Ack(WEB.node, snap.version, True)))
        assert value(pilot, "pilot_xds_acks_total", outcome="ack") == 2.0
        assert value(pilot, "pilot_proxy_convergence_time_count") == 1.0
        resp = await client.post("/v1/ack", data=encode(Ack(WEB.node, "v-bad", False, "no")))
        assert resp.status == 200
        assert value(pilot, "pilot_xds_acks_total", outcome="nack") == 1.0
        assert value(pilot, "pilot_xds_acks_total", outcome="ack") == 2.0
        assert value(pilot, "pilot_proxy_convergence_time_count") == 1.0
        # refused answers count nothing: another node's, a malformed one
        await client.post("/v1/ack", data=encode(Ack("shop-db-netns-1", snap.version, True)))
        await client.post("/v1/ack", data=b"{")
        assert value(pilot, "pilot_xds_acks_total", outcome="ack") == 2.0
        assert value(pilot, "pilot_xds_acks_total", outcome="nack") == 1.0

    run(body)


def test_a_version_pushed_on_a_change_converges_when_its_proxy_acks_it() -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        first = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        await client.post("/v1/ack", data=encode(Ack(WEB.node, first.version, True)))
        assert value(pilot, "pilot_proxy_convergence_time_count") == 1.0
        poll = asyncio.ensure_future(
            client.get("/v1/snapshot", params={"version": first.version, "wait": "10"}))
        await asyncio.sleep(0.1)
        await pilot.publish(replace(pilot.state, workloads=(WEB, WEB2)))
        newer = decode_snapshot(await (await asyncio.wait_for(poll, 5)).read())
        assert newer.version != first.version
        await asyncio.sleep(0.05)
        await client.post("/v1/ack", data=encode(Ack(WEB.node, newer.version, True)))
        assert value(pilot, "pilot_proxy_convergence_time_count") == 2.0
        took = value(pilot, "pilot_proxy_convergence_time_sum")
        assert took is not None and 0.05 <= took < 5.0

    run(body)


def test_a_proxy_is_connected_while_it_polls_and_for_the_grace_after() -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        assert value(pilot, "pilot_xds") == 0.0
        first = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        assert value(pilot, "pilot_xds") == 1.0  # just answered: within the grace
        pilot.last_contact[WEB.node] = time.monotonic() - CONNECTED_GRACE_S - 1
        assert value(pilot, "pilot_xds") == 0.0
        poll = asyncio.ensure_future(
            client.get("/v1/snapshot", params={"version": first.version, "wait": "0.5"}))
        await asyncio.sleep(0.2)
        pilot.last_contact[WEB.node] = time.monotonic() - CONNECTED_GRACE_S - 1
        assert pilot.open_polls == {WEB.node: 1}
        assert value(pilot, "pilot_xds") == 1.0  # the poll is open
        assert (await poll).status == 304
        assert pilot.open_polls == {}
        assert value(pilot, "pilot_xds") == 1.0  # it ended just now
        pilot.last_contact[WEB.node] = time.monotonic() - CONNECTED_GRACE_S - 1
        assert value(pilot, "pilot_xds") == 0.0
        await client.post("/v1/ack", data=encode(Ack(WEB.node, first.version, True)))
        assert value(pilot, "pilot_xds") == 1.0  # an ACK is contact too
        pilot.attestor.stranger()
        await client.get("/v1/snapshot", params={"wait": "0"})
        assert pilot.open_polls == {} and set(pilot.last_contact) == {WEB.node}

    run(body)


def test_an_abandoned_poll_is_closed() -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        first = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        poll = asyncio.ensure_future(
            client.get("/v1/snapshot", params={"version": first.version, "wait": "30"}))
        await asyncio.sleep(0.2)
        assert pilot.open_polls == {WEB.node: 1}
        poll.cancel()  # the proxy went away mid-poll
        await asyncio.gather(poll, return_exceptions=True)
        for _ in range(100):
            if not pilot.open_polls:
                break
            await asyncio.sleep(0.02)
        assert pilot.open_polls == {}

    run(body)


# --------------------------------------------------------------------------- certificates


def test_certificates_issued_and_refused_are_counted_by_outcome(tmp_path: Path) -> None:
    ca = CAService.load_or_create(MeshSettings(), "shop", tmp_path, {})

    def counts(pilot: Pilot) -> dict[str, float | None]:
        return {o: value(pilot, "citadel_server_certificates_total", outcome=o)
                for o in CERTIFICATE_OUTCOMES}

    async def body(pilot: Pilot, client: TestClient) -> None:
        assert (await client.post("/v1/certificate", data=csr())).status == 200
        assert counts(pilot) == {"issued": 1.0, "attestation_failed": 0.0, "bad_csr": 0.0,
                                 "error": 0.0}
        other = csr("spiffe://cluster.local/ns/shop/sa/db")  # not the caller's identity
        assert (await client.post("/v1/certificate", data=other)).status == 403
        assert counts(pilot) == {"issued": 1.0, "attestation_failed": 0.0, "bad_csr": 1.0,
                                 "error": 0.0}
        assert (await client.post("/v1/certificate", data=b"x" * 20000)).status == 403
        assert counts(pilot)["bad_csr"] == 2.0
        pilot.attestor.stranger()
        assert (await client.post("/v1/certificate", data=csr())).status == 503
        assert counts(pilot)["attestation_failed"] == 1.0
        pilot.attestor.host()
        assert (await client.post("/v1/certificate", data=csr())).status == 403
        assert counts(pilot) == {"issued": 1.0, "attestation_failed": 2.0, "bad_csr": 2.0,
                                 "error": 0.0}

    run(body, ca=ca)


def test_a_ca_that_cannot_sign_counts_an_error(tmp_path: Path) -> None:
    """A root past its expiry (the CA's clock moved on): the CA refuses with "cannot sign"."""
    later = [system_clock()]
    ca = CAService.load_or_create(MeshSettings(), "shop", tmp_path, {}, clock=lambda: later[0])
    later[0] = ca.root_cert.not_valid_after_utc + timedelta(days=1)

    async def body(pilot: Pilot, client: TestClient) -> None:
        resp = await client.post("/v1/certificate", data=csr())
        assert resp.status == 403 and "cannot sign" in (await resp.json())["error"]
        assert value(pilot, "citadel_server_certificates_total", outcome="error") == 1.0
        assert value(pilot, "citadel_server_certificates_total", outcome="bad_csr") == 0.0
        assert value(pilot, "citadel_server_certificates_total", outcome="issued") == 0.0

    run(body, ca=ca)


# --------------------------------------------------------------------------- engine events


def test_counted_passes_every_item_through_and_counts_it() -> None:
    seen: list[int] = []

    async def items() -> AsyncIterator[int]:
        for i in range(3):
            yield i

    async def main() -> list[int]:
        return [i async for i in counted(items(), lambda: seen.append(1))]

    assert asyncio.run(main()) == [0, 1, 2]
    assert len(seen) == 3


def test_the_engine_api_counts_each_event_its_stream_delivers(tmp_path: Path) -> None:
    """The engine is a stand-in here (an aiohttp server on a Unix socket streaming three
    events, as ``GET /events`` does); the client is the pilot's real EngineAPI."""
    events = [{"Action": "start", "id": "1"}, {"Action": "die", "id": "2"},
              {"Action": "health_status: healthy", "id": "3"}]

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for event in events:
            await resp.write(json.dumps(event).encode() + b"\n")
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/events", stream)
        runner = web.AppRunner(app)
        await runner.setup()
        path = str(tmp_path / "docker.sock")
        await web.UnixSite(runner, path).start()
        metrics = PilotMetrics()
        api = CountedEngineAPI(metrics, path)
        try:
            got = [e async for e in api.events(project="shop")]
        finally:
            await api.close()
            await runner.cleanup()
        assert got == events
        assert metrics.registry.get_sample_value("pilot_docker_events_total") == 3.0

    asyncio.run(main())


# --------------------------------------------------------------------------- the listener's start


def test_a_monitoring_port_taken_is_logged_and_the_pilot_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pilot = Pilot(MeshState(project="shop", workloads=(WEB,)), attestor=Callers(WEB.node))
    port = free_port()

    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", port))
            taken.listen()
            assert await serve_monitoring(pilot, None, port) is None
        runner = await serve_monitoring(pilot, None, port)  # free again: it listens
        assert runner is not None
        try:
            async with aiohttp.ClientSession() as http, \
                    http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                assert "pilot_info{" in await resp.text()
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert f"monitoring listener not started: cannot listen on port {port}" in caplog.text
