"""The pilot's HTTP API on a real loopback socket: long-poll push, ACK/NACK, who may ask what.

Who the caller is comes from ``tests/pilot/callers.Callers`` (the kernel's attestation is
tested for real in test_attest.py)."""

import asyncio
import json
from dataclasses import replace

from aiohttp.test_utils import TestClient, TestServer

from composemesh.model.mesh import MeshState, Workload
from composemesh.model.snapshot import Ack, decode_snapshot
from composemesh.model.wire import encode
from composemesh.pilot.server import Pilot, make_app
from tests.pilot.callers import Callers

ME = Workload(
    node="p-web-netns-1",
    project="p",
    compose_service="web",
    service="web",
    version="v1",
    addresses=("127.0.0.1",),
    running=True,
)


def run(coro_fn):
    async def main():
        pilot = Pilot(MeshState(project="p", workloads=(ME,)), attestor=Callers(ME.node))
        pilot.synced = True
        async with TestClient(TestServer(make_app(pilot), host="127.0.0.1")) as client:
            await coro_fn(pilot, client)

    asyncio.run(main())


def test_first_poll_returns_snapshot_then_long_poll_times_out_with_304():
    async def body(pilot, client):
        resp = await client.get("/v1/snapshot")
        assert resp.status == 200
        snap = decode_snapshot(await resp.read())
        assert snap.identity.node == ME.node
        resp = await client.get("/v1/snapshot", params={"version": snap.version, "wait": "0.3"})
        assert resp.status == 304

    run(body)


def test_change_wakes_a_waiting_poll():
    async def body(pilot, client):
        first = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        poll = asyncio.ensure_future(
            client.get("/v1/snapshot", params={"version": first.version, "wait": "10"})
        )
        await asyncio.sleep(0.2)
        assert not poll.done()
        other = replace(ME, node="p-db-netns-1", service="db", addresses=("10.9.0.9",))
        await pilot.publish(replace(pilot.state, workloads=(ME, other)))
        resp = await asyncio.wait_for(poll, 2)
        assert resp.status == 200
        newer = decode_snapshot(await resp.read())
        assert newer.version != first.version and "db" in newer.settings.services

    run(body)


def test_ack_and_nack_show_in_status():
    async def body(pilot, client):
        snap = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        resp = await client.post("/v1/ack", data=encode(Ack(ME.node, snap.version, True)))
        assert resp.status == 200
        assert (await client.get("/v1/status")).status == 403  # status is the host's
        pilot.attestor.host()
        row = (await (await client.get("/v1/status")).json())["proxies"][0]
        assert row["in_sync"] and row["acked_version"] == snap.version
        pilot.attestor.proxy(ME.node)
        await client.post("/v1/ack", data=encode(Ack(ME.node, "v-bad", False, "no good")))
        pilot.attestor.host()
        row = (await (await client.get("/v1/status")).json())["proxies"][0]
        assert not row["in_sync"] and row["nack_reason"] == "no good"

    run(body)


def test_a_container_that_is_no_proxy_gets_nothing_and_the_host_no_snapshot():
    async def body(pilot, client):
        pilot.attestor.stranger()
        resp = await client.get("/v1/snapshot", params={"wait": "0.2"})
        assert resp.status == 503 and "no proxy" in (await resp.json())["error"]
        ack = encode(Ack(ME.node, "x", True))
        assert (await client.post("/v1/ack", data=ack)).status == 503
        assert pilot.acks == {}
        pilot.attestor.host()  # the host steers the mesh; it is no proxy
        assert (await client.get("/v1/snapshot")).status == 403
        assert (await client.post("/v1/ack", data=ack)).status == 403
        assert pilot.acks == {}

    run(body)


def test_bad_parameters_are_400_not_500():
    async def body(pilot, client):
        for wait in ("abc", "-1", "1e9", "nan"):
            resp = await client.get("/v1/snapshot", params={"wait": wait})
            assert resp.status == 400, wait
        assert (await client.post("/v1/ack", data=b"{not json")).status == 400

    run(body)


def test_status_shows_the_certificate_the_proxy_says_it_holds():
    async def body(pilot, client):
        held = {"cert_serial": "abc123", "cert_not_after": "2026-12-03T00:00:00+00:00"}
        resp = await client.get("/v1/snapshot", params=held)
        assert resp.status == 200
        assert pilot.held[ME.node].serial == "abc123"

    run(body)


def test_ack_for_another_node_is_refused():
    async def body(pilot, client):
        resp = await client.post("/v1/ack", data=encode(Ack("someone-else", "x", True)))
        assert resp.status == 403
        assert "does not match" in json.dumps(await resp.json())

    run(body)
