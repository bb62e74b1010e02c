"""One push, rendered once: polls and ``status`` of one generation share each proxy's snapshot."""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiohttp.test_utils import TestClient, TestServer

from composemesh.model.mesh import MeshState, Workload
from composemesh.model.snapshot import decode_snapshot
from composemesh.pilot.push_context import PushContext
from composemesh.pilot.render import render_snapshot
from composemesh.pilot.server import Pilot, make_app
from tests.pilot.callers import Callers


def workload(node: str, service: str, networks: tuple[tuple[str, str], ...]) -> Workload:
    return Workload(node=node, project="p", compose_service=service, service=service,
                    version="v1", addresses=tuple(a for _, a in networks), running=True,
                    networks=networks)


WEB = workload("p-web-netns-1", "web", (("front", "10.1.0.2"),))
API = workload("p-api-netns-1", "api", (("front", "10.1.0.3"), ("back", "10.2.0.3")))
DB = workload("p-db-netns-1", "db", (("back", "10.2.0.4"),))
STATE = MeshState(project="p", workloads=(WEB, API, DB))


def test_the_index_renders_what_render_snapshot_renders() -> None:
    push = PushContext.build(STATE, "PEM", "SHA256:ab")
    for w in STATE.workloads:
        assert push.snapshot(w) == render_snapshot(STATE, w, "PEM", "SHA256:ab")
        assert decode_snapshot(push.body(w)) == push.snapshot(w)
    assert push.snapshot(WEB).settings.services["db"][0].address == "10.2.0.4"  # its first
    assert push.snapshot(API).settings.services["db"][0].address == "10.2.0.4"
    assert push.renders == 3


def run(coro_fn: Callable[[Pilot, TestClient], Awaitable[None]]) -> None:
    async def main() -> None:
        pilot = Pilot(STATE, attestor=Callers(WEB.node))
        pilot.synced = True
        async with TestClient(TestServer(make_app(pilot), host="127.0.0.1")) as client:
            await coro_fn(pilot, client)

    asyncio.run(main())


def test_a_second_poll_of_the_same_generation_does_not_render_again() -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        first = await (await client.get("/v1/snapshot?wait=0")).read()
        again = await (await client.get("/v1/snapshot?wait=0")).read()
        assert first == again
        assert pilot.push_context().renders == 1
        await pilot.publish(replace(STATE, workloads=(WEB, API)))  # a new generation
        newer = await (await client.get("/v1/snapshot?wait=0")).read()
        assert decode_snapshot(newer).version != decode_snapshot(first).version
        assert pilot.push_context().renders == 1  # of the new push

    run(body)


def test_status_renders_each_proxy_at_most_once_per_generation() -> None:
    async def body(pilot: Pilot, client: TestClient) -> None:
        await client.get("/v1/snapshot?wait=0")
        for _ in range(3):
            pilot.status()
        push = pilot.push_context()
        assert push.renders == len(STATE.workloads)
        versions = {row["node"]: row["snapshot_version"] for row in pilot.status()["proxies"]}
        assert versions == {w.node: push.snapshot(w).version for w in STATE.workloads}
        assert pilot.push_context() is push and push.renders == len(STATE.workloads)

    run(body)
