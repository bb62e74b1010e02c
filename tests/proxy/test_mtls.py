"""Mutual TLS between two real proxies' data paths on loopback, and inbound enforcement.

Proxy A (the client's, outbound) and proxy B (the server's, inbound) run in this process with
real sockets and real TLS. No iptables here: B's inbound listener listens where A dials
(127.0.0.2:<port>), and B's original-destination lookup says the app (127.0.0.3:<port>),
as SO_ORIGINAL_DST would behind B's capture. The e2e tests run the same across containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from composemesh.ca import cert_to_pem, key_to_pem, make_csr, make_root, sign_workload
from composemesh.ca.pki import generate_key
from composemesh.ca.spiffe import WorkloadName
from composemesh.model.monitoring import Telemetry
from composemesh.model.policy import Operation, Policy
from composemesh.model.routing import ServiceRouting
from composemesh.model.snapshot import ProxyIdentity, Snapshot, encode_snapshot
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.selection import LocalNetwork, admits_plaintext
from composemesh.proxy.server import DataPath, data_path
from composemesh.proxy.stats import PeerLabels, ProxyStats
from composemesh.proxy.telemetry import Observer
from composemesh.proxy.upstream import UpstreamPool
from tests.support import free_port

from .test_http import route

TD = "cluster.local"
A_ADDR, B_ADDR, APP_ADDR, OUTSIDER = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.5"


@dataclass
class Pki:
    bundle: bytes
    root: Any
    key: Any

    def leaf(self, service: str) -> tuple[bytes, bytes]:
        """A certificate for ``service``, naming the workload ``<service>-v3`` of version v3
        in its subject (as the pilot's CA does from what it attested)."""
        key = generate_key()
        cert = sign_workload(make_csr(key), self.root, self.key,
                             f"spiffe://{TD}/ns/shop/sa/{service}",
                             workload=WorkloadName("shop", f"{service}-v3", "v3"))
        return cert_to_pem(cert) + cert_to_pem(self.root), key_to_pem(key)


def new_pki(name: str = "root") -> Pki:
    root, key = make_root(name, TD)
    return Pki(cert_to_pem(root), root, key)


def mesh_tls(pki: Pki, service: str, bundle: bytes | None = None) -> MeshTls:
    tls = MeshTls()
    chain, key = pki.leaf(service)
    tls.use(chain, key, bundle or pki.bundle)
    tls.name(TD, "shop")
    return tls


def snapshot(service: str, compose: str, s: dict[str, Any], version: str = "s1") -> bytes:
    identity = ProxyIdentity(node=f"shop-{compose}-netns-1", project="shop",
                             compose_service=compose, service=service, version="v1")
    return encode_snapshot(Snapshot(version=version, identity=identity,
                                    settings={"trust_domain": TD, **s}))


def client_settings(protocol: str | None) -> dict[str, Any]:
    r = ServiceRouting(service="reviews", routes=(route(("v1", 100)),))
    return {
        "services": {"reviews": [{"node": "shop-reviews-netns-1", "version": "v1",
                                  "address": B_ADDR}]},
        "routing": {"reviews": r},
        "protocols": {"reviews": {"default": protocol, "ports": {}}},
    }


def server_settings(protocol: str | None, mode: str = "STRICT", policies: tuple[Policy, ...] = (),
                    published: tuple[int, ...] = ()) -> dict[str, Any]:
    return {
        "mtls_mode": mode,
        "policies": {"reviews": policies} if policies else {},
        "published_ports": list(published),
        "networks": [{"name": "shop_default", "address": B_ADDR, "subnet": "127.0.0.0/8",
                      "gateway": A_ADDR}],
        "protocols": {"reviews": {"default": protocol, "ports": {}}},
    }


ONLY_PRODUCTPAGE = (Policy(name="only-frontend", sources=frozenset({"productpage"})),)


@dataclass
class Pair:
    port: int  # the service port: A's listener, B's inbound listener and the app all use it
    a_stats: ProxyStats
    b_stats: ProxyStats
    a_pool: UpstreamPool
    b_store: ConfigStore
    a_tls: MeshTls
    b_tls: MeshTls
    app_peers: list[str]
    app_headers: list[dict[str, str]]

    def url(self, path: str = "/") -> str:
        return f"http://{A_ADDR}:{self.port}{path}"


@contextlib.asynccontextmanager
async def pair(pki: Pki, *, protocol: str | None = "http", client: str = "productpage",
               a_tls: MeshTls | None = None, b_tls: MeshTls | None = None,
               app: Any = None, a_observer: Observer | None = None,
               b_observer: Observer | None = None, b_telemetry: Telemetry | None = None,
               **server: Any) -> AsyncIterator[Pair]:
    """Proxies A and B with mTLS between them; behind B an HTTP app, a TCP echo (``protocol``
    tcp), or ``app`` (an asyncio.start_server handler); ``protocol`` None: detected."""
    loop = asyncio.get_running_loop()
    app_peers: list[str] = []
    app_headers: list[dict[str, str]] = []
    port = free_port(APP_ADDR)
    cleanups: list[Any] = []
    try:
        # the app behind B: HTTP (says "reviews") or a TCP echo that answers after the EOF
        if app is not None:
            app_server = await asyncio.start_server(app, APP_ADDR, port)
            cleanups.append(_closer(app_server))
        elif protocol != "tcp":
            async def handle(request: web.Request) -> web.Response:
                app_peers.append(request.remote or "")
                app_headers.append({k.lower(): v for k, v in request.headers.items()})
                return web.Response(text="reviews")

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
            await runner.setup()
            await web.TCPSite(runner, APP_ADDR, port).start()
            cleanups.append(runner.cleanup)
        else:
            async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                data = await reader.read()  # until the client's FIN
                writer.write(b"echo:" + data)
                await writer.drain()
                writer.close()

            tcp_server = await asyncio.start_server(echo, APP_ADDR, port)
            cleanups.append(_closer(tcp_server))

        # proxy B, the app's sidecar: its inbound listener (SO_ORIGINAL_DST: the app)
        b = data_path(PeerLabels(), lambda: True, resolver=lambda sock: (APP_ADDR, port),
                      rng=random.Random(1), tls=b_tls or mesh_tls(pki, "reviews"),
                      observer=b_observer)
        b_store = ConfigStore([b.apply])
        settings = server_settings(protocol, **server)
        if b_telemetry is not None:
            settings["telemetry"] = b_telemetry
        answer = b_store.offer(snapshot("reviews", "reviews", settings))
        assert answer.ok, answer.reason
        b_listener = await loop.create_server(b.inbound, B_ADDR, port)
        cleanups.append(_closer(b_listener, b))

        # proxy A, the client's sidecar: its outbound listener (SO_ORIGINAL_DST: B)
        a = data_path(PeerLabels(), lambda: True, resolver=lambda sock: (B_ADDR, port),
                      rng=random.Random(1), tls=a_tls or mesh_tls(pki, client),
                      observer=a_observer)
        settings = client_settings(protocol)
        if b_telemetry is not None:
            settings["telemetry"] = b_telemetry
        answer = ConfigStore([a.apply]).offer(snapshot(client, client, settings))
        assert answer.ok, answer.reason
        a_listener = await loop.create_server(a.outbound, A_ADDR, port)
        cleanups.append(_closer(a_listener, a))
        yield Pair(port, a.stats, b.stats, a.http.pool, b_store, a.tls, b.tls, app_peers,
                   app_headers)
    finally:
        for cleanup in reversed(cleanups):
            await cleanup()


def _closer(server: asyncio.AbstractServer, path: DataPath | None = None) -> Any:
    async def close() -> None:
        server.close()
        if path is not None:
            path.outbound.abort_all()
            path.inbound.abort_all()
            path.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1)

    return close


async def get(url: str, n: int = 1, source: str | None = None) -> list[tuple[int, str]]:
    connector = aiohttp.TCPConnector(local_addr=(source, 0)) if source else None
    out = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(n):
            try:
                async with session.get(url) as response:
                    out.append((response.status, await response.text()))
            except aiohttp.ClientError as exc:
                out.append((0, type(exc).__name__))
    return out


async def tcp_call(host: str, port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, read to the end: what the demo's `tcp` client does."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()


@pytest.fixture(scope="module")
def pki() -> Pki:
    return new_pki()


# --------------------------------------------------------------------------- pure


def test_plaintext_admission_per_mode_port_and_source() -> None:
    nets = [LocalNetwork(__import__("ipaddress").ip_network("172.18.0.0/16"), "172.18.0.1")]
    assert admits_plaintext("PERMISSIVE", 9080, "172.18.0.9", (), nets)
    assert not admits_plaintext("STRICT", 9080, "172.18.0.9", (), nets)  # a container
    assert not admits_plaintext("STRICT", 9080, "172.18.0.9", (9080,), nets)  # ... even there
    assert admits_plaintext("STRICT", 9080, "172.18.0.1", (9080,), nets)  # the host
    assert admits_plaintext("STRICT", 9080, "10.9.8.7", (9080,), nets)  # outside, published
    assert not admits_plaintext("STRICT", 9081, "10.9.8.7", (9080,), nets)  # not published
    assert admits_plaintext("STRICT", 9080, "::ffff:172.18.0.1", (9080,), nets)
    assert not admits_plaintext("STRICT", 9080, "not-an-ip", (9080,), nets)


# --------------------------------------------------------------------------- HTTP


def test_http_between_two_proxies_is_mutual_tls_and_attributed(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki) as p:
            answers = await get(p.url(), 20)
            assert answers == [(200, "reviews")] * 20
            assert p.a_pool.tls_opened == 1  # one pooled mTLS connection carried all 20
            inbound = p.b_stats.http_inbound_totals()
            assert inbound["requests_by_security"] == {"mutual_tls": 20}
            assert inbound["requests_by_source"] == {"productpage": 20}
            text = p.b_stats.prometheus_text()
            assert 'reporter="destination"' in text
            assert f'source_principal="spiffe://{TD}/ns/shop/sa/productpage"' in text
            assert len(p.app_peers) == 20  # each handed on to the app by B

    asyncio.run(main())


def _series(text: str, name: str, reporter: str) -> list[dict[str, str]]:
    return [sample.labels for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and sample.labels["reporter"] == reporter]


PRODUCTPAGE = f"spiffe://{TD}/ns/shop/sa/productpage"
REVIEWS = f"spiffe://{TD}/ns/shop/sa/reviews"


@pytest.mark.parametrize("protocol", ["http", "tcp"])
def test_both_reporters_name_both_ends_workloads_versions_and_principals(
        pki: Pki, protocol: str) -> None:
    """The destination names the caller's workload and version from its certificate (the
    snapshot of A says productpage v1; its certificate, productpage-v3 v3: the certificate
    is what B can trust), and both sides name both principals, as Istio's labels do."""
    async def main() -> None:
        async with pair(pki, protocol=protocol) as p:
            if protocol == "http":
                assert await get(p.url(), 3) == [(200, "reviews")] * 3
                name = "istio_requests_total"
            else:
                assert await tcp_call(A_ADDR, p.port, b"hello") == b"echo:hello"
                name = "istio_tcp_connections_opened_total"
            [dest] = _series(p.b_stats.prometheus_text(), name, "destination")
            assert (dest["source_workload"], dest["source_version"]) == ("productpage-v3", "v3")
            assert dest["source_canonical_service"] == dest["source_app"] == "productpage"
            assert dest["source_principal"] == PRODUCTPAGE
            assert dest["destination_principal"] == REVIEWS
            assert dest["destination_workload"] == "reviews"
            assert dest["connection_security_policy"] == "mutual_tls"
            assert dest["request_protocol"] == protocol
            [source] = _series(p.a_stats.prometheus_text(), name, "source")
            assert source["source_workload"] == "productpage"
            assert source["source_principal"] == PRODUCTPAGE
            assert source["destination_principal"] == REVIEWS
            assert source["destination_version"] == "v1"

    asyncio.run(main())


def test_strict_refuses_plaintext_from_a_container_on_the_network(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki) as p:
            direct = f"http://{B_ADDR}:{p.port}/"
            assert (await get(direct, source=OUTSIDER))[0][0] == 0  # closed, no answer
            assert p.b_stats.totals()["inbound"]["errors_by_kind"]["plaintext_refused"] >= 1
            assert p.app_peers == []

    asyncio.run(main())


def test_permissive_lets_plaintext_in_unauthenticated(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki, mode="PERMISSIVE") as p:
            assert await get(f"http://{B_ADDR}:{p.port}/", source=OUTSIDER) == [(200, "reviews")]
            assert await get(p.url()) == [(200, "reviews")]  # and mTLS still works
            inbound = p.b_stats.http_inbound_totals()
            assert inbound["requests_by_security"] == {"none": 1, "mutual_tls": 1}

    asyncio.run(main())


def test_strict_lets_the_host_in_on_a_published_port_only(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki, published=(0,)) as p:  # the port is set below
            answer = p.b_store.offer(snapshot("reviews", "reviews", server_settings(
                "http", published=(p.port,)), version="s2"))
            assert answer.ok, answer.reason
            direct = f"http://{B_ADDR}:{p.port}/"
            assert await get(direct, source=A_ADDR) == [(200, "reviews")]  # the gateway: host
            assert (await get(direct, source=OUTSIDER))[0][0] == 0  # a container: refused

    asyncio.run(main())


def test_a_client_certificate_from_another_root_is_refused(pki: Pki) -> None:
    async def main() -> None:
        foreign = new_pki("foreign root")
        async with pair(pki, a_tls=mesh_tls(foreign, "productpage", bundle=pki.bundle)) as p:
            answers = await get(p.url())
            assert answers[0][0] == 503  # A could not connect: B refused the handshake
            errors = p.b_stats.totals()["inbound"]["errors_by_kind"]
            assert errors["tls_handshake"] == 1
            assert p.app_peers == []

    asyncio.run(main())


def test_a_server_that_is_not_the_expected_service_is_refused(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki, b_tls=mesh_tls(pki, "ratings")) as p:  # B claims to be ratings
            assert (await get(p.url()))[0][0] == 503
            assert p.app_peers == []

    asyncio.run(main())


def test_policy_only_productpage_may_call_reviews(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki, policies=ONLY_PRODUCTPAGE) as p:
            assert await get(p.url()) == [(200, "reviews")]
        async with pair(pki, client="ratings", policies=ONLY_PRODUCTPAGE) as p:
            status, body = (await get(p.url()))[0]
            assert status == 403 and body.startswith("RBAC: access denied")
            assert p.app_peers == []
            assert p.b_stats.http_inbound_totals()["responses_by_code"] == {"403": 1}

    asyncio.run(main())


def test_policy_changes_apply_to_the_next_request_on_an_open_connection(pki: Pki) -> None:
    async def main() -> None:
        deny_get = (Policy(name="no-get", action="DENY",
                           operations=(Operation(methods=frozenset({"GET"})),)),)
        async with pair(pki) as p:
            async with aiohttp.ClientSession() as session:
                async with session.get(p.url()) as r:
                    assert r.status == 200
                answer = p.b_store.offer(snapshot("reviews", "reviews", server_settings(
                    "http", policies=deny_get), version="s2"))
                assert answer.ok
                async with session.get(p.url()) as r:
                    assert r.status == 403 and "no-get" in await r.text()
            assert p.a_pool.tls_opened == 1  # the same mTLS connection carried both

    asyncio.run(main())


# --------------------------------------------------------------------------- TCP


def test_tcp_over_mutual_tls_keeps_half_close(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki, protocol="tcp") as p:
            assert await tcp_call(A_ADDR, p.port, b"hello") == b"echo:hello"
            totals = p.b_stats.totals()["inbound"]
            assert totals["bytes_received"] == 5 and totals["bytes_sent"] == 10
            assert 'connection_security_policy="mutual_tls"' in p.b_stats.prometheus_text()

    asyncio.run(main())


def test_a_denied_tcp_connection_is_closed(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki, protocol="tcp", client="ratings", policies=ONLY_PRODUCTPAGE) as p:
            assert await tcp_call(A_ADDR, p.port, b"hello") == b""
            assert p.b_stats.totals()["inbound"]["errors_by_kind"]["rbac_denied"] == 1

    asyncio.run(main())


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_open_connections_and_new_ones_use_the_new_certificate(pki: Pki) -> None:
    async def main() -> None:
        async with pair(pki) as p:
            async with aiohttp.ClientSession() as session:
                async with session.get(p.url()) as r:
                    assert r.status == 200
                for tls, service in ((p.a_tls, "productpage"), (p.b_tls, "reviews")):
                    chain, key = pki.leaf(service)
                    tls.use(chain, key, pki.bundle)
                async with session.get(p.url()) as r:  # the pooled connection, still good
                    assert r.status == 200
            assert p.a_pool.tls_opened == 1
            p.a_pool.close()  # a new connection now: the new certificates on both ends
            assert await get(p.url()) == [(200, "reviews")]
            assert p.a_pool.tls_opened == 2

    asyncio.run(main())


def test_root_rotation_old_and_new_roots_side_by_side(pki: Pki) -> None:
    async def main() -> None:
        new = new_pki("new root")
        both = pki.bundle + new.bundle
        # B still holds an old-root certificate, A already a new-root one: both trust both
        async with pair(pki, a_tls=mesh_tls(new, "productpage", bundle=both),
                        b_tls=mesh_tls(pki, "reviews", bundle=both)) as p:
            assert await get(p.url(), 3) == [(200, "reviews")] * 3
        # the old root removed: a peer still on it is refused
        async with pair(pki, a_tls=mesh_tls(new, "productpage", bundle=new.bundle),
                        b_tls=mesh_tls(pki, "reviews", bundle=new.bundle)) as p:
            assert (await get(p.url()))[0][0] == 503

    asyncio.run(main())
