"""The pilot's HTTP API on a real loopback socket: long-poll push, ACK/NACK, attestation."""

import asyncio
import json
from dataclasses import replace

from aiohttp.test_utils import TestClient, TestServer

from composemesh.model.mesh import MeshState, Workload
from composemesh.model.snapshot import Ack, decode_snapshot, encode_ack
from composemesh.pilot.server import Pilot, make_app

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
        pilot = Pilot(MeshState(project="p", workloads=(ME,)))
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
        assert newer.version != first.version and "db" in newer.settings["services"]

    run(body)


def test_ack_and_nack_show_in_status():
    async def body(pilot, client):
        snap = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        resp = await client.post("/v1/ack", data=encode_ack(Ack(ME.node, snap.version, True)))
        assert resp.status == 200
        row = (await (await client.get("/v1/status")).json())["proxies"][0]
        assert row["in_sync"] and row["acked_version"] == snap.version
        await client.post("/v1/ack", data=encode_ack(Ack(ME.node, "v-bad", False, "no good")))
        row = (await (await client.get("/v1/status")).json())["proxies"][0]
        assert not row["in_sync"] and row["nack_reason"] == "no good"

    run(body)


def test_unknown_caller_is_refused_and_node_claims_are_checked():
    async def body(pilot, client):
        await pilot.publish(replace(pilot.state, workloads=(replace(ME, addresses=("10.1.1.1",)),)))
        assert (await client.get("/v1/snapshot")).status == 403
        assert (
            await client.post("/v1/ack", data=encode_ack(Ack(ME.node, "x", True)))
        ).status == 403

    run(body)


def test_ack_for_another_node_is_refused():
    async def body(pilot, client):
        resp = await client.post("/v1/ack", data=encode_ack(Ack("someone-else", "x", True)))
        assert resp.status == 403
        assert "does not match" in json.dumps(await resp.json())

    run(body)
