"""The pilot's Consul source over real HTTP on loopback: export (registrations, checks that
follow health, deregistration), re-registration after Consul lost its state or was away,
import by blocking queries, the failures said once, and nothing left after cancellation.

Which agent: by default the agent double (tests/consul/agent_double.py), which stands in for
a Consul agent because none can be installed on these machines. To run these tests against a
real agent instead:

- put ``consul`` on the PATH: the ``real_agent`` fixture starts ``consul agent -dev`` on free
  loopback ports for the session and stops it after; or
- set ``CONSUL_HTTP_ADDR`` (and ``CONSUL_HTTP_TOKEN`` if it has ACLs) to use that agent.

    CONSUL_HTTP_ADDR=http://127.0.0.1:8500 \\
        .venv/bin/python -m pytest tests/pilot/test_consul_source.py tests/consul

Against a real agent the tests that need the double's controls (restart() losing state,
counting requests, ACL tokens of its own, an agent that comes up later) are skipped; the rest
run unchanged, on service names unique to the run so a shared agent is left as it was. What a
real agent changes: its catalog sync is asynchronous (anti-entropy; the bounds below allow for
it), its index is the servers' Raft index shared by every write (more wake-ups, each followed
by QUIET_PAUSE_S when nothing moved), and a blocking query's wait gets up to wait/16 of jitter.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from composemesh.consul import ConsulClient, check_id
from composemesh.model.consul import CatalogInstance, ConsulSettings, ConsulView, ExportedInstance
from composemesh.model.mesh import Workload
from composemesh.pilot.sources.consul import ConsulSource
from composemesh.pilot.sources.consul.controller import exports, instance_number
from tests.consul.agent_double import AgentDouble

HOST = "192.0.2.10"  # this host, as other hosts reach its east-west gateway
OTHER_HOST = "192.0.2.20"
TOKEN = "6a1253d2-1785-24fd-91c2-f8e78c745511"
TTL = 0.2  # the source's ttl_interval in these tests
BOUND = 5.0  # seconds any condition below is waited for, at the most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ which agent: the switch


@pytest.fixture(scope="session")
def real_agent() -> Iterator[str | None]:
    """A real agent's address: CONSUL_HTTP_ADDR's, or a ``consul agent -dev`` started here
    when ``consul`` is on the PATH; None (the double is used) when neither."""
    given = os.environ.get("CONSUL_HTTP_ADDR")
    if given:
        yield (given if "://" in given else f"http://{given}").rstrip("/")
        return
    exe = shutil.which("consul")
    if exe is None:
        yield None
        return
    http = free_port()
    with tempfile.TemporaryDirectory() as data:
        agent = subprocess.Popen(
            [exe, "agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1",
             f"-http-port={http}", "-dns-port=-1", "-grpc-port=-1", f"-data-dir={data}",
             f"-serf-lan-port={free_port()}", f"-serf-wan-port={free_port()}",
             f"-server-port={free_port()}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        address = f"http://127.0.0.1:{http}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(f"{address}/v1/status/leader", timeout=1) as r:
                        if r.read().strip() not in (b"", b'""'):
                            break
                except OSError:
                    pass
                assert agent.poll() is None, "consul agent -dev exited"
                assert time.monotonic() < deadline, "consul agent -dev has no leader in 30s"
                time.sleep(0.2)
            yield address
        finally:
            agent.terminate()
            agent.wait(10)


@dataclass
class Agent:
    """The agent of one test: the double (``double`` set; ``start``/``stop`` it on its port)
    or a real one (``double`` None)."""

    address: str
    double: AgentDouble | None = None
    token: str | None = None
    port: int = 0
    server: TestServer | None = None
    names: dict[str, str] = field(default_factory=dict)

    def name(self, service: str) -> str:
        """``service`` as this test names it: unique to the run on a real (shared) agent."""
        return self.names.setdefault(
            service, service if self.double else f"{service}-{uuid.uuid4().hex[:6]}")

    async def start(self) -> None:
        assert self.double is not None
        self.server = TestServer(self.double.make_app(), host="127.0.0.1", port=self.port)
        await self.server.start_server()

    async def stop(self) -> None:
        """The agent goes away: its connections close, its port refuses."""
        assert self.double is not None and self.server is not None
        self.double.cut()
        await self.server.close()
        self.server = None


@pytest.fixture
def agent(real_agent: str | None) -> Agent:
    if real_agent:
        return Agent(address=real_agent, token=os.environ.get("CONSUL_HTTP_TOKEN") or None)
    port = free_port()
    return Agent(address=f"http://127.0.0.1:{port}", double=AgentDouble(), port=port)


def double_only(agent: Agent) -> AgentDouble:
    if agent.double is None:
        pytest.skip("needs the agent double's controls (a real agent is in use)")
    return agent.double


# ------------------------------------------------------------------------------- helpers


def workload(service: str = "web", n: int = 1, *, compose_service: str | None = None,
             version: str = "v1", running: bool = True, healthy: bool = True,
             project: str = "shop") -> Workload:
    compose = compose_service or service
    return Workload(node=f"{project}-{compose}-netns-{n}", project=project,
                    compose_service=compose, service=service, version=version,
                    addresses=("172.18.0.5",), running=running, proxy_healthy=healthy)


class Views:
    """What the source sent to the pilot."""

    def __init__(self) -> None:
        self.all: list[ConsulView] = []
        self.at: list[float] = []  # time.monotonic() of each

    async def __call__(self, view: ConsulView) -> None:
        self.all.append(view)
        self.at.append(time.monotonic())

    @property
    def last(self) -> ConsulView:
        return self.all[-1] if self.all else ConsulView()


async def until(condition: Callable[[], Any], what: str, bound: float = BOUND) -> float:
    """Wait (polling) until ``condition()`` is true, at most ``bound`` seconds; how long."""
    started = time.monotonic()
    while True:
        got = condition()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return time.monotonic() - started
        if time.monotonic() - started > bound:
            raise AssertionError(f"not within {bound}s: {what}")
        await asyncio.sleep(0.02)


Body = Callable[["Run"], Awaitable[None]]


@dataclass
class Run:
    agent: Agent
    source: ConsulSource
    views: Views
    observer: ConsulClient  # another client of the same agent, as another host would be
    task: asyncio.Task[None]

    async def passing(self, service: str) -> tuple[CatalogInstance, ...]:
        return (await self.observer.healthy(self.agent.name(service)))[1]

    async def ids(self, service: str) -> set[str]:
        return {i.id for i in await self.passing(service)}

    async def catalog(self) -> tuple[str, ...]:
        return (await self.observer.services())[1]

    def imported(self, service: str) -> tuple[CatalogInstance, ...]:
        return tuple(self.source.current_view().imported.get(self.agent.name(service), ()))


def named(agent: Agent, workloads: tuple[Workload, ...]) -> tuple[Workload, ...]:
    return tuple(replace(w, service=agent.name(w.service)) for w in workloads)


def run(agent: Agent, body: Body, *, started: bool = True, token: str | None = None,
        **source: Any) -> None:
    """``body`` with a ConsulSource of project ``shop`` on ``agent`` (the double served on
    loopback unless ``started`` is False), cancelled after it."""
    source.setdefault("ttl_interval", TTL)
    source.setdefault("retry_cap", 0.3)

    async def main() -> None:
        if agent.double is not None and started:
            await agent.start()
        settings = ConsulSettings(address=agent.address, token=token or agent.token,
                                  datacenter=None, host_address=HOST)
        views = Views()
        consul = ConsulSource(settings, project="shop", trust_domain="cluster.local",
                              on_view=views, **source)
        task = asyncio.create_task(consul.run())
        observer_settings = ConsulSettings(address=agent.address, token=agent.token or (
            TOKEN if agent.double and agent.double.token else None), host_address=OTHER_HOST)
        try:
            async with ConsulClient(observer_settings) as observer:
                await body(Run(agent, consul, views, observer, task))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if agent.server is not None:
                await agent.stop()

    asyncio.run(main())


# ---------------------------------------------------------------------------------- pure


def test_the_instance_number_is_composes_container_number() -> None:
    assert instance_number(workload(n=3)) == 3
    assert instance_number(replace(workload(), node="shop_web_netns_2")) == 2
    assert instance_number(replace(workload(), node="odd")) == 1


def test_what_is_exported() -> None:
    settings = ConsulSettings(address="http://c:8500", host_address=HOST)
    got = exports((workload(), workload("web", 2, version="v2", healthy=False),
                   workload("db", running=False), workload("ingress-gateway"),
                   workload("east-west-gateway"), workload("egress-gateway"),
                   workload("api", project="other")),
                  settings, project="shop", trust_domain="example.org")
    assert got == {
        "shop-web-1@192.0.2.10": ExportedInstance(
            project="shop", compose_service="web", instance=1, service="web", version="v1",
            spiffe="spiffe://example.org/ns/shop/sa/web", healthy=True),
        "shop-web-2@192.0.2.10": ExportedInstance(
            project="shop", compose_service="web", instance=2, service="web", version="v2",
            spiffe="spiffe://example.org/ns/shop/sa/web", healthy=False),
    }


# --------------------------------------------------------------------------------- export


def test_registrations_carry_tags_meta_address_port_and_a_ttl_check(agent: Agent) -> None:
    async def body(r: Run) -> None:
        web, db = agent.name("web"), agent.name("db")
        r.source.workloads_changed(named(agent, (
            workload(), workload("web", 1, compose_service="web-v2", version="v2"),
            workload("db", 2), workload("ingress-gateway"), workload("east-west-gateway"),
            workload("cache", running=False))))
        await until(lambda: r.ids("web"), "web registered")
        await until(lambda: len(r.source.current_view().exported.get(web, ())) == 2,
                    "both web instances exported")
        instances = {i.id: i for i in await r.passing("web")}
        assert set(instances) == {"shop-web-1@192.0.2.10", "shop-web-v2-1@192.0.2.10"}
        v2 = instances["shop-web-v2-1@192.0.2.10"]
        assert (v2.address, v2.port, v2.tags, v2.version, v2.spiffe, v2.project) == (
            HOST, 15443, ("v2",), "v2", f"spiffe://cluster.local/ns/shop/sa/{web}", "shop")
        await until(lambda: r.ids("db"), "db registered")
        assert {i.id for i in await r.passing("db")} == {"shop-db-2@192.0.2.10"}
        names = await r.catalog()
        assert agent.name("cache") not in names  # not running: not registered
        assert not {"ingress-gateway", "east-west-gateway"} & set(names)
        await until(lambda: r.views.last.exported == {
            db: ("shop-db-2@192.0.2.10",),
            web: ("shop-web-1@192.0.2.10", "shop-web-v2-1@192.0.2.10")}, "the view's exports")
        assert r.views.last.reachable and r.views.last.error == ""
        if agent.double is not None:
            service = agent.double.services["shop-web-v2-1@192.0.2.10"]
            assert service.meta == {"version": "v2", "project": "shop", "composemesh": "1",
                                    "spiffe": "spiffe://cluster.local/ns/shop/sa/web"}
            check = agent.double.checks[check_id("shop-web-v2-1@192.0.2.10")]
            assert (check.ttl, check.deregister_after, check.status) == (30.0, 60.0, "passing")

    run(agent, body)


def test_a_stopped_workload_is_deregistered_at_once(agent: Agent) -> None:
    async def body(r: Run) -> None:
        r.source.workloads_changed(named(agent, (workload(), workload("web", 2))))
        await until(lambda: _has(r, "web", 2), "two web instances")
        r.source.workloads_changed(named(agent, (workload(), workload("web", 2, running=False))))
        took = await until(lambda: _has(r, "web", 1), "the stopped one deregistered")
        assert took < 1.0
        r.source.workloads_changed(())  # gone altogether
        await until(lambda: _gone(r, "web"), "web gone from the catalog")
        await until(lambda: r.views.last.exported == {}, "nothing exported")

    run(agent, body)


async def _has(r: Run, service: str, count: int) -> bool:
    return len(await r.ids(service)) == count


async def _gone(r: Run, service: str) -> bool:
    return r.agent.name(service) not in await r.catalog()


def test_an_unhealthy_workload_goes_critical_and_leaves_the_passing_answers(
        agent: Agent) -> None:
    async def body(r: Run) -> None:
        r.source.workloads_changed(named(agent, (workload(),)))
        await until(lambda: _has(r, "web", 1), "web passing")
        r.source.workloads_changed(named(agent, (workload(healthy=False),)))
        await until(lambda: _has(r, "web", 0), "web no longer passing")
        assert agent.name("web") in await r.catalog()  # registered still, critical
        if agent.double is not None:
            assert agent.double.checks[check_id("shop-web-1@192.0.2.10")].status == "critical"
        r.source.workloads_changed(named(agent, (workload(),)))
        await until(lambda: _has(r, "web", 1), "web passing again")

    run(agent, body)


def test_a_workload_registered_unhealthy_is_critical_from_the_start(agent: Agent) -> None:
    async def body(r: Run) -> None:
        r.source.workloads_changed(named(agent, (workload(healthy=False), workload("db"))))
        await until(lambda: _has(r, "db", 1), "db passing")
        await until(lambda: r.views.last.exported.get(agent.name("web")), "web exported")
        assert await r.passing("web") == ()

    run(agent, body)


def test_an_earlier_pilots_leftovers_are_removed_and_its_live_ones_kept(agent: Agent) -> None:
    async def body(r: Run) -> None:
        web = agent.name("web")
        here = ConsulSettings(address=agent.address, token=agent.token, host_address=HOST)
        async with ConsulClient(here) as earlier:  # the pilot before this one, killed
            for n in (1, 2):
                sid = await earlier.register(ExportedInstance(
                    "shop", "web", n, web, "v1", "spiffe://cluster.local/ns/shop/sa/web"))
                await earlier.pass_ttl(check_id(sid))
        await until(lambda: _has(r, "web", 2), "the leftovers pass")
        r.source.workloads_changed(named(agent, (workload("web", 1),)))  # #2 is gone
        await until(lambda: _has(r, "web", 1), "the leftover of #2 removed")
        assert await r.ids("web") == {"shop-web-1@192.0.2.10"}

    run(agent, body)


# ------------------------------------------------------------------ Consul losing its state


def test_a_restart_that_lost_the_state_brings_everything_back_at_once(agent: Agent) -> None:
    double = double_only(agent)

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(), workload("web", 2), workload("db")))
        await until(lambda: len(double.services) == 4, "three registrations and consul's")
        double.restart()
        assert set(double.services) == {"consul"}
        # the catalog watch sees this project's names gone: no TTL interval waited for
        took = await until(lambda: len(double.services) == 4, "all registered again")
        assert took < 1.0
        assert {c.status for c in double.checks.values()} == {"passing"}

    run(agent, body, ttl_interval=30.0)


def test_a_restart_that_reset_the_index_too_within_a_couple_of_ttl_intervals(
        agent: Agent) -> None:
    # The watches' index is now ahead of Consul's: their queries hang until their wait. The
    # first TTL pass finds its check unknown, registers everything again and restarts the
    # watches from index 0, so the imports catch up too.
    double = double_only(agent)

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(), workload("db")))
        await register_plain(agent, "payments", "payments-1", "198.51.100.7", 8080)
        await until(lambda: len(double.services) == 4, "registered")
        await until(lambda: r.views.last.imported.get("payments"), "payments imported")
        double.restart(reset_index=True)
        took = await until(lambda: len(double.services) == 3, "registered again")
        assert took < 2 * TTL + 0.5
        await register_plain(agent, "orders", "orders-1", "198.51.100.8", 8080)
        await until(lambda: r.views.last.imported.get("orders"), "a new name imported")
        await until(lambda: "payments" not in r.views.last.imported, "a lost name dropped")

    run(agent, body)


def test_a_registration_removed_behind_its_back_returns_on_the_next_ttl_pass(
        agent: Agent) -> None:
    double = double_only(agent)

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(), workload("web", 2)))
        await until(lambda: len(double.services) == 3, "registered")
        double._deregister("shop-web-2@192.0.2.10")  # the name stays in the catalog
        took = await until(lambda: "shop-web-2@192.0.2.10" in double.services,
                           "registered again")
        assert took < 3 * TTL + 0.5

    run(agent, body)


def test_consul_down_at_start_one_warning_then_everything_once_it_comes(
        agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    double = double_only(agent)
    caplog.set_level(logging.INFO, logger="composemesh.pilot.consul")

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(),))
        await until(lambda: r.source.failed_calls >= 6, "several failed tries")
        warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert len(warnings) == 1, [rec.getMessage() for rec in warnings]
        message = warnings[0].getMessage()
        assert agent.address in message and "unreachable" in message
        assert "mesh works locally" in message
        view = r.views.last
        assert (view.reachable, view.error_kind) == (False, "unreachable")
        assert agent.address in view.error
        await agent.start()
        took = await until(lambda: "shop-web-1@192.0.2.10" in double.services, "registered")
        assert took < 2.0  # the retry cap of the test, and a little
        await until(lambda: r.views.last.reachable, "the view says reachable")
        assert r.views.last.exported == {"web": ("shop-web-1@192.0.2.10",)}
        assert "answers" in caplog.text

    run(agent, body, started=False)


def test_after_an_outage_that_lost_the_state_everything_is_registered_again(
        agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    double = double_only(agent)
    caplog.set_level(logging.WARNING, logger="composemesh.pilot.consul")

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(), workload("db")))
        await until(lambda: len(double.services) == 3, "registered")
        await agent.stop()
        double.restart()  # away, and back without its data
        await until(lambda: not r.views.last.reachable, "the view says unreachable")
        await until(lambda: r.source.failed_calls >= 4, "several failed tries")
        await agent.start()
        await until(lambda: len(double.services) == 3, "registered again")
        await until(lambda: r.views.last.reachable, "reachable again")
        unreachable = [rec for rec in caplog.records if "unreachable" in rec.getMessage()]
        assert len(unreachable) == 1

    run(agent, body)


def test_a_refused_token_is_one_error_and_an_acl_view(
        agent: Agent, caplog: pytest.LogCaptureFixture) -> None:
    double_only(agent)
    agent.double = AgentDouble(token=TOKEN)
    wrong = "0badc0de-0000-4000-8000-000000000000"
    caplog.set_level(logging.DEBUG)

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(),))
        await until(lambda: r.views.last.error_kind == "acl", "an acl view")
        await until(lambda: r.source.failed_calls >= 6, "retried")
        errors = [rec for rec in caplog.records if rec.name == "composemesh.pilot.consul"
                  and rec.levelno >= logging.WARNING]
        assert len(errors) == 1 and errors[0].levelno == logging.ERROR
        assert "token is refused (ACL)" in errors[0].getMessage()
        assert not r.views.last.reachable
        assert wrong not in caplog.text and TOKEN not in caplog.text
        assert wrong not in repr(r.views.last) and wrong not in repr(r.source.settings)

    run(agent, body, token=wrong, acl_retry=0.1)


def test_the_right_token_registers(agent: Agent) -> None:
    double_only(agent)
    agent.double = AgentDouble(token=TOKEN)

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(),))
        await until(lambda: _has(r, "web", 1), "registered")

    run(agent, body, token=TOKEN)


# --------------------------------------------------------------------------------- import


async def register_plain(agent: Agent, name: str, sid: str, address: str, port: int,
                         *, ttl: bool = False) -> None:
    """A VM's kind of registration: no Meta, a plain address and port."""
    body: dict[str, Any] = {"Name": name, "ID": sid, "Address": address, "Port": port}
    if ttl:
        body["Check"] = {"CheckID": f"service:{sid}", "TTL": "30s", "Status": "passing"}
    headers = {"X-Consul-Token": agent.token} if agent.token else {}
    async with aiohttp.ClientSession(headers=headers) as http, \
            http.put(f"{agent.address}/v1/agent/service/register", json=body) as resp:
        assert resp.status == 200, await resp.text()


async def deregister_plain(agent: Agent, sid: str) -> None:
    headers = {"X-Consul-Token": agent.token} if agent.token else {}
    async with aiohttp.ClientSession(headers=headers) as http, \
            http.put(f"{agent.address}/v1/agent/service/deregister/{sid}") as resp:
        assert resp.status == 200


def test_a_plain_service_shows_up_within_a_second_and_goes(agent: Agent) -> None:
    async def body(r: Run) -> None:
        await until(lambda: r.views.last.reachable, "contact")
        payments = agent.name("payments")
        sid = f"{payments}-vm-1"
        started = time.monotonic()
        await register_plain(agent, payments, sid, "198.51.100.7", 8080, ttl=True)
        await until(lambda: r.views.last.imported.get(payments), "payments imported")
        assert r.views.at[-1] - started < 1.0
        [instance] = r.views.last.imported[payments]
        assert (instance.id, instance.address, instance.port, instance.project,
                instance.spiffe) == (sid, "198.51.100.7", 8080, None, None)
        assert r.views.last.changed_at > 0
        # critical: out of the passing answers, so out of the view
        await r.observer.fail_ttl(f"service:{sid}")
        took = await until(lambda: payments not in r.views.last.imported, "critical: gone")
        assert took < 1.0
        await r.observer.pass_ttl(f"service:{sid}")
        await until(lambda: payments in r.views.last.imported, "passing: back")
        await deregister_plain(agent, sid)
        took = await until(lambda: payments not in r.views.last.imported, "deregistered: gone")
        assert took < 1.0

    run(agent, body)


def test_other_projects_and_hosts_are_imported_own_registrations_never(agent: Agent) -> None:
    async def body(r: Run) -> None:
        web = agent.name("web")
        r.source.workloads_changed(named(agent, (workload(), workload("web", 2))))
        await until(lambda: _has(r, "web", 2), "own instances registered")
        other_host = ConsulSettings(address=agent.address, token=agent.token,
                                    host_address=OTHER_HOST)
        async with ConsulClient(other_host) as there:
            # another project's web, and a project of the same name on another host
            theirs = ExportedInstance(project="other", compose_service="web", instance=1,
                                      service=web, version="v3",
                                      spiffe="spiffe://cluster.local/ns/other/sa/web")
            same_name = replace(theirs, project="shop", version="v1")
            started = time.monotonic()
            sid_theirs = await there.register(theirs)
            await there.pass_ttl(check_id(sid_theirs))
            await until(lambda: r.imported("web"), "the other project's web imported")
            assert time.monotonic() - started < 1.0
            assert [i.id for i in r.imported("web")] == [sid_theirs]
            assert r.imported("web")[0].project == "other"
            assert r.imported("web")[0].address == OTHER_HOST
            # a registration on this host's address but of another project is foreign too;
            # one of this project on another host (another "shop" elsewhere) as well
            sid_same = await there.register(replace(same_name, compose_service="web-b"))
            await there.pass_ttl(check_id(sid_same))
            await until(lambda: len(r.imported("web")) == 2, "both foreign instances")
            ids = [i.id for i in r.imported("web")]
            assert ids == sorted(ids)  # deterministic order
            assert not any(i.address == HOST and i.project == "shop"
                           for i in r.imported("web"))
            await there.deregister(sid_theirs)
            await there.deregister(sid_same)
            await until(lambda: not r.imported("web"), "foreign ones gone")
        assert web in r.views.last.exported and web not in r.views.last.imported

    run(agent, body)


def test_consuls_own_service_is_not_imported(agent: Agent) -> None:
    double_only(agent)

    async def body(r: Run) -> None:
        await until(lambda: r.views.last.reachable, "contact")
        assert "consul" in await r.catalog()
        assert "consul" not in r.views.last.imported
        assert "consul" not in r.source._watches

    run(agent, body)


def test_blocking_queries_block(agent: Agent) -> None:
    double = double_only(agent)

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(), workload("db")))
        await register_plain(agent, "payments", "payments-1", "198.51.100.7", 8080)
        await until(lambda: r.views.last.imported.get("payments"), "payments imported")
        await until(lambda: set(r.source._watches) == {"web", "db", "payments"},
                    "one health watch per name")
        await until(quiet_for(double, 0.5), "the answers to the registrations above came")
        before = len(double.requests)
        quiet = time.monotonic()
        await until(lambda: time.monotonic() - quiet >= 2.0, "two quiet seconds", bound=3)
        during = double.requests[before:]
        assert len(during) <= 6, during  # a handful, not hundreds
        # the last read of each watch carries an index: it hangs until a change or its wait
        last: dict[str, str] = {}
        for method, path in double.requests:
            if method == "GET":
                last[path.split("?")[0]] = path
        assert set(last) == {"/v1/catalog/services", "/v1/health/service/web",
                             "/v1/health/service/db", "/v1/health/service/payments"}
        assert all("index=" in p and "wait=60000ms" in p for p in last.values()), last

    # a TTL pass every 10s: none in the quiet 2s
    run(agent, body, ttl_interval=10.0)


def quiet_for(double: AgentDouble, seconds: float) -> Callable[[], bool]:
    """A condition: no request reached ``double`` for ``seconds``."""
    seen = [len(double.requests), time.monotonic()]

    def check() -> bool:
        if len(double.requests) != seen[0]:
            seen[:] = [len(double.requests), time.monotonic()]
        return time.monotonic() - seen[1] >= seconds

    return check


def test_a_name_that_leaves_the_catalog_stops_its_watch(agent: Agent) -> None:
    double_only(agent)

    async def body(r: Run) -> None:
        await register_plain(agent, "payments", "payments-1", "198.51.100.7", 8080)
        await until(lambda: "payments" in r.source._watches, "watched")
        await until(lambda: r.views.last.imported.get("payments"), "imported")
        await deregister_plain(agent, "payments-1")
        await until(lambda: "payments" not in r.source._watches, "the watch stopped")
        await until(lambda: "payments" not in r.views.last.imported, "and its instances")

    run(agent, body)


def test_imported_instances_are_kept_while_consul_is_away(agent: Agent) -> None:
    double_only(agent)

    async def body(r: Run) -> None:
        await register_plain(agent, "payments", "payments-1", "198.51.100.7", 8080)
        await until(lambda: r.views.last.imported.get("payments"), "imported")
        await agent.stop()
        await until(lambda: not r.views.last.reachable, "unreachable")
        assert [i.id for i in r.views.last.imported["payments"]] == ["payments-1"]
        await agent.start()
        await until(lambda: r.views.last.reachable, "reachable again")
        assert [i.id for i in r.views.last.imported["payments"]] == ["payments-1"]

    run(agent, body)


# ------------------------------------------------------------------------------ shutdown


def test_cancellation_deregisters_everything(agent: Agent) -> None:
    async def body(r: Run) -> None:
        r.source.workloads_changed(named(agent, (workload(), workload("web", 2),
                                                 workload("db"))))
        await until(lambda: _has(r, "web", 2), "web registered")
        await until(lambda: _has(r, "db", 1), "db registered")
        r.task.cancel()
        await asyncio.gather(r.task, return_exceptions=True)
        names = await r.catalog()
        assert agent.name("web") not in names and agent.name("db") not in names

    run(agent, body)


def test_cancellation_with_consul_away_is_bounded(agent: Agent) -> None:
    double_only(agent)

    async def body(r: Run) -> None:
        r.source.workloads_changed((workload(),))
        await until(lambda: r.views.last.exported, "registered")
        await agent.stop()
        started = time.monotonic()
        r.task.cancel()
        await asyncio.gather(r.task, return_exceptions=True)
        assert time.monotonic() - started < 1.5

    run(agent, body, deregister_timeout=1.0)


def test_cancellation_against_a_silent_agent_is_bounded() -> None:
    # an agent that accepts connections and never answers: the deregistrations time out
    async def main() -> None:
        asked: list[str] = []

        async def hang(request: web.Request) -> web.Response:
            asked.append(request.path)
            await asyncio.sleep(30)
            return web.Response()

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", hang)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        settings = ConsulSettings(address=f"http://127.0.0.1:{server.port}", host_address=HOST)
        source = ConsulSource(settings, project="shop", trust_domain="cluster.local",
                              on_view=Views(), deregister_timeout=0.5)
        source._registered["shop-web-1@192.0.2.10"] = ExportedInstance(
            "shop", "web", 1, "web", "v1", "spiffe://cluster.local/ns/shop/sa/web")
        task = asyncio.create_task(source.run())
        await until(lambda: asked, "the source is asking")
        started = time.monotonic()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert time.monotonic() - started < 1.5
        await server.close()

    asyncio.run(main())


# ------------------------------------------------------------------------ the pilot's wiring


def test_the_pilot_wires_the_source_only_when_consul_is_set() -> None:
    from composemesh.model.settings import MeshSettings
    from composemesh.pilot.main import consul_source, feeding

    class Pilot:
        async def update_consul(self, view: ConsulView) -> None: ...

    pilot: Any = Pilot()
    assert consul_source(MeshSettings(), "shop", pilot) is None
    settings: Any = replace(MeshSettings(), trust_domain="example.org")
    consul = ConsulSettings(address="http://c:8500", host_address=HOST)
    if hasattr(settings, "consul"):
        settings = replace(settings, consul=consul)
    else:  # until MeshSettings has the field
        settings = type("WithConsul", (), {"consul": consul, "trust_domain": "example.org"})()
    source = consul_source(settings, "shop", pilot)
    assert source is not None and source.trust_domain == "example.org"
    assert source.settings is consul and source.project == "shop"

    delivered: list[tuple[Workload, ...]] = []

    async def to_pilot(workloads: tuple[Workload, ...]) -> None:
        delivered.append(workloads)

    async def main() -> None:
        both = feeding(source, to_pilot)
        await both((workload(),))
        assert delivered == [(workload(),)] and source._workloads == (workload(),)
        assert feeding(None, to_pilot) is to_pilot

    asyncio.run(main())
