"""The outbound HTTP path end to end on loopback: routing, retries, timeouts, faults, ejection.

Real HTTP servers (aiohttp.web) listen on 127.0.0.2 and 127.0.0.3, one per version of a
mesh service "reviews"; the proxy's table comes from a snapshot applied through the same
ConfigStore and applier as in production. SO_ORIGINAL_DST needs an iptables redirect, which
loopback tests do not have: the forwarder's resolver is injected to name 127.0.0.2 (an
endpoint of "reviews") as the original destination instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from composemesh.model.routing import (
    FaultAbort,
    FaultDelay,
    FaultPolicy,
    HttpMatch,
    HttpRoute,
    OutlierPolicy,
    RetryPolicy,
    ServiceRouting,
    StringMatch,
    WeightedSubset,
)
from composemesh.model.snapshot import ProxyIdentity, Snapshot, encode_snapshot
from composemesh.model.wire import to_builtins
from composemesh.proxy.admin import AdminContext, build_admin_app
from composemesh.proxy.http import HttpPath
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.router import RouterSwitch
from composemesh.proxy.server import routing_applier, serve
from composemesh.proxy.stats import OUTBOUND, ProxyStats
from composemesh.proxy.tcp import Forwarder
from tests.support import free_port

from .conftest import run_on
from .pilot_double import PilotDouble
from .test_server import config_on_free_ports

V1, V2, V3 = "127.0.0.2", "127.0.0.3", "127.0.0.4"
ME = ProxyIdentity(node="shop-web-netns-1", project="shop", compose_service="web-v1",
                   service="web", version="v1")
Behave = Callable[["Upstream", web.Request], Awaitable[web.StreamResponse | None]]


def route(*destinations: tuple[str, int], name: str = "default",
          matches: tuple[HttpMatch, ...] = (), retries: RetryPolicy | None = None,
          timeout: float | None = None, fault: FaultPolicy | None = None) -> HttpRoute:
    return HttpRoute(name=name, matches=matches,
                     destinations=tuple(WeightedSubset(v, w) for v, w in destinations),
                     retries=retries or RetryPolicy(), timeout_s=timeout, fault=fault)


def routing(*routes: HttpRoute, load_balancer: str = "round_robin",
            outlier: OutlierPolicy | None = None) -> ServiceRouting:
    return ServiceRouting(service="reviews", routes=routes,
                          load_balancer=load_balancer, outlier=outlier)  # type: ignore[arg-type]


def settings(r: ServiceRouting, endpoints: list[tuple[str, str]],
             protocol: str | None = "http") -> dict[str, Any]:
    """``endpoints``: (version, address); node names follow the holder containers'."""
    return {
        "services": {"reviews": [
            {"node": f"shop-reviews-{version}-netns-{i}", "version": version, "address": address}
            for i, (version, address) in enumerate(endpoints, 1)]},
        "routing": {"reviews": to_builtins(r)},  # JSON: a test may break a field
        "protocols": {"reviews": {"default": protocol, "ports": {}}},
    }


def snapshot(version: str, s: dict[str, Any]) -> bytes:
    return encode_snapshot(Snapshot(version=version, identity=ME, settings=s))


class Upstream:
    """A real HTTP server on one loopback address: says which version it is, and counts."""

    def __init__(self, address: str, version: str, behave: Behave | None = None) -> None:
        self.address = address
        self.version = version
        self.behave = behave
        self.requests = 0
        self.peers: set[tuple[str, int]] = set()  # one per connection the proxy opened
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        assert request.transport is not None
        self.peers.add(request.transport.get_extra_info("peername"))
        if self.behave is not None:
            response = await self.behave(self, request)
            if response is not None:
                return response
        body = await request.read()
        return web.Response(text=self.version, headers={
            "x-version": self.version, "x-body-length": str(len(body))})

    async def start(self, port: int) -> int:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.address, port, reuse_address=True).start()
        return int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Mesh:
    """A proxy in front of "reviews" and the upstreams behind it."""

    port: int  # where the app (the test) connects
    service_port: int  # the port every connection "was dialed" to, at the first endpoint
    stats: ProxyStats
    http: HttpPath
    store: ConfigStore
    outbound: Forwarder
    upstreams: dict[str, Upstream] = field(default_factory=dict)  # by address

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def offer(self, version: str, s: dict[str, Any]) -> Any:
        return self.store.offer(snapshot(version, s))


@contextlib.asynccontextmanager
async def mesh(r: ServiceRouting, endpoints: list[tuple[str, str]] | None = None, *,
               behave: dict[str, Behave] | None = None, protocol: str | None = "http",
               seed: int = 1) -> AsyncIterator[Mesh]:
    """``endpoints`` (version, address) default to v1 on V1 and v2 on V2; an address in
    ``endpoints`` but not served (V3) has nobody listening."""
    endpoints = endpoints or [("v1", V1), ("v2", V2)]
    behave = behave or {}
    upstreams: dict[str, Upstream] = {}
    port = 0
    for version, address in endpoints:
        if address == V3 or address in upstreams:
            continue
        upstream = upstreams[address] = Upstream(address, version, behave.get(address))
        port = await upstream.start(port)
    port = port or free_port()
    dialed = endpoints[0][1]  # the app dialed the service's name: it resolved to this one
    stats = ProxyStats()
    switch = RouterSwitch()
    http = HttpPath(stats, switch=switch)
    outbound = Forwarder(OUTBOUND, stats, switch.choose, resolver=lambda sock: (dialed, port))
    store = ConfigStore([routing_applier(switch, http, random.Random(seed))])
    answer = store.offer(snapshot("s1", settings(r, endpoints, protocol)))
    assert answer.ok, answer.reason
    listener = await asyncio.get_running_loop().create_server(outbound, "127.0.0.1", 0)
    try:
        yield Mesh(listener.sockets[0].getsockname()[1], port, stats, http, store, outbound,
                   upstreams)
    finally:
        listener.close()
        outbound.abort_all()
        http.close()
        for upstream in upstreams.values():
            await upstream.stop()


async def get_all(m: Mesh, n: int, path: str = "/", method: str = "GET",
                  headers: dict[str, str] | None = None, data: bytes | None = None,
                  ) -> list[tuple[int, str]]:
    """``n`` requests one after another on one client; (status, x-version or body)."""
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            async with session.request(method, m.url(path), headers=headers,
                                       data=data) as response:
                text = await response.text()
                out.append((response.status, response.headers.get("x-version", text)))
    return out


def fails_every_other(status: int = 503) -> Behave:
    async def behave(upstream: Upstream, request: web.Request) -> web.Response | None:
        await request.read()
        if upstream.requests % 2 == 1:
            return web.Response(status=status, text="try again")
        return None

    return behave


def sleeps(seconds: float, first_only: bool = False) -> Behave:
    async def behave(upstream: Upstream, request: web.Request) -> web.Response | None:
        if not first_only or upstream.requests == 1:
            await asyncio.sleep(seconds)
        return None

    return behave


# --------------------------------------------------------------------------- routing


def test_weighted_split_over_a_thousand_requests(loop_kind: str) -> None:
    async def main() -> None:
        async with mesh(routing(route(("v1", 80), ("v2", 20)))) as m:
            answers = await get_all(m, 1000)
            assert {status for status, _ in answers} == {200}
            v2 = sum(1 for _, version in answers if version == "v2")
            assert abs(v2 / 1000 - 0.20) <= 0.03, v2
            http = m.stats.http_totals()
            assert http["requests_by_version"] == {"reviews": {"v1": 1000 - v2, "v2": v2}}
            assert http["responses_by_code"] == {"200": 1000}
            assert http["requests_by_endpoint"]["reviews"]["shop-reviews-v2-netns-2"] == v2

    run_on(loop_kind, main())


def test_a_header_match_sends_one_user_to_v2(loop_kind: str) -> None:
    jason = HttpMatch(headers=(("end-user", StringMatch("exact", "jason")),))
    async def main() -> None:
        async with mesh(routing(route(("v2", 100), name="jason", matches=(jason,)),
                                route(("v1", 100)))) as m:
            assert {v for _, v in await get_all(m, 20, headers={"End-User": "jason"})} == {"v2"}
            assert {v for _, v in await get_all(m, 20, headers={"End-User": "bob"})} == {"v1"}
            assert {v for _, v in await get_all(m, 20)} == {"v1"}

    run_on(loop_kind, main())


def test_no_matching_route_is_a_local_404(loop_kind: str) -> None:
    api = HttpMatch(path=StringMatch("prefix", "/api/"))

    async def main() -> None:
        async with mesh(routing(route(("v1", 100), matches=(api,)))) as m, \
                aiohttp.ClientSession() as session:
            async with session.get(m.url("/api/books")) as response:
                assert (response.status, await response.text()) == (200, "v1")
                assert "server" not in {k.lower() for k in response.headers} or \
                    response.headers["server"] != "composemesh"
            async with session.get(m.url("/admin")) as response:
                assert response.status == 404
                assert await response.text() == "no route to reviews"
                assert response.headers["server"] == "composemesh"
                assert response.headers["content-type"] == "text/plain"
            assert m.stats.http_totals()["responses_by_flags"] == {"-": 1, "NR": 1}

    run_on(loop_kind, main())


def test_a_version_without_endpoints_is_a_local_503(loop_kind: str) -> None:
    async def main() -> None:
        async with mesh(routing(route(("v3", 100)))) as m:
            assert await get_all(m, 2) == [(503, "no healthy upstream")] * 2
            assert m.stats.http_totals()["responses_by_flags"] == {"UH": 2}

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- retries


def test_retries_turn_every_other_503_into_all_200s(loop_kind: str) -> None:
    async def main() -> None:
        retries = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}))
        async with mesh(routing(route(("v1", 100), retries=retries)),
                        behave={V1: fails_every_other()}) as m:
            answers = await get_all(m, 50)
            assert answers == [(200, "v1")] * 50
            assert m.upstreams[V1].requests == 100  # each 503 was tried again
            http = m.stats.http_totals()
            assert http["retries"] == 50
            assert http["responses_by_code"] == {"200": 50}
            # each 503 was read to its end and its connection kept: the retry, sent while
            # it was read, needed a second one, and that is all
            assert len(m.upstreams[V1].peers) == 2

    run_on(loop_kind, main())


def test_post_is_not_retried_unless_asked(loop_kind: str) -> None:
    async def main() -> None:
        retries = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}))
        async with mesh(routing(route(("v1", 100), retries=retries)),
                        behave={V1: fails_every_other()}) as m:
            answers = await get_all(m, 10, method="POST", data=b"order=1")
            assert [status for status, _ in answers] == [503, 200] * 5
            assert m.stats.retries == 0
            asked = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}),
                                retry_non_idempotent=True)
            answer = m.offer("s2", settings(routing(route(("v1", 100), retries=asked)),
                                            [("v1", V1)]))
            assert answer.ok, answer.reason
            answers = await get_all(m, 10, method="POST", data=b"order=1")
            assert answers == [(200, "v1")] * 10
            assert m.stats.retries == 10  # 503 to every first try now: the upstream's count

    run_on(loop_kind, main())


def test_retries_exhausted_pass_the_last_answer_on(loop_kind: str) -> None:
    async def always_503(upstream: Upstream, request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    async def main() -> None:
        retries = RetryPolicy(attempts=2, retry_on=frozenset({"5xx"}))
        async with mesh(routing(route(("v1", 100), retries=retries)),
                        behave={V1: always_503}) as m:
            assert await get_all(m, 1) == [(503, "down")]
            assert m.upstreams[V1].requests == 3
            assert m.stats.http_totals()["responses_by_flags"] == {"URX": 1}

    run_on(loop_kind, main())


def test_a_connect_failure_is_retried_on_the_other_endpoint(loop_kind: str) -> None:
    async def main() -> None:
        retries = RetryPolicy(attempts=1, retry_on=frozenset({"connect-failure"}))
        async with mesh(routing(route(("v1", 100), retries=retries), outlier=None),
                        endpoints=[("v1", V1), ("v1", V3)]) as m:
            answers = await get_all(m, 20)
            assert answers == [(200, "v1")] * 20
            # round robin: every try after the first retry comes to the dead one first
            assert m.stats.retries == 19
            assert m.stats.http_totals()["requests_by_endpoint"] == {
                "reviews": {"shop-reviews-v1-netns-1": 20}}

    run_on(loop_kind, main())


def test_a_connect_failure_without_retries_is_a_503(loop_kind: str) -> None:
    async def main() -> None:
        async with mesh(routing(route(("v1", 100)), outlier=None),
                        endpoints=[("v1", V3)]) as m:
            status, body = (await get_all(m, 1))[0]
            assert status == 503
            assert body.startswith("upstream connect error")
            assert m.stats.http_totals()["responses_by_flags"] == {"UF": 1}

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- timeouts


async def timed_get(m: Mesh, path: str = "/") -> tuple[int, str, float]:
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.get(m.url(path)) as response:
            text = await response.text()
            return response.status, text, time.monotonic() - started


def test_the_per_try_timeout_answers_504_in_time(loop_kind: str) -> None:
    async def main() -> None:
        retries = RetryPolicy(attempts=0, per_try_timeout_s=0.3)
        async with mesh(routing(route(("v1", 100), retries=retries)),
                        behave={V1: sleeps(3)}) as m:
            status, text, elapsed = await timed_get(m)
            assert (status, text) == (504, "upstream request timeout")
            assert 0.3 <= elapsed <= 0.8, elapsed
            assert m.stats.http_totals()["responses_by_flags"] == {"UT": 1}

    run_on(loop_kind, main())


def test_the_route_timeout_answers_504_in_time_whatever_the_retries(loop_kind: str) -> None:
    async def main() -> None:
        retries = RetryPolicy(attempts=5, per_try_timeout_s=0.2)
        async with mesh(routing(route(("v1", 100), retries=retries, timeout=0.5)),
                        behave={V1: sleeps(3)}) as m:
            status, text, elapsed = await timed_get(m)
            assert (status, text) == (504, "upstream request timeout")
            assert 0.5 <= elapsed <= 1.0, elapsed
            assert m.upstreams[V1].requests == 3  # tries at 0, 0.2 and 0.4 s

    run_on(loop_kind, main())


def test_a_per_try_timeout_is_retried(loop_kind: str) -> None:
    async def main() -> None:
        retries = RetryPolicy(attempts=1, per_try_timeout_s=0.2)
        async with mesh(routing(route(("v1", 100), retries=retries)),
                        behave={V1: sleeps(3, first_only=True)}) as m:
            status, text, elapsed = await timed_get(m)
            assert (status, text) == (200, "v1")
            assert 0.2 <= elapsed <= 0.7, elapsed
            assert m.stats.retries == 1

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- faults


def test_an_abort_fault_hits_its_percentage_of_a_thousand_requests(loop_kind: str) -> None:
    async def main() -> None:
        fault = FaultPolicy(abort=FaultAbort(status=418, percent=30))
        async with mesh(routing(route(("v1", 100), fault=fault))) as m, \
                aiohttp.ClientSession() as session:
            aborted = 0
            for _ in range(1000):
                async with session.get(m.url()) as response:
                    body = await response.text()
                    if response.status == 418:
                        aborted += 1
                        assert response.headers["server"] == "composemesh"
                        assert body == "fault filter abort"
            assert abs(aborted / 1000 - 0.30) <= 0.03, aborted
            assert m.upstreams[V1].requests == 1000 - aborted
            assert m.stats.http_totals()["responses_by_flags"] == {
                "FI": aborted, "-": 1000 - aborted}

    run_on(loop_kind, main())


def test_a_delay_fault_delays(loop_kind: str) -> None:
    async def main() -> None:
        fault = FaultPolicy(delay=FaultDelay(seconds=0.3, percent=100))
        async with mesh(routing(route(("v1", 100), fault=fault))) as m:
            status, text, elapsed = await timed_get(m)
            assert (status, text) == (200, "v1")
            assert 0.3 <= elapsed <= 0.8, elapsed
            assert m.stats.http_totals()["responses_by_flags"] == {"DI": 1}
            no_fault = m.offer("s2", settings(routing(route(("v1", 100))), [("v1", V1)]))
            assert no_fault.ok
            assert (await timed_get(m))[2] < 0.2

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- endpoints


def test_outlier_detection_ejects_a_failing_endpoint(loop_kind: str) -> None:
    async def broken(upstream: Upstream, request: web.Request) -> web.Response:
        return web.Response(status=500, text="broken")

    async def main() -> None:
        outlier = OutlierPolicy(consecutive_errors=3, base_ejection_s=30,
                                max_ejection_percent=50)
        async with mesh(routing(route(("v1", 100)), outlier=outlier),
                        endpoints=[("v1", V1), ("v1", V2)], behave={V2: broken}) as m:
            answers = await get_all(m, 60)
            assert [s for s, _ in answers].count(500) == 3
            assert m.upstreams[V2].requests == 3  # then ejected: no more traffic
            assert answers[-50:] == [(200, "v1")] * 50
            assert m.stats.ejections == 1

    run_on(loop_kind, main())


def test_keep_alive_reuses_upstream_connections(loop_kind: str) -> None:
    async def main() -> None:
        async with mesh(routing(route(("v1", 50), ("v2", 50)))) as m:
            await get_all(m, 200)
            assert m.upstreams[V1].requests + m.upstreams[V2].requests == 200
            assert len(m.upstreams[V1].peers) == len(m.upstreams[V2].peers) == 1
            assert m.http.pool.opened == 2
            # and with 20 clients at once: at most one connection per request in flight
            async with aiohttp.ClientSession() as session:
                async def one() -> int:
                    async with session.get(m.url()) as response:
                        await response.read()
                        return response.status
                for _ in range(10):
                    assert set(await asyncio.gather(*(one() for _ in range(20)))) == {200}
            assert m.http.pool.opened <= 2 + 20 * 2
            assert m.http.pool.opened < 200

    run_on(loop_kind, main())


def test_least_request_prefers_the_idle_endpoint(loop_kind: str) -> None:
    async def slow_once(upstream: Upstream, request: web.Request) -> None:
        if request.path == "/slow":
            await asyncio.sleep(1.0)

    async def main() -> None:
        async with mesh(routing(route(("v1", 100)), load_balancer="least_request"),
                        endpoints=[("v1", V1), ("v1", V2)],
                        behave={V1: slow_once, V2: slow_once}) as m, \
                aiohttp.ClientSession() as session:
            async def get(path: str) -> str:
                async with session.get(m.url(path)) as response:
                    await response.read()
                    return str(response.status)

            slow = asyncio.create_task(get("/slow"))
            await asyncio.sleep(0.2)
            busy = V1 if m.upstreams[V1].requests else V2
            for _ in range(10):
                await get("/fast")
            assert m.upstreams[busy].requests == 1  # the one in flight got nothing more
            await slow

    run_on(loop_kind, main())


# --------------------------------------------------------------------------- snapshots


def test_a_snapshot_with_broken_routing_is_nacked_and_the_old_table_kept(loop_kind: str) -> None:
    async def main() -> None:
        async with mesh(routing(route(("v2", 100)))) as m:
            table = m.http.router.table
            bad = settings(routing(route(("v1", 100))), [("v1", V1), ("v2", V2)])
            bad["routing"]["reviews"]["routes"][0]["retries"]["retry_on"] = ["sometimes"]
            answer = m.offer("s2", bad)
            assert not answer.ok
            assert answer.version == "s2"
            assert answer.reason.startswith(
                "$.settings.routing.reviews.routes[0].retries: retry_on: 'sometimes'")
            assert m.store.snapshot is not None and m.store.snapshot.version == "s1"
            assert m.http.router.table is table
            assert {v for _, v in await get_all(m, 5)} == {"v2"}  # still the old routes

            bad = settings(routing(route(("v1", 100))), [("v1", V1)])
            bad["services"]["reviews"][0]["address"] = "reviews"
            assert not m.offer("s3", bad).ok
            assert {v for _, v in await get_all(m, 5)} == {"v2"}

            assert m.offer("s4", settings(routing(route(("v1", 100))), [("v1", V1)])).ok
            assert {v for _, v in await get_all(m, 5)} == {"v1"}

    run_on(loop_kind, main())


def test_admin_shows_the_table_and_the_http_counters() -> None:
    async def main() -> None:
        async with mesh(routing(route(("v1", 100)))) as m:
            await get_all(m, 3)
            ctx = AdminContext(stats=m.stats, store=m.store, http=m.http)
            dump = ctx.config_dump()
            assert dump["routing_table"]["reviews"]["endpoints"][0]["address"] == V1
            assert dump["routing_table"]["reviews"]["routing"]["routes"][0]["name"] == "default"
            assert dump["upstream_pool"]["opened"] == 1
            async with TestClient(TestServer(build_admin_app(ctx))) as client:
                stats = await (await client.get("/stats")).json()
            assert stats["http"]["requests_by_version"] == {"reviews": {"v1": 3}}
            assert stats["http"]["responses_by_code"] == {"200": 3}
            assert (stats["http"]["retries"], stats["http"]["ejections"]) == (0, 0)
            text = m.stats.prometheus_text()
            assert 'istio_requests_total{' in text and 'reporter="source"' in text
            assert 'destination_service="reviews"' in text
            assert 'response_code="200"' in text
            assert 'istio_request_duration_milliseconds_bucket{' in text
            assert 'le="0.5"' in text and 'le="3.6e+06"' in text
            assert 'istio_response_bytes_count{' in text

    asyncio.run(main())


def test_an_outlier_ejection_survives_a_snapshot_that_keeps_the_routing(loop_kind: str) -> None:
    async def broken(upstream: Upstream, request: web.Request) -> web.Response:
        return web.Response(status=503, text="broken")

    async def main() -> None:
        outlier = OutlierPolicy(consecutive_errors=2, base_ejection_s=30, max_ejection_percent=50)
        r = routing(route(("v1", 100)), outlier=outlier)
        endpoints = [("v1", V1), ("v1", V2)]
        async with mesh(r, endpoints, behave={V2: broken}) as m:
            await get_all(m, 10)
            assert m.upstreams[V2].requests == 2
            assert m.offer("s2", {**settings(r, endpoints), "unrelated": 1}).ok
            await get_all(m, 10)
            assert m.upstreams[V2].requests == 2

    run_on(loop_kind, main())


def test_serve_routes_http_by_the_pilots_snapshots(loop_kind: str) -> None:
    """The whole proxy process: snapshots from a pilot (test double) drive the HTTP path."""

    async def main() -> None:
        upstreams = [Upstream(V1, "v1"), Upstream(V2, "v2")]
        port = await upstreams[0].start(0)
        await upstreams[1].start(port)
        pilot = PilotDouble(hold=0.2)
        config = config_on_free_ports(await pilot.start(), lambda sock: (V1, port))
        stop = asyncio.Event()
        contexts: list[AdminContext] = []
        serving = asyncio.create_task(serve(config, stop, contexts))
        endpoints = [("v1", V1), ("v2", V2)]

        async def answered(version: str) -> Any:
            for _ in range(250):
                if pilot.answers and pilot.answers[-1].version == version:
                    return pilot.answers[-1]
                await asyncio.sleep(0.02)
            raise AssertionError(f"no answer to {version}")

        async def versions() -> set[str]:
            async with aiohttp.ClientSession() as session:
                seen = set()
                for _ in range(5):
                    async with session.get(f"http://127.0.0.1:{config.outbound_port}/") as r:
                        seen.add(await r.text())
                return seen

        pilot.publish("s1", snapshot("s1", settings(routing(route(("v2", 100))), endpoints)))
        assert (await answered("s1")).ok
        assert await versions() == {"v2"}
        broken = settings(routing(route(("v1", 100))), endpoints)
        broken["protocols"]["reviews"]["default"] = "h2"
        pilot.publish("s2", snapshot("s2", broken))
        nack = await answered("s2")
        assert not nack.ok
        assert "$.settings.protocols.reviews.default: Invalid enum value 'h2'" in nack.reason
        assert await versions() == {"v2"}
        pilot.publish("s3", snapshot("s3", settings(routing(route(("v1", 100))), endpoints)))
        assert (await answered("s3")).ok
        assert await versions() == {"v1"}
        dump = contexts[0].config_dump()
        assert dump["version"] == "s3"
        assert [e["address"] for e in dump["routing_table"]["reviews"]["endpoints"]] == [V1, V2]
        assert contexts[0].stats.http_totals()["requests_by_version"] == {
            "reviews": {"v1": 5, "v2": 10}}

        stop.set()
        await asyncio.wait_for(serving, 5)
        await pilot.stop()
        for upstream in upstreams:
            await upstream.stop()

    run_on(loop_kind, main())


def test_a_retry_goes_to_another_endpoint_than_the_one_that_failed(loop_kind: str) -> None:
    """least_request ties are broken at random: only the exclusion keeps the dead one out."""

    async def main() -> None:
        retries = RetryPolicy(attempts=1, retry_on=frozenset({"connect-failure"}))
        async with mesh(routing(route(("v1", 100), retries=retries), outlier=None,
                                load_balancer="least_request"),
                        endpoints=[("v1", V1), ("v1", V3)]) as m:
            assert await get_all(m, 40) == [(200, "v1")] * 40
            assert m.stats.retries > 5

    run_on(loop_kind, main())


def test_an_app_that_leaves_mid_request_frees_the_upstream_side(loop_kind: str) -> None:
    async def main() -> None:
        async with mesh(routing(route(("v1", 100))), behave={V1: sleeps(0.5)}) as m:
            reader, writer = await asyncio.open_connection("127.0.0.1", m.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
            for _ in range(100):
                if m.upstreams[V1].requests:
                    break
                await asyncio.sleep(0.01)
            assert len(m.http.pool.connections) == 1
            # gone: a reset (a FIN alone is a half-close, and gets its answer)
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await asyncio.sleep(0.1)
            assert not m.http.connections and not m.http.pool.connections
            assert m.http.pool.idle_count() == 0  # dropped, not pooled mid-response
            assert m.stats.http_totals()["responses_by_flags"] == {"DC": 1}
            assert await get_all(m, 1) == [(200, "v1")]

    run_on(loop_kind, main())
