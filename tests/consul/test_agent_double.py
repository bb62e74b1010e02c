"""The agent double against Consul's documentation: its answers key for key against the docs'
example responses (tests/consul/recorded), blocking queries, ACL refusals, TTL expiry."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tests.consul.agent_double import AgentDouble, ManualClock, parse_duration

RECORDED = Path(__file__).parent / "recorded"
TOKEN = "6a1253d2-1785-24fd-91c2-f8e78c745511"

Body = Callable[[AgentDouble, TestClient], Awaitable[None]]


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text())


def run(double: AgentDouble, body: Body) -> None:
    async def main() -> None:
        async with TestClient(TestServer(double.make_app(), host="127.0.0.1")) as client:
            await body(double, client)
    asyncio.run(main())


def same_shape(got: Any, want: Any, where: str = "$") -> None:
    """``got`` has exactly ``want``'s keys, recursively, and values of the same JSON types."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        assert sorted(got) == sorted(want), f"{where}: {sorted(got)} != {sorted(want)}"
        for key in want:
            same_shape(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list), where
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            same_shape(g, w, f"{where}[{i}]")
    else:
        assert type(got) is type(want) or want is None, f"{where}: {got!r} vs {want!r}"


# -------------------------------------------------------------- the docs' example responses


def test_catalog_service_is_the_docs_example() -> None:
    want = recorded("catalog_service.json")
    double = AgentDouble(
        node="t2.320", node_address="192.168.10.10",
        node_tagged_addresses={"lan": "192.168.10.10", "wan": "10.0.10.10"},
        node_meta={"somekey": "somevalue"}, consul_service=False, index=50)

    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.put("/v1/agent/service/register", json={
            "ID": "32a2a47f7992:nodea:5000", "Name": "web", "Tags": ["prod"],
            "Address": "172.17.0.3", "Port": 5000, "Meta": {"web_meta_value": "baz"},
            "TaggedAddresses": {"lan": {"address": "172.17.0.3", "port": 5000},
                                "wan": {"address": "198.18.0.1", "port": 512}}})
        assert resp.status == 200, await resp.text()
        resp = await client.get("/v1/catalog/service/web")
        assert resp.status == 200
        got = await resp.json()
        same_shape(got, want)
        assert got == want  # value for value too: the example's service, on its node
        assert resp.headers["X-Consul-Index"] == "51"

    run(double, body)


def test_health_service_is_the_docs_example() -> None:
    want = recorded("health_service.json")
    double = AgentDouble(node="foobar", node_address="10.1.10.12",
                         node_meta={"instance_type": "t2.medium"}, consul_service=False)

    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.put("/v1/agent/service/register", json={
            "ID": "redis", "Name": "redis", "Tags": ["primary"], "Address": "10.1.10.12",
            "Port": 8000, "Meta": {"redis_version": "4.0"},
            "TaggedAddresses": {"lan": {"address": "10.1.10.12", "port": 8000},
                                "wan": {"address": "198.18.1.2", "port": 80}},
            "Weights": {"Passing": 10, "Warning": 1},
            "Check": {"TTL": "30s", "Status": "passing"}})
        assert resp.status == 200, await resp.text()
        for query in ("", "?passing", "?passing=true"):
            resp = await client.get(f"/v1/health/service/redis{query}")
            got = await resp.json()
            same_shape(got, want)
            assert got == want
            assert int(resp.headers["X-Consul-Index"]) >= 1

    run(double, body)


def test_catalog_services_is_the_docs_example() -> None:
    want = recorded("catalog_services.json")

    async def body(double: AgentDouble, client: TestClient) -> None:
        for service in ({"Name": "redis"},
                        {"Name": "postgresql", "ID": "pg1", "Tags": ["primary"]},
                        {"Name": "postgresql", "ID": "pg2", "Tags": ["secondary"]},
                        {"Name": "postgresql", "ID": "pg3", "Tags": ["primary"]}):
            assert (await client.put("/v1/agent/service/register", json=service)).status == 200
        resp = await client.get("/v1/catalog/services")
        assert await resp.json() == want
        assert resp.content_type == "application/json"

    run(AgentDouble(), body)


def test_the_docs_sample_register_payload_is_accepted() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.put("/v1/agent/service/register?replace-existing-checks=true",
                                json=recorded("agent_service_register.json"))
        assert resp.status == 200, await resp.text()
        [entry] = await (await client.get("/v1/health/service/redis")).json()
        assert entry["Service"]["ID"] == "redis1"
        assert entry["Service"]["Weights"] == {"Passing": 10, "Warning": 1}
        # an Args check the double does not run: it stays at its initial status, critical
        assert [c["Status"] for c in entry["Checks"]] == ["critical", "passing"]
        assert entry["Checks"][0]["CheckID"] == "service:redis1"
        assert await (await client.get("/v1/health/service/redis?passing")).json() == []

    run(AgentDouble(), body)


def test_register_refuses_as_the_agent_does() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        for payload, status, says in (
            ({"ID": "x"}, 400, "Missing service name"),
            ({"Name": "x", "Check": {"Status": "fine", "TTL": "10s"}}, 400, "Status for checks"),
            ({"Name": "x", "Check": {"Notes": "no kind"}}, 400, "TTL must be > 0"),
            ({"Name": "x", "Meta": {"consul-x": "1"}}, 400, "Invalid Service Meta"),
            ({"Name": "x", "Meta": {"a b": "1"}}, 400, "Invalid Service Meta"),
            ({"Name": "x", "Check": {"TTL": "soon"}}, 400, "invalid duration"),
        ):
            resp = await client.put("/v1/agent/service/register", json=payload)
            assert (resp.status, says in await resp.text()) == (status, True), payload
        resp = await client.put("/v1/agent/service/register", data=b"{not json")
        assert resp.status == 400 and "Request decode failed" in await resp.text()

    run(AgentDouble(), body)


def test_snake_case_and_lower_case_keys_are_read() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.put("/v1/agent/service/register", json={
            "name": "web", "id": "web-1", "port": 80, "enable_tag_override": True,
            "check": {"check_id": "c1", "ttl": "10s", "status": "passing",
                      "deregister_critical_service_after": "90m"}})
        assert resp.status == 200, await resp.text()
        [entry] = await (await client.get("/v1/catalog/service/web")).json()
        assert (entry["ServiceID"], entry["ServicePort"], entry["ServiceEnableTagOverride"]) \
            == ("web-1", 80, True)
        assert double.checks["c1"].deregister_after == 90 * 60

    run(AgentDouble(), body)


def test_deregister_and_ttl_updates() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        await client.put("/v1/agent/service/register",
                         json={"Name": "web", "ID": "w1", "Check": {"TTL": "10s"}})
        [entry] = await (await client.get("/v1/health/service/web")).json()
        assert entry["Checks"][0]["Status"] == "critical"  # a TTL check starts critical
        for verb, status in (("pass", "passing"), ("warn", "warning"), ("fail", "critical")):
            resp = await client.put(f"/v1/agent/check/{verb}/service:w1?note=said+{verb}")
            assert resp.status == 200
            [entry] = await (await client.get("/v1/health/service/web")).json()
            assert (entry["Checks"][0]["Status"], entry["Checks"][0]["Output"]) == (
                status, f"said {verb}")
        resp = await client.put("/v1/agent/check/pass/nope")
        assert resp.status == 404 and "nope" in await resp.text()
        assert (await client.put("/v1/agent/service/deregister/w1")).status == 200
        assert await (await client.get("/v1/health/service/web")).json() == []
        # the docs: "If the service does not exist, no action is taken"
        assert (await client.put("/v1/agent/service/deregister/w1")).status == 200

    run(AgentDouble(), body)


def test_an_unchanged_re_registration_or_pass_moves_no_index() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        service = {"Name": "web", "ID": "w1", "Check": {"TTL": "10s", "Status": "passing"}}
        await client.put("/v1/agent/service/register", json=service)
        first = (await client.get("/v1/health/service/web")).headers["X-Consul-Index"]
        await client.put("/v1/agent/service/register", json=service)
        await client.put("/v1/agent/check/pass/service:w1")
        assert (await client.get("/v1/health/service/web")).headers["X-Consul-Index"] == first

    run(AgentDouble(), body)


def test_dc_other_than_its_own_has_no_path() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        assert (await client.get("/v1/catalog/services?dc=dc1")).status == 200
        resp = await client.get("/v1/catalog/services?dc=dc2")
        assert (resp.status, await resp.text()) == (500, "No path to datacenter")

    run(AgentDouble(), body)


def test_unimplemented_parameters_are_refused_not_ignored() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.get("/v1/health/service/web?filter=Service.Port==80")
        assert resp.status == 400 and "does not implement" in await resp.text()

    run(AgentDouble(), body)


# ----------------------------------------------------------------------- blocking queries


def test_parse_duration_reads_go_durations() -> None:
    assert [parse_duration(t) for t in ("10s", "5m", "1m30s", "250ms", "1.5h", "0")] == [
        10, 300, 90, 0.25, 5400, 0]
    for bad in ("10", "s", "5 m", "-1s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_a_blocking_query_waits_for_a_change() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.get("/v1/health/service/web")
        index = int(resp.headers["X-Consul-Index"])

        async def later() -> None:
            await asyncio.sleep(0.2)
            await client.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})

        started = time.monotonic()
        task = asyncio.create_task(later())
        resp = await client.get(f"/v1/health/service/web?index={index}&wait=5s")
        elapsed = time.monotonic() - started
        await task
        assert 0.15 < elapsed < 2, elapsed
        assert int(resp.headers["X-Consul-Index"]) > index
        assert [e["Service"]["Service"] for e in await resp.json()] == ["web"]

    run(AgentDouble(), body)


def test_a_blocking_query_returns_after_wait_with_the_same_index() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        index = (await client.get("/v1/catalog/services")).headers["X-Consul-Index"]
        started = time.monotonic()
        resp = await client.get(f"/v1/catalog/services?index={index}&wait=300ms")
        elapsed = time.monotonic() - started
        assert 0.25 < elapsed < 2, elapsed
        assert resp.status == 200 and resp.headers["X-Consul-Index"] == index

    run(AgentDouble(), body)


def test_a_change_to_another_service_does_not_wake_a_query_on_this_one() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        await client.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
        index = (await client.get("/v1/health/service/web")).headers["X-Consul-Index"]

        async def later() -> None:
            await asyncio.sleep(0.1)
            await client.put("/v1/agent/service/register", json={"Name": "db", "Port": 5432})

        task = asyncio.create_task(later())
        resp = await client.get(f"/v1/health/service/web?index={index}&wait=400ms")
        await task
        assert resp.headers["X-Consul-Index"] == index
        # ...but the list of services did change
        assert int((await client.get("/v1/catalog/services")).headers["X-Consul-Index"]) \
            > int(index)

    run(AgentDouble(), body)


def test_bad_index_or_wait() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.get("/v1/catalog/services?index=x")
        assert (resp.status, await resp.text()) == (400, "Invalid index")
        resp = await client.get("/v1/catalog/services?index=1&wait=forever")
        assert (resp.status, await resp.text()) == (400, "Invalid wait time")

    run(AgentDouble(), body)


def test_restart_drops_state_cuts_blocking_queries_and_the_index_grows() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        await client.put("/v1/agent/service/register", json={"Name": "web", "Port": 80})
        index = int((await client.get("/v1/catalog/services")).headers["X-Consul-Index"])
        waiting = asyncio.create_task(
            client.get(f"/v1/catalog/services?index={index}&wait=10s"))
        await asyncio.sleep(0.1)
        double.restart()
        with pytest.raises(aiohttp.ClientError):  # the connection is cut
            resp = await waiting
            await resp.read()
        resp = await client.get("/v1/catalog/services")
        assert await resp.json() == {"consul": []}
        assert int(resp.headers["X-Consul-Index"]) > index

    run(AgentDouble(), body)


def test_restart_with_reset_index_goes_backwards() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        for i in range(5):
            await client.put("/v1/agent/service/register", json={"Name": f"s{i}", "Port": 80})
        index = int((await client.get("/v1/catalog/services")).headers["X-Consul-Index"])
        double.restart(reset_index=True)
        resp = await client.get(f"/v1/catalog/services?index={index}&wait=100ms")
        assert int(resp.headers["X-Consul-Index"]) < index

    run(AgentDouble(), body)


# ------------------------------------------------------------------------------------ ACL


def test_acl_unknown_token_no_token_and_the_right_one() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        register = {"Name": "web", "Port": 80}
        resp = await client.put("/v1/agent/service/register", json=register,
                                headers={"X-Consul-Token": "not-the-token"})
        assert (resp.status, await resp.text()) == (403, "ACL not found")
        resp = await client.get("/v1/catalog/services", headers={"X-Consul-Token": "nope"})
        assert (resp.status, await resp.text()) == (403, "ACL not found")
        resp = await client.put("/v1/agent/service/register", json=register)
        assert resp.status == 403
        assert (await resp.text()).startswith("Permission denied")
        assert "service:write" in await resp.text()
        resp = await client.put("/v1/agent/service/register", json=register,
                                headers={"X-Consul-Token": TOKEN})
        assert resp.status == 200
        resp = await client.get("/v1/catalog/services",
                                headers={"Authorization": f"Bearer {TOKEN}"})
        assert await resp.json() == {"consul": [], "web": []}
        assert resp.headers["X-Consul-Default-Acl-Policy"] == "deny"
        # the anonymous token reads nothing: results filtered, as under default_policy deny
        resp = await client.get("/v1/catalog/services")
        assert (resp.status, await resp.json()) == (200, {})
        resp = await client.get("/v1/health/service/web")
        assert (resp.status, await resp.json()) == (200, [])
        # a read-only token reads but may not write
        resp = await client.put("/v1/agent/service/deregister/web",
                                headers={"X-Consul-Token": "reader"})
        assert resp.status == 403 and (await resp.text()).startswith("Permission denied")
        resp = await client.get("/v1/health/service/web", headers={"X-Consul-Token": "reader"})
        assert len(await resp.json()) == 1

    run(AgentDouble(token=TOKEN, read_only_tokens=("reader",)), body)


def test_without_acls_every_caller_may_write() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.put("/v1/agent/service/register", json={"Name": "web"},
                                headers={"X-Consul-Token": "anything"})
        assert resp.status == 200
        assert resp.headers["X-Consul-Default-Acl-Policy"] == "allow"

    run(AgentDouble(), body)


# ------------------------------------------------------------------------------------ TTL


def test_a_ttl_check_goes_critical_after_its_ttl() -> None:
    clock = ManualClock()

    async def body(double: AgentDouble, client: TestClient) -> None:
        await client.put("/v1/agent/service/register", json={
            "Name": "web", "ID": "w1", "Check": {"TTL": "30s", "Status": "passing"}})
        passing = "/v1/health/service/web?passing"
        assert len(await (await client.get(passing)).json()) == 1
        clock.advance(29)
        double.sweep()
        assert len(await (await client.get(passing)).json()) == 1
        await client.put("/v1/agent/check/pass/service:w1")  # the TTL starts over
        clock.advance(29)
        double.sweep()
        assert len(await (await client.get(passing)).json()) == 1
        clock.advance(2)
        double.sweep()
        assert await (await client.get(passing)).json() == []
        [entry] = await (await client.get("/v1/health/service/web")).json()
        assert (entry["Checks"][0]["Status"], entry["Checks"][0]["Output"]) == (
            "critical", "TTL expired")

    run(AgentDouble(clock=clock), body)


def test_expiry_wakes_a_blocking_query_through_the_background_sweep() -> None:
    clock = ManualClock()

    async def body(double: AgentDouble, client: TestClient) -> None:
        await client.put("/v1/agent/service/register", json={
            "Name": "web", "Check": {"TTL": "10s", "Status": "passing"}})
        index = (await client.get("/v1/health/service/web?passing")).headers["X-Consul-Index"]
        asyncio.get_running_loop().call_later(0.1, clock.advance, 11)
        resp = await client.get(f"/v1/health/service/web?passing&index={index}&wait=5s")
        assert await resp.json() == []

    run(AgentDouble(clock=clock, sweep_interval=0.02), body)


def test_deregister_critical_service_after_removes_it() -> None:
    clock = ManualClock()

    async def body(double: AgentDouble, client: TestClient) -> None:
        await client.put("/v1/agent/service/register", json={
            "Name": "web", "ID": "w1", "Check": {
                "TTL": "30s", "Status": "passing", "DeregisterCriticalServiceAfter": "1m"}})
        await client.put("/v1/agent/service/register", json={
            "Name": "web", "ID": "w2", "Check": {
                # below the documented minimum of 1m: held to 1m
                "TTL": "30s", "Status": "passing", "DeregisterCriticalServiceAfter": "10s"}})
        clock.advance(31)
        double.sweep()  # critical now
        clock.advance(59)
        double.sweep()
        assert len(await (await client.get("/v1/catalog/service/web")).json()) == 2
        clock.advance(1)
        double.sweep()
        assert await (await client.get("/v1/catalog/service/web")).json() == []
        assert "web" not in await (await client.get("/v1/catalog/services")).json()
        assert double.checks == {}

    run(AgentDouble(clock=clock), body)


def test_registering_again_keeps_the_status_of_an_existing_check() -> None:
    # The agent restores a re-registered check's status and output from its snapshot: the
    # Status of a registration is the initial one only; a TTL update is what changes it.
    async def body(double: AgentDouble, client: TestClient) -> None:
        service = {"Name": "web", "ID": "w1", "Check": {"TTL": "10s", "Status": "passing"}}
        await client.put("/v1/agent/service/register", json=service)
        await client.put("/v1/agent/check/fail/service:w1?note=down")
        await client.put("/v1/agent/service/register?replace-existing-checks", json=service)
        assert (double.checks["service:w1"].status, double.checks["service:w1"].output) == (
            "critical", "down")
        await client.put("/v1/agent/check/pass/service:w1")
        assert double.checks["service:w1"].status == "passing"

    run(AgentDouble(), body)


def test_a_ttl_update_of_an_unknown_or_not_ttl_check() -> None:
    async def body(double: AgentDouble, client: TestClient) -> None:
        resp = await client.put("/v1/agent/check/pass/nope")
        assert (resp.status, await resp.text()) == (404, 'Unknown check "nope"')
        await client.put("/v1/agent/service/register", json={
            "Name": "web", "ID": "w1", "Check": {"TCP": "127.0.0.1:1", "Interval": "10s"}})
        resp = await client.put("/v1/agent/check/pass/service:w1")
        assert (resp.status, await resp.text()) == (
            500, 'CheckID "service:w1" does not have associated TTL')

    run(AgentDouble(), body)
