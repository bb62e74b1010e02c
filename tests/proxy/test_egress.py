"""Egress on loopback, real mTLS and real TLS (issue 11): an app's sidecar (A) and the egress
gateway (B, proxy.egress) as server.data_path builds them, "the outside" played by servers
on their own loopback addresses. A listed TLS host passes through (the app's TLS ends at
the real server, verified with its CA); a listed HTTP host gets TLS added by the gateway
(verified with the CA the file names); under REGISTRY_ONLY a call to anything else is 502
for HTTP and closed for TCP at the caller's sidecar, before leaving it; each call the
gateway carries is logged with the caller's SPIFFE ID. The mesh on the real engine:
tests/e2e/test_egress.py."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composemesh.model import wellknown as wk
from composemesh.model.egress import EgressHostSpec, EgressOrigination, EgressSettings
from composemesh.model.gateways import egress_vip
from composemesh.model.routing import HttpRoute, ServiceRouting, WeightedSubset
from composemesh.model.snapshot import (
    DeclaredProtocols,
    NetworkAttachment,
    ProxyIdentity,
    ServiceEndpoint,
    Snapshot,
    SnapshotSettings,
    encode_snapshot,
)
from composemesh.proxy.egress import EgressGateway, parse_connect, start_egress
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.server import data_path
from composemesh.proxy.stats import PeerLabels
from tests.gateway_certs import Authority

from .conftest import run_on
from .test_mtls import TD, mesh_tls, new_pki

A, GATEWAY, API, LEGACY, ELSEWHERE = "127.0.0.1", "127.0.0.4", "127.0.0.6", "127.0.0.7", "127.0.0.8"
DB, SECURE = "127.0.0.9", "127.0.0.10"
SECURE_HOST = "mtls.partner.example"
API_HOST, LEGACY_HOST = "api.partner.example", "legacy.partner.example"


def identity(service: str) -> ProxyIdentity:
    return ProxyIdentity(f"shop-{service}-netns-1", "shop", service, service, "v1")


async def tls_server(address: str, host: str, authority: Authority, answer: bytes,
                     client_ca: Path | None = None) -> asyncio.Server:
    """An HTTPS server of "the outside": its certificate for ``host`` by ``authority``;
    with ``client_ca``, a client certificate of that CA required."""
    cert, key = authority.server(host)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_ca))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                         % (len(answer), answer))
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, address, 0, ssl=context)


@dataclass
class Outside:
    app_port: int  # A's outbound listener
    api_port: int
    legacy_port: int
    ca: Path
    dialed: list[tuple[str, int]]  # what the app "dialed": A's original destination
    db_port: int
    app_tls: Any = None  # the app sidecar's mTLS contexts (MeshTls)
    lines: list[dict[str, Any]] = field(default_factory=list)

    async def call(self, to: tuple[str, int], data: bytes, *, tls_host: str | None = None
                   ) -> bytes:
        """The app's connection to ``to`` (as SO_ORIGINAL_DST would give it to A)."""
        self.dialed[0] = to
        context = None
        if tls_host is not None:
            context = ssl.create_default_context(cafile=str(self.ca))
        reader, writer = await asyncio.open_connection(
            A, self.app_port, ssl=context, server_hostname=tls_host)
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(65536 * 4), 10)
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def outside(tmp: Path) -> AsyncIterator[Outside]:
    authority = Authority(tmp, name="Partner CA")
    api = await tls_server(API, API_HOST, authority, b"api says hi")
    legacy = await tls_server(LEGACY, LEGACY_HOST, authority, b"legacy over TLS")
    api_port = api.sockets[0].getsockname()[1]
    legacy_port = legacy.sockets[0].getsockname()[1]
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    db = await asyncio.start_server(echo, DB, 0)
    db_port = db.sockets[0].getsockname()[1]
    secure = await tls_server(SECURE, SECURE_HOST, authority, b"client certificate seen",
                              client_ca=authority.path)
    secure_port = secure.sockets[0].getsockname()[1]
    client_cert, client_key = authority.server("mesh.client.example", stem="client")
    egress = EgressSettings(policy="REGISTRY_ONLY", hosts=(
        EgressHostSpec(API_HOST, api_port, "tls", egress_vip(0), address=API),
        EgressHostSpec(LEGACY_HOST, 80, "http", egress_vip(1), address=LEGACY,
                       origination=EgressOrigination(port=legacy_port, ca=str(authority.path))),
        EgressHostSpec("db.partner.example", db_port, "tcp", egress_vip(2), address=DB),
        EgressHostSpec(SECURE_HOST, 80, "http", egress_vip(3), address=SECURE,
                       origination=EgressOrigination(port=secure_port, ca=str(authority.path),
                                                     cert=str(client_cert),
                                                     key=str(client_key))),
    ))
    gateway_route = ServiceRouting(wk.EGRESS_GATEWAY, (HttpRoute("default", (), (
        WeightedSubset("v1", 1),)),))
    services = {wk.EGRESS_GATEWAY: (ServiceEndpoint("shop-egress-gateway-netns-1", "v1",
                                                    GATEWAY),)}
    common = SnapshotSettings(trust_domain=TD, services=services,
                              routing={wk.EGRESS_GATEWAY: gateway_route},
                              protocols={wk.EGRESS_GATEWAY: DeclaredProtocols("tcp")},
                              egress=egress)
    pki = new_pki()
    dialed = [("", 0)]
    a = data_path(PeerLabels(), lambda: True, resolver=lambda sock: dialed[0],
                  tls=mesh_tls(pki, "app"))
    b = data_path(PeerLabels(), lambda: True, tls=mesh_tls(pki, wk.EGRESS_GATEWAY))
    a_settings = SnapshotSettings(**{**common.__dict__, "networks": (  # type: ignore[arg-type]
        NetworkAttachment("shop_default", "10.9.0.2", "10.9.0.0/24", "10.9.0.1"),)})
    for path, who, settings in ((a, "app", a_settings), (b, wk.EGRESS_GATEWAY, common)):
        answer = ConfigStore([path.apply]).offer(encode_snapshot(Snapshot(
            "1", identity(who), settings=settings)))
        assert answer.ok, answer.reason
    result = Outside(0, api_port, legacy_port, authority.path, dialed, db_port, a.tls)
    gateway = EgressGateway(b.tls, b.switch, log_line=result.lines.append)
    gw_server = await start_egress(gateway, host=GATEWAY)
    listener = await asyncio.get_running_loop().create_server(a.outbound, A, 0)
    result.app_port = listener.sockets[0].getsockname()[1]
    try:
        yield result
    finally:
        listener.close()
        gw_server.close()
        a.outbound.abort_all()
        gateway.close()
        a.close()
        b.close()
        api.close()
        legacy.close()
        db.close()
        secure.close()


def test_the_connect_line_names_the_target() -> None:
    assert parse_connect(b"CONNECT api.partner.example:443 HTTP/1.1\r\n") == (API_HOST, 443)
    assert parse_connect(b"CONNECT Api.Partner.Example:443 HTTP/1.1\r\n") == (API_HOST, 443)
    for bad in (b"GET / HTTP/1.1\r\n", b"CONNECT host HTTP/1.1\r\n",
                b"CONNECT host:99999 HTTP/1.1\r\n", b"CONNECT :443 HTTP/1.1\r\n"):
        assert parse_connect(bad) is None, bad


def test_a_listed_tls_host_passes_through_and_the_call_is_logged_with_its_caller(
        loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with outside(tmp_path) as out:
            got = await out.call((egress_vip(0), out.api_port),
                                 b"GET / HTTP/1.1\r\nhost: api.partner.example\r\n\r\n",
                                 tls_host=API_HOST)
            assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"api says hi"), got
            for _ in range(50):
                if out.lines:
                    break
                await asyncio.sleep(0.05)
            [line] = out.lines
            assert line["source"] == f"spiffe://{TD}/ns/shop/sa/app"
            assert (line["host"], line["port"], line["protocol"], line["outcome"]) == (
                API_HOST, out.api_port, "tls", "ok")
            assert line["bytes_sent"] > 0 and line["bytes_received"] > 0

    run_on(loop_kind, main())


def test_a_listed_http_host_gets_tls_from_the_gateway(loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with outside(tmp_path) as out:
            got = await out.call((egress_vip(1), 80),
                                 b"GET / HTTP/1.1\r\nhost: legacy.partner.example\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"legacy over TLS"), got
            for _ in range(50):
                if out.lines:
                    break
                await asyncio.sleep(0.05)
            assert out.lines[0]["status"] == 200 and out.lines[0]["host"] == LEGACY_HOST

    run_on(loop_kind, main())


def test_a_listed_tcp_host_by_its_own_address_is_carried_as_bytes(
        loop_kind: str, tmp_path: Path) -> None:
    """An app that dials the host's address (not its name) is known by it too."""
    async def main() -> None:
        async with outside(tmp_path) as out:
            port = out.db_port
            self_check = await out.call((DB, port), b"select 1;")
            assert self_check == b"SELECT 1;", self_check
            for _ in range(50):
                if out.lines:
                    break
                await asyncio.sleep(0.05)
            [line] = out.lines
            assert (line["host"], line["protocol"], line["bytes_sent"]) == (
                "db.partner.example", "tcp", 9)

    run_on(loop_kind, main())


def test_tls_origination_presents_the_client_certificate_the_file_names(
        loop_kind: str, tmp_path: Path) -> None:
    async def main() -> None:
        async with outside(tmp_path) as out:
            got = await out.call((egress_vip(3), 80),
                                 b"GET / HTTP/1.1\r\nhost: mtls.partner.example\r\n\r\n")
            assert got.endswith(b"client certificate seen"), got

    run_on(loop_kind, main())


def test_a_peer_that_never_names_its_target_is_closed(
        loop_kind: str, tmp_path: Path, monkeypatch: Any) -> None:
    """A mesh member that completes mTLS and says nothing costs the gateway a socket for
    HEAD_TIMEOUT, no longer."""
    from composemesh.proxy import egress

    monkeypatch.setattr(egress, "HEAD_TIMEOUT", 0.3)

    async def main() -> None:
        async with outside(tmp_path) as out:
            reader, writer = await asyncio.open_connection(
                GATEWAY, wk.EGRESS_PORT, ssl=out.app_tls.client_tcp)
            try:
                assert await asyncio.wait_for(reader.read(100), 5) == b""
            finally:
                writer.close()
            assert not out.lines

    run_on(loop_kind, main())


def test_an_attacker_without_a_mesh_certificate_gets_nothing_through_the_gateway(
        loop_kind: str, tmp_path: Path) -> None:
    """On the gateway's network, as an attacker would try it: plaintext, TLS with no client
    certificate, and a certificate of another root each end at the handshake; a mesh
    member asking for a host that is not listed is refused and logged."""
    async def main() -> None:
        async with outside(tmp_path) as out:
            connect = b"CONNECT 203.0.113.7:22 HTTP/1.1\r\n\r\n"
            reader, writer = await asyncio.open_connection(GATEWAY, wk.EGRESS_PORT)
            writer.write(connect)
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(100), 15) == b""
            writer.close()
            anonymous = ssl.create_default_context()
            anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
            stranger = mesh_tls(new_pki("another root"), "app").client_tcp
            for context in (anonymous, stranger):
                try:
                    reader, writer = await asyncio.open_connection(
                        GATEWAY, wk.EGRESS_PORT, ssl=context)
                    writer.write(connect)
                    assert await asyncio.wait_for(reader.read(100), 15) == b""
                    writer.close()
                except (ssl.SSLError, ConnectionResetError):
                    pass  # refused in the handshake itself
            assert not out.lines  # none of them got as far as naming a target
            reader, writer = await asyncio.open_connection(
                GATEWAY, wk.EGRESS_PORT, ssl=out.app_tls.client_tcp)
            writer.write(connect)
            assert await asyncio.wait_for(reader.read(100), 15) == b""
            writer.close()
            for _ in range(50):
                if out.lines:
                    break
                await asyncio.sleep(0.05)
            [line] = out.lines
            assert (line["host"], line["port"], line["outcome"]) == ("203.0.113.7", 22,
                                                                     "not_listed")
            assert line["source"] == f"spiffe://{TD}/ns/shop/sa/app"

    run_on(loop_kind, main())


def test_registry_only_refuses_an_unlisted_host_at_the_callers_sidecar(
        loop_kind: str, tmp_path: Path) -> None:
    """203.0.113.7 (TEST-NET-3) is outside and never connected to: refused before that."""
    async def main() -> None:
        async with outside(tmp_path) as out:
            got = await out.call(("203.0.113.7", 80), b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 502 "), got
            assert b"BlackHoleCluster" in got and b"REGISTRY_ONLY" in got
            try:
                closed = await out.call(("203.0.113.7", 5432), b"\x00\x00\x00\x08not http")
            except ConnectionResetError:
                closed = b""
            assert closed == b""
            assert not out.lines  # it never reached the gateway

    run_on(loop_kind, main())


def test_a_local_address_is_not_outside(loop_kind: str, tmp_path: Path) -> None:
    """Loopback and the namespace's own networks pass through, REGISTRY_ONLY or not (a
    container of the project that is not meshed stays reachable)."""
    async def main() -> None:
        async with outside(tmp_path) as out:
            async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                writer.write(b"hello")
                await writer.drain()
                writer.close()

            local = await asyncio.start_server(hello, ELSEWHERE, 0)
            try:
                got = await out.call((ELSEWHERE, local.sockets[0].getsockname()[1]), b"")
                assert got == b"hello"
            finally:
                local.close()

    run_on(loop_kind, main())
