"""`composemesh route` at the pilot: validated, persisted, pushed; from the host only.

Who calls is said by ``tests/pilot/callers.Callers`` (attestation itself: test_attest.py)."""

import asyncio
import json
from dataclasses import replace

from aiohttp.test_utils import TestClient, TestServer

from composemesh.model.mesh import MeshState, Workload
from composemesh.model.snapshot import decode_snapshot
from composemesh.pilot.build import default_split
from composemesh.pilot.server import Pilot, make_app
from composemesh.pilot.store import OverrideStore
from tests.pilot.callers import Callers

V1 = Workload(
    node="p-r1-netns-1",
    project="p",
    compose_service="r1",
    service="reviews",
    version="v1",
    addresses=("10.1.0.1",),
    running=True,
    weight=80,
)
V2 = replace(
    V1, node="p-r2-netns-1", compose_service="r2", version="v2", addresses=("10.1.0.2",), weight=20
)


def run(tmp_path, body, workloads=(V1, V2), callers=None):
    async def main():
        pilot = Pilot(MeshState(project="p"), OverrideStore(tmp_path),
                      attestor=callers or Callers().host())
        await pilot.update_workloads(workloads)
        async with TestClient(TestServer(make_app(pilot), host="127.0.0.1")) as client:
            await body(pilot, client)

    asyncio.run(main())


def test_route_change_is_validated_persisted_and_published(tmp_path):
    async def body(pilot, client):
        generation = pilot.generation
        resp = await client.put("/v1/routes/reviews", json={"weights": {"v1": 0, "v2": 100}})
        assert resp.status == 200, await resp.text()
        result = await resp.json()
        assert result["old"] == {"v1": 80, "v2": 20}
        assert result["new"] == {"v1": 0, "v2": 100}
        assert result["generation"] > generation
        assert json.loads((tmp_path / "routes.json").read_text()) == {
            "reviews": {"v1": 0, "v2": 100}
        }
        status = await (await client.get("/v1/status")).json()
        assert status["services"]["reviews"]["split"] == {"v1": 0, "v2": 100}
        assert status["services"]["reviews"]["overridden"]

    run(tmp_path, body)


def test_a_restarted_pilot_remembers_the_split(tmp_path):
    OverrideStore(tmp_path).save({"reviews": {"v1": 10, "v2": 90}})

    async def body(pilot, client):
        assert default_split(pilot.state.routing["reviews"]) == {"v1": 10, "v2": 90}

    run(tmp_path, body)


def test_bad_route_changes_are_refused_and_change_nothing(tmp_path):
    async def body(pilot, client):
        for service, weights in [
            ("reviews", {"v9": 100}),
            ("reviews", {"v1": -1}),
            ("reviews", {"v1": 0, "v2": 0}),
            ("reviews", {"v1": "abc"}),
            ("nosuch", {"v1": 100}),
        ]:
            resp = await client.put(f"/v1/routes/{service}", json={"weights": weights})
            assert resp.status == 400, (service, weights)
            assert "error" in await resp.json()
        assert not (tmp_path / "routes.json").exists()
        assert default_split(pilot.state.routing["reviews"]) == {"v1": 80, "v2": 20}

    run(tmp_path, body)


def test_proxies_and_strangers_may_not_change_routes(tmp_path):
    async def body(pilot, client):
        for who in (pilot.attestor.proxy(V1.node), pilot.attestor.stranger()):
            resp = await client.put("/v1/routes/reviews", json={"weights": {"v1": 0, "v2": 100}})
            assert resp.status in (403, 503), who.role
            assert (await client.get("/v1/status")).status in (403, 503)
        assert default_split(pilot.state.routing["reviews"]) == {"v1": 80, "v2": 20}
        assert not (tmp_path / "routes.json").exists()
        pilot.attestor.pilot()  # `docker exec` into the pilot's own container: the host's user
        resp = await client.put("/v1/routes/reviews", json={"weights": {"v1": 0, "v2": 100}})
        assert resp.status == 200

    run(tmp_path, body)


def test_snapshot_carries_routing_and_reachable_endpoints(tmp_path):
    me = replace(V1, addresses=("10.1.0.1",), networks=(("front", "10.1.0.1"),))
    other = replace(
        V2,
        addresses=("10.9.9.9", "10.1.0.2"),
        networks=(("back", "10.9.9.9"), ("front", "10.1.0.2")),
    )

    async def body(pilot, client):
        snap = decode_snapshot(await (await client.get("/v1/snapshot")).read())
        endpoints = {e.node: e.address for e in snap.settings.services["reviews"]}
        assert endpoints[other.node] == "10.1.0.2"  # the one on a network both are on
        routing = snap.settings.routing["reviews"]
        assert default_split(routing) == {"v1": 80, "v2": 20}

    run(tmp_path, body, workloads=(me, other), callers=Callers(me.node))


