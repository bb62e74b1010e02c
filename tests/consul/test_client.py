"""The Consul client over real HTTP: against the agent double always, and against a real agent
too when ``CONSUL_HTTP_ADDR`` is set (``CONSUL_HTTP_TOKEN`` if it has ACLs): registration,
blocking queries, TTL checks, and one ConsulError sentence per way of failing."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from composemesh.consul import ConsulClient, ConsulError, check_id
from composemesh.model.consul import CatalogInstance, ConsulSettings, ExportedInstance
from tests.consul.agent_double import AgentDouble

TOKEN = "6a1253d2-1785-24fd-91c2-f8e78c745511"
HOST = "192.0.2.10"
WEB = ExportedInstance(project="shop", compose_service="web", instance=1, service="web",
                       version="v1", spiffe="spiffe://cluster.local/ns/shop/sa/web")

Body = Callable[[ConsulClient, AgentDouble], Awaitable[None]]


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


def run(body: Body, double: AgentDouble | None = None, *, token: str | None = None,
        datacenter: str | None = "dc1", **client: float) -> None:
    double = double or AgentDouble()

    async def main() -> None:
        async with serving(double.make_app()) as address:
            settings = ConsulSettings(address=address, token=token, datacenter=datacenter,
                                      host_address=HOST)
            async with ConsulClient(settings, **client) as consul:
                await body(consul, double)
    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_register_then_the_catalog_shows_it() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        sid = await consul.register(WEB)
        assert sid == "shop-web-1@192.0.2.10"
        index, names = await consul.services()
        assert names == ("consul", "web") and index >= 1
        index, instances = await consul.healthy("web")
        assert instances == (CatalogInstance(
            service="web", id=sid, node=double.node, address=HOST, port=15443, tags=("v1",),
            version="v1", spiffe=WEB.spiffe, datacenter="dc1", project="shop"),)
        # the same registration again changes nothing: no index moves
        await consul.register(WEB)
        assert (await consul.healthy("web"))[0] == index
        assert any("dc=dc1" in path for _, path in double.requests)
        assert any("replace-existing-checks" in path for _, path in double.requests)

    run(body)


def test_the_ttl_check_follows_pass_and_fail_and_deregister_removes() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        sid = await consul.register(replace(WEB, healthy=False))
        assert (await consul.healthy("web"))[1] == ()  # registered critical: not passing
        await consul.pass_ttl(check_id(sid))
        assert len((await consul.healthy("web"))[1]) == 1
        await consul.fail_ttl(check_id(sid), "the container is unhealthy")
        assert (await consul.healthy("web"))[1] == ()
        assert double.checks[check_id(sid)].output == "the container is unhealthy"
        await consul.deregister(sid)
        assert (await consul.services())[1] == ("consul",)
        await consul.deregister(sid)  # no longer there: no action, no error

    run(body)


def test_a_blocking_query_returns_within_the_wait_when_a_registration_changes() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        await consul.register(WEB)
        index, _ = await consul.healthy("web")

        async def later() -> None:
            await asyncio.sleep(0.2)
            await consul.register(replace(WEB, instance=2))

        started = time.monotonic()
        task = asyncio.create_task(later())
        new_index, instances = await consul.healthy("web", index, wait=10)
        await task
        assert time.monotonic() - started < 2
        assert new_index > index and len(instances) == 2

    run(body)


def test_a_blocking_query_with_no_change_returns_after_wait_with_the_same_index() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        index, names = await consul.services()
        started = time.monotonic()
        again, same = await consul.services(index, wait=0.3)
        assert time.monotonic() - started >= 0.29
        assert (again, same) == (index, names)
        assert any("wait=300ms" in path for _, path in double.requests)

    run(body)


def test_a_bad_token_is_one_acl_error() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        for call in (consul.register(WEB), consul.services(), consul.healthy("web")):
            with pytest.raises(ConsulError) as caught:
                await call
            assert str(caught.value) == "the Consul token is refused (ACL): ACL not found"
            assert (caught.value.kind, caught.value.status) == ("acl", 403)

    run(body, AgentDouble(token=TOKEN), token="wrong")


def test_no_token_where_acls_want_one() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        with pytest.raises(ConsulError) as caught:
            await consul.register(WEB)
        message = str(caught.value)
        assert message.startswith("the Consul token is refused (ACL): Permission denied")
        assert message.endswith(
            "no token is set (x-composemesh.consul.token_file or CONSUL_HTTP_TOKEN)")

    run(body, AgentDouble(token=TOKEN))


def test_the_right_token_works() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        await consul.register(WEB)
        assert (await consul.services())[1] == ("consul", "web")

    run(body, AgentDouble(token=TOKEN), token=TOKEN)


def test_unreachable_names_the_address() -> None:
    address = f"http://127.0.0.1:{free_port()}"

    async def main() -> None:
        settings = ConsulSettings(address=address, host_address=HOST)
        async with ConsulClient(settings) as consul:
            for call in (consul.register(WEB), consul.services(1, wait=1)):
                with pytest.raises(ConsulError) as caught:
                    await call
                assert str(caught.value).startswith(f"Consul at {address} is unreachable: ")
                assert caught.value.kind == "unreachable"

    asyncio.run(main())


def test_a_silent_agent_times_out() -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_put("/v1/agent/service/register", hang)

    async def main() -> None:
        async with serving(app) as address:
            settings = ConsulSettings(address=address, host_address=HOST)
            async with ConsulClient(settings, timeout=0.2) as consul:
                with pytest.raises(ConsulError) as caught:
                    await consul.register(WEB)
                assert str(caught.value) == (
                    f"Consul at {address} did not answer PUT /v1/agent/service/register "
                    f"within 0.2s")
                assert caught.value.kind == "unreachable"

    asyncio.run(main())


def test_a_blocking_query_is_given_its_wait_on_top_of_the_timeout() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        index, _ = await consul.services()
        # timeout 0.2s, wait 0.5s: the query may hang 0.5s (+1/16) without being cut
        assert (await consul.services(index, wait=0.5))[0] == index

    run(body, timeout=0.2)


def test_other_refusals_name_status_and_the_first_line() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        with pytest.raises(ConsulError) as caught:
            await consul.healthy("web")
        assert str(caught.value) == (
            f"Consul at {consul.settings.address} answered 500 to GET /v1/health/service/web: "
            f"No path to datacenter")
        assert (caught.value.kind, caught.value.status) == ("status", 500)

    run(body, datacenter="dc2")


def test_pass_of_an_unknown_check() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        with pytest.raises(ConsulError) as caught:
            await consul.pass_ttl("service:nope@1.2.3.4")
        assert "answered 404 to PUT /v1/agent/check/pass/" in str(caught.value)
        assert 'Unknown check "service:nope@1.2.3.4"' in str(caught.value)
        assert caught.value.unknown_check

    run(body)


def test_an_older_agents_500_for_an_unknown_check_is_known_too() -> None:
    older = ConsulError('Consul at x answered 500 to PUT /v1/agent/check/pass/service:a: '
                        'CheckID "service:a" does not have associated TTL',
                        kind="status", status=500)
    assert older.unknown_check
    assert not ConsulError("Consul at x answered 500: No path to datacenter", kind="status",
                           status=500).unknown_check
    assert not ConsulError("refused", kind="acl", status=403).unknown_check


def test_an_answer_not_as_documented_is_invalid() -> None:
    async def text(request: web.Request) -> web.Response:
        return web.Response(text="<html>proxy error</html>", headers={"X-Consul-Index": "1"})

    async def listing(request: web.Request) -> web.Response:
        return web.json_response(["web"], headers={"X-Consul-Index": "1"})

    app = web.Application()
    app.router.add_get("/v1/health/service/web", text)
    app.router.add_get("/v1/catalog/services", listing)

    async def main() -> None:
        async with serving(app) as address, \
                ConsulClient(ConsulSettings(address=address, host_address=HOST)) as c:
            for call, says in ((c.healthy("web"), "the body is not JSON"),
                               (c.services(), "not an object")):
                with pytest.raises(ConsulError) as caught:
                    await call
                assert caught.value.kind == "invalid" and says in str(caught.value)

    asyncio.run(main())


def test_after_a_restart_that_lost_the_state_registering_again_works() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        await consul.register(WEB)
        index, _ = await consul.healthy("web")
        waiting = asyncio.create_task(consul.healthy("web", index, wait=10))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        double.restart()
        # The restart closes the query's connection, as a real agent's exit does. What the
        # caller sees depends on whether the agent is back: aiohttp, as RFC 9112 9.3.1
        # allows, sends an idempotent request once more on a new connection after a
        # persistent one closed. An agent still away refuses it (unreachable); one back
        # already, as the double is at once, answers it with its new, empty, state.
        try:
            _, instances = await waiting
        except ConsulError as err:
            assert err.kind == "unreachable"
        else:
            assert instances == ()
        assert time.monotonic() - started < 2  # cut, not waited out
        assert (await consul.healthy("web"))[1] == ()
        await consul.register(WEB)
        after, instances = await consul.healthy("web")
        assert len(instances) == 1 and after > index

    run(body)


def test_a_query_in_flight_when_the_agent_goes_away_is_unreachable() -> None:
    double = AgentDouble()

    async def main() -> None:
        port = free_port()
        server = TestServer(double.make_app(), host="127.0.0.1", port=port)
        await server.start_server()
        settings = ConsulSettings(address=f"http://127.0.0.1:{port}", host_address=HOST)
        async with ConsulClient(settings) as consul:
            index, _ = await consul.services()
            waiting = asyncio.create_task(consul.services(index, wait=10))
            await asyncio.sleep(0.1)
            double.cut()  # the agent stops: its connections close, its port refuses
            await server.close()
            with pytest.raises(ConsulError) as caught:
                await asyncio.wait_for(waiting, 5)
            assert caught.value.kind == "unreachable"

    asyncio.run(main())


def test_an_index_that_went_backwards_starts_over() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        for n in range(1, 6):
            await consul.register(replace(WEB, instance=n))
        index, _ = await consul.services()
        double.restart(reset_index=True)
        reset, names = await consul.services(index, wait=5)
        assert (reset, names) == (0, ("consul",))  # the docs: reset to 0
        fresh, _ = await consul.services(reset)  # answers at once with the current index
        assert 1 <= fresh < index

    run(body)


def test_a_service_id_with_url_characters_round_trips() -> None:
    async def body(consul: ConsulClient, double: AgentDouble) -> None:
        odd = replace(WEB, compose_service="web v1?")
        sid = await consul.register(odd)
        await consul.pass_ttl(check_id(sid))
        assert sid in double.services
        await consul.deregister(sid)
        assert sid not in double.services

    run(body)


# -------------------------------------------------------------- against a real agent, if any


REAL = os.environ.get("CONSUL_HTTP_ADDR")


@pytest.mark.skipif(not REAL, reason="no real Consul agent: set CONSUL_HTTP_ADDR to test one")
def test_a_real_agent_registers_blocks_and_deregisters() -> None:
    address = REAL if REAL and "://" in REAL else f"http://{REAL}"
    project = f"cmtest{uuid.uuid4().hex[:8]}"
    instance = replace(WEB, project=project, service=f"{project}-web")

    async def main() -> None:
        settings = ConsulSettings(address=address.rstrip("/"),
                                  token=os.environ.get("CONSUL_HTTP_TOKEN") or None,
                                  host_address=HOST)
        async with ConsulClient(settings) as consul:
            sid = await consul.register(instance)
            try:
                deadline = time.monotonic() + 10  # the agent syncs the catalog by itself
                while instance.service not in (await consul.services())[1]:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.2)
                index, instances = await consul.healthy(instance.service)
                assert [i.id for i in instances] == [sid]
                assert (instances[0].spiffe, instances[0].project) == (WEB.spiffe, project)
                waiting = asyncio.create_task(consul.healthy(instance.service, index, wait=10))
                await asyncio.sleep(0.2)
                await consul.fail_ttl(check_id(sid))
                _, instances = await waiting
                assert instances == ()
            finally:
                await consul.deregister(sid)

    asyncio.run(main())
