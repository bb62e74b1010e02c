"""The east-west gateway on loopback, real mTLS through it (proxy.east_west): a remote
caller's sidecar (an ssl client with its own workload certificate and the east-west SNI)
reaches a stand-in for the endpoint's sidecar (an ssl server with the destination's
certificate, requiring the client's) through the gateway, which never ends the TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from composemesh.model.east_west import sni, sni_tail
from composemesh.model.wellknown import PORT_INBOUND
from composemesh.proxy.east_west import EastWestGateway, EastWestSession, start_east_west
from composemesh.proxy.selection import Endpoint
from composemesh.proxy.stats import ProxyStats
from composemesh.proxy.table import RoutingTable

from .conftest import run_on
from .test_mtls import TD, Pki, new_pki

PROJECT = "shop"
ENDPOINT, DEAD, OTHER = "127.0.0.3", "127.0.0.2", "127.0.0.5"


def _files(pki: Pki, service: str, where: Path) -> tuple[str, str]:
    chain, key = pki.leaf(service)
    (where / f"{service}.pem").write_bytes(chain)
    (where / f"{service}.key").write_bytes(key)
    return str(where / f"{service}.pem"), str(where / f"{service}.key")


class World:
    def __init__(self, pki: Pki, where: Path) -> None:
        (where / "root.pem").write_bytes(pki.bundle)
        root = str(where / "root.pem")
        cert, key = _files(pki, "reviews", where)
        self.server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_ctx.load_cert_chain(cert, key)
        self.server_ctx.verify_mode = ssl.CERT_REQUIRED
        self.server_ctx.load_verify_locations(cafile=root)
        cert, key = _files(pki, "productpage", where)
        self.client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=root)
        self.client_ctx.check_hostname = False  # the SNI names the route, the SAN the peer
        self.client_ctx.load_cert_chain(cert, key)
        self.seen: list[str] = []  # the SPIFFE IDs of the clients the endpoint saw

    async def endpoint(self, address: str, port: int = 0) -> asyncio.Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
                x509.SubjectAlternativeName).value
            self.seen.append(str(san.get_values_for_type(x509.UniformResourceIdentifier)[0]))
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while data := await reader.read(65536):
                    writer.write(b"echo:" + data)
                    await writer.drain()
            writer.close()

        return await asyncio.start_server(serve, address, port, ssl=self.server_ctx)


def table(endpoints: dict[tuple[str, str], tuple[Endpoint, ...]]) -> Any:
    t = RoutingTable(endpoints=endpoints)
    return SimpleNamespace(current=SimpleNamespace(outbound=SimpleNamespace(table=t)))


def gateway_for(endpoints: dict[tuple[str, str], tuple[Endpoint, ...]], lines: list[dict[str, Any]],
                **kw: Any) -> EastWestGateway:
    return EastWestGateway(table(endpoints), ProxyStats(), lines.append,
                           project=lambda: PROJECT, trust_domain=lambda: TD,
                           allow_loopback=True, **kw)


def name(port: int, version: str = "v1", service: str = "reviews", project: str = PROJECT,
         td: str = TD) -> str:
    return sni(port, sni_tail(version, service, project, td))


@pytest.fixture(scope="module")
def world() -> World:
    with tempfile.TemporaryDirectory() as d:
        return World(new_pki(), Path(d))


def ep(address: str, version: str = "v1", remote: bool = False) -> Endpoint:
    return Endpoint(node=f"shop-reviews-{address}", version=version, address=address,
                    remote=remote)


async def _call(world: World, gw_port: int, server_name: str, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw_port, ssl=world.client_ctx,
                                                   server_hostname=server_name)
    writer.write(payload)
    await writer.drain()
    got = await reader.readexactly(len(payload) + 5)
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return got


async def _closed(gw_port: int, first: bytes = b"", dribble: bool = False,
                  wait: float = 5.0) -> bytes:
    """Send ``first``; what comes back before the gateway closes (b"" expected)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw_port)
    for chunk in ([first[i:i + 1] for i in range(len(first))] if dribble else [first]):
        if chunk:
            with contextlib.suppress(ConnectionError):
                writer.write(chunk)
                await writer.drain()
    try:
        async with asyncio.timeout(wait):
            got = await reader.read()
    except ConnectionError:
        got = b""
    writer.close()
    return got


def _hello(server_name: str | None) -> bytes:
    """A real ClientHello, as ssl writes it (nothing sent back to it)."""
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=False, server_hostname=server_name)
    if server_name is None:
        ctx.check_hostname = False
        obj = ctx.wrap_bio(inc, out, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_bytes_pass_and_the_endpoint_sees_the_callers_certificate(world: World,
                                                                   loop_kind: str) -> None:
    async def main() -> None:
        server = await world.endpoint(ENDPOINT)
        port = server.sockets[0].getsockname()[1]
        lines: list[dict[str, Any]] = []
        gw = gateway_for({("reviews", "v1"): (ep(ENDPOINT),)}, lines)
        listener = await start_east_west(gw, host="127.0.0.1", port=0)
        gw_port = listener.sockets[0].getsockname()[1]
        world.seen.clear()
        assert await _call(world, gw_port, name(port), b"hello") == b"echo:hello"
        assert world.seen == [f"spiffe://{TD}/ns/shop/sa/productpage"]
        await asyncio.sleep(0.1)
        assert lines[-1]["outcome"] == "ok" and lines[-1]["endpoint"] == f"{ENDPOINT}:{port}"
        assert lines[-1]["service"] == "reviews" and lines[-1]["bytes_received"] > 5
        totals = gw.stats.tcp(gw.labels(__import__("composemesh.model.east_west",
                                                   fromlist=["parse_sni"]).parse_sni(
            name(port))))
        assert totals.opened == 1 and totals.closed == 1 and totals.sent > 0
        # the gateway holds no key: nothing of it has a context or a private key
        assert not any(isinstance(v, ssl.SSLContext) for v in vars(gw).values())
        listener.close()
        server.close()

    run_on(loop_kind, main())


@pytest.mark.parametrize("which", ["project", "td", "service", "version", "form", "proxy_port"])
def test_refused_names_are_closed_with_nothing_written(world: World, which: str) -> None:
    async def main() -> None:
        server = await world.endpoint(ENDPOINT)
        port = server.sockets[0].getsockname()[1]
        lines: list[dict[str, Any]] = []
        gw = gateway_for({("reviews", "v1"): (ep(ENDPOINT),),
                          ("reviews", "v9"): (ep(OTHER, "v9", remote=True),)}, lines)
        listener = await start_east_west(gw, host="127.0.0.1", port=0)
        gw_port = listener.sockets[0].getsockname()[1]
        bad = {"project": name(port, project="other"), "td": name(port, td="evil.example"),
               "service": name(port, service="ratings"), "version": name(port, version="v2"),
               "form": "reviews.shop.svc.cluster.local",
               "proxy_port": name(PORT_INBOUND)}[which]
        assert await _closed(gw_port, _hello(bad)) == b""
        await asyncio.sleep(0.05)
        expected = {"project": "other_project", "td": "other_trust_domain",
                    "service": "no_endpoint", "version": "no_endpoint", "form": "bad_sni",
                    "proxy_port": "proxy_port"}[which]
        assert lines[-1]["outcome"] == expected and gw.refused == {expected: 1}
        listener.close()
        server.close()

    asyncio.run(main())


def test_a_remote_endpoint_is_never_used(world: World) -> None:
    async def main() -> None:
        server = await world.endpoint(ENDPOINT)
        port = server.sockets[0].getsockname()[1]
        lines: list[dict[str, Any]] = []
        gw = gateway_for({("reviews", "v1"): (ep(ENDPOINT, remote=True),)}, lines)
        listener = await start_east_west(gw, host="127.0.0.1", port=0)
        gw_port = listener.sockets[0].getsockname()[1]
        assert await _closed(gw_port, _hello(name(port))) == b""
        await asyncio.sleep(0.05)
        assert lines[-1]["outcome"] == "no_endpoint"
        listener.close()
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize("case", ["not_tls", "no_sni", "oversize", "silence"])
def test_bad_first_bytes_are_closed(case: str) -> None:
    async def main() -> None:
        lines: list[dict[str, Any]] = []
        gw = gateway_for({}, lines, hello_timeout=0.3)
        listener = await start_east_west(gw, host="127.0.0.1", port=0)
        gw_port = listener.sockets[0].getsockname()[1]
        first = {"not_tls": b"GET / HTTP/1.1\r\n\r\n", "no_sni": _hello(None),
                 # a record header announcing a long hello, then 17 KiB of it
                 "oversize": b"\x16\x03\x01\x40\x00\x01\x00\xff\xff" + b"\x03\x03" + b"\0" * 17000,
                 "silence": b""}[case]
        assert await _closed(gw_port, first, wait=3.0) == b""
        await asyncio.sleep(0.05)
        assert lines[-1]["outcome"] in {"not_tls": {"not_tls"}, "no_sni": {"no_sni"},
                                        "oversize": {"hello_too_large", "not_tls"},
                                        "silence": {"hello_timeout"}}[case]
        listener.close()

    asyncio.run(main())


def test_a_dribbled_hello_still_works(world: World) -> None:
    async def main() -> None:
        server = await world.endpoint(ENDPOINT)
        port = server.sockets[0].getsockname()[1]
        lines: list[dict[str, Any]] = []
        gw = gateway_for({("reviews", "v1"): (ep(ENDPOINT),)}, lines)
        listener = await start_east_west(gw, host="127.0.0.1", port=0)
        gw_port = listener.sockets[0].getsockname()[1]
        session = EastWestSession(gw)
        hello = _hello(name(port))
        transport = SimpleNamespace(get_extra_info=lambda _k: ("10.0.0.1", 1),
                                    pause_reading=lambda: None, abort=lambda: None,
                                    is_closing=lambda: True)
        session.connection_made(transport)  # type: ignore[arg-type]
        for i in range(len(hello) - 1):
            session.data_received(hello[i:i + 1])
            assert not session.done
        session.data_received(hello[-1:])
        assert session.done and session.sni == name(port)
        await asyncio.sleep(0.1)
        listener.close()
        server.close()
        del gw_port

    asyncio.run(main())


def test_a_dead_first_endpoint_is_skipped(world: World) -> None:
    async def main() -> None:
        server = await world.endpoint(ENDPOINT)
        port = server.sockets[0].getsockname()[1]
        lines: list[dict[str, Any]] = []
        gw = gateway_for({("reviews", "v1"): (ep(DEAD), ep(ENDPOINT))}, lines)
        listener = await start_east_west(gw, host="127.0.0.1", port=0)
        gw_port = listener.sockets[0].getsockname()[1]
        for _ in range(4):
            assert await _call(world, gw_port, name(port), b"x") == b"echo:x"
        listener.close()
        server.close()

    asyncio.run(main())


def test_200_concurrent_connections(world: World, loop_kind: str) -> None:
    async def main() -> None:
        server = await world.endpoint(ENDPOINT)
        port = server.sockets[0].getsockname()[1]
        lines: list[dict[str, Any]] = []
        gw = gateway_for({("reviews", "v1"): (ep(ENDPOINT),)}, lines)
        listener = await start_east_west(gw, host="127.0.0.1", port=0)
        gw_port = listener.sockets[0].getsockname()[1]
        payloads = [b"%d-" % i * 50 for i in range(200)]
        got = await asyncio.gather(*(_call(world, gw_port, name(port), p) for p in payloads))
        assert got == [b"echo:" + p for p in payloads]
        listener.close()
        server.close()

    run_on(loop_kind, main())
