"""The pilot's mutual-TLS port on real loopback sockets: snapshots and ACKs only there, to the
attested identity; the pilot's own certificate; a root rotation that never locks a proxy out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from composemesh.ca import (
    cert_from_pem,
    cert_to_pem,
    certs_from_pem,
    csr_to_pem,
    fingerprint,
    generate_key,
    key_to_pem,
    make_csr,
    make_root,
    sign_workload,
    spiffe_of,
    verify_chain,
)
from composemesh.ca.tls import client_context, peer_spiffe
from composemesh.model.mesh import MeshState, NetworkAttachment, Workload
from composemesh.model.settings import MeshSettings
from composemesh.model.snapshot import Ack, decode_snapshot, encode_ack
from composemesh.pilot.ca_service import CAService
from composemesh.pilot.server import PLAINTEXT_REFUSED, Pilot, make_app
from composemesh.pilot.tls_port import PilotTLS

WEB = Workload(
    node="shop-web-netns-1",
    project="shop",
    compose_service="web",
    service="web",
    version="v1",
    addresses=("127.0.0.1",),
    running=True,
    # the host reaches the pilot from its network's gateway (here 127.0.0.2: the CLI)
    attachments=(NetworkAttachment("default", "127.0.0.1", "127.0.0.0/8", "127.0.0.2"),),
)
DB = replace(WEB, node="shop-db-netns-1", compose_service="db", service="db",
             addresses=("10.9.0.9",))
PILOT_ID = "spiffe://cluster.local/ns/shop/sa/composemesh-pilot"


@dataclass
class Mesh:
    """A pilot with a CA serving plaintext and mTLS on loopback, and a proxy's credentials."""

    pilot: Pilot
    tls: PilotTLS
    plain: str  # http://127.0.0.1:<port>
    secure: str  # https://127.0.0.1:<port>
    session: aiohttp.ClientSession  # from 127.0.0.1: web's proxy
    host: aiohttp.ClientSession  # from 127.0.0.2: no workload (the CLI on the host)
    _issued: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    @property
    def ca(self) -> CAService:
        assert self.pilot.ca is not None
        return self.pilot.ca

    def credentials(self, workload: Workload = WEB,
                    keep: ssl.SSLContext | None = None) -> ssl.SSLContext:
        """What the proxy of ``workload`` holds after ``POST /v1/certificate``: its chain and
        key, trusting the bundle the CA hands out now. With ``keep``: the certificate of that
        earlier context, trusting the bundle of now (a proxy that took a new snapshot)."""
        if keep is not None:
            chain, key_pem = self._issued[id(keep)]
        else:
            key = generate_key()
            signed = self.ca.issue(csr_to_pem(make_csr(key)), workload, "127.0.0.1")
            chain, key_pem = signed.chain_pem, key_to_pem(key)
        ctx = client_context(chain, key_pem, self.ca.trust_bundle_pem.encode())
        self._issued[id(ctx)] = (chain, key_pem)
        return ctx

    async def snapshot(self, ctx: ssl.SSLContext | None, **params: str) -> aiohttp.ClientResponse:
        base = self.secure if ctx is not None else self.plain
        return await self.session.get(f"{base}/v1/snapshot", ssl=ctx or False, params=params)


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, clock: Callable[[], datetime] | None = None,
                  workloads: tuple[Workload, ...] = (WEB, DB)) -> AsyncIterator[Mesh]:
    kw: dict[str, Any] = {"clock": clock} if clock else {}
    ca = CAService.load_or_create(MeshSettings(), "shop", tmp_path, {}, **kw)
    pilot = Pilot(MeshState(project="shop", workloads=workloads), None, ca)
    pilot.synced = True
    tls = PilotTLS(ca, **kw)
    runner = web.AppRunner(make_app(pilot), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.context).start()
    (_, plain), (_, secure) = (a[:2] for a in runner.addresses)
    try:
        # a new connection (and handshake) for every request, as after a proxy's restart
        connector = aiohttp.TCPConnector(force_close=True)
        outside = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=connector) as session, \
                aiohttp.ClientSession(connector=outside) as host:
            yield Mesh(pilot, tls, f"http://127.0.0.1:{plain}", f"https://127.0.0.1:{secure}",
                       session, host)
    finally:
        await runner.cleanup()


def run(tmp_path: Path, body: Callable[[Mesh], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        async with serving(tmp_path, **kw) as mesh:
            await body(mesh)

    asyncio.run(main())


async def server_certificate(mesh: Mesh, ctx: ssl.SSLContext) -> x509.Certificate:
    """The certificate the pilot's mTLS port presents to a client holding ``ctx``."""
    port = int(mesh.secure.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert peer_spiffe(ssl_object) == PILOT_ID
        return x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


# --------------------------------------------------------------------------- the contract


def test_snapshots_and_acks_are_served_over_mutual_tls_only(tmp_path: Path) -> None:
    async def body(mesh: Mesh) -> None:
        resp = await mesh.snapshot(None)
        assert (resp.status, await resp.json()) == (403, {"error": PLAINTEXT_REFUSED})
        resp = await mesh.session.post(f"{mesh.plain}/v1/ack",
                                       data=encode_ack(Ack(WEB.node, "x", True)))
        assert (resp.status, await resp.json()) == (403, {"error": PLAINTEXT_REFUSED})
        for path in ("/v1/ca", "/v1/status", "/healthz/ready"):  # the rest stays plaintext
            assert (await mesh.session.get(mesh.plain + path)).status == 200, path

        ctx = mesh.credentials()
        resp = await mesh.snapshot(ctx)
        assert resp.status == 200, await resp.text()
        snap = decode_snapshot(await resp.read())
        assert snap.identity.node == WEB.node
        assert snap.settings["signing_root"] == fingerprint(mesh.ca.root_cert)
        resp = await mesh.snapshot(ctx, version=snap.version, wait="0.2")
        assert resp.status == 304
        resp = await mesh.session.post(f"{mesh.secure}/v1/ack", ssl=ctx,
                                       data=encode_ack(Ack(WEB.node, snap.version, True)))
        assert resp.status == 200
        rows = {r["node"]: r for r in mesh.pilot.status()["proxies"]}
        assert rows[WEB.node]["in_sync"]

    run(tmp_path, body)


def test_a_certificate_of_another_identity_is_refused_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def body(mesh: Mesh) -> None:
        stolen = mesh.credentials(DB)  # db's certificate, used from web's address
        resp = await mesh.snapshot(stolen)
        assert resp.status == 403
        error = (await resp.json())["error"]
        assert error == ("the client certificate names spiffe://cluster.local/ns/shop/sa/db, "
                         "not spiffe://cluster.local/ns/shop/sa/web")
        resp = await mesh.session.post(f"{mesh.secure}/v1/ack", ssl=stolen,
                                       data=encode_ack(Ack(WEB.node, "x", True)))
        assert resp.status == 403 and (await resp.json())["error"] == error
        assert WEB.node not in mesh.pilot.acks

    run(tmp_path, body)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{m} from 127.0.0.1 (shop-web-netns-1) refused: the client certificate "
                        f"names spiffe://cluster.local/ns/shop/sa/db, not "
                        f"spiffe://cluster.local/ns/shop/sa/web"
                        for m in ("GET /v1/snapshot", "POST /v1/ack")]


def test_no_client_certificate_or_a_foreign_one_fails_the_handshake(tmp_path: Path) -> None:
    async def body(mesh: Mesh) -> None:
        anonymous = ssl.create_default_context(cadata=mesh.ca.trust_bundle_pem)
        anonymous.check_hostname = False
        root, root_key = make_root("somebody else's root", "cluster.local")
        key = generate_key()
        leaf = sign_workload(make_csr(key), root, root_key, "spiffe://cluster.local/ns/shop/sa/web")
        foreign = client_context(cert_to_pem(leaf) + cert_to_pem(root), key_to_pem(key),
                                 mesh.ca.trust_bundle_pem.encode())
        for ctx in (anonymous, foreign):
            with pytest.raises(aiohttp.ClientError):
                resp = await mesh.snapshot(ctx)
                await resp.read()

    run(tmp_path, body)


def test_the_pilots_own_certificate(tmp_path: Path) -> None:
    async def body(mesh: Mesh) -> None:
        cert = await server_certificate(mesh, mesh.credentials())
        assert cert == cert_from_pem(mesh.tls.cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [PILOT_ID]
        assert san.get_values_for_type(x509.DNSName) == ["composemesh-pilot"]
        assert spiffe_of(cert) == PILOT_ID
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        verify_chain(cert, [], [mesh.ca.root_cert])
        assert list(mesh.ca.issued) == [WEB.node]  # the pilot's own is no workload's

    run(tmp_path, body)


def test_the_pilots_certificate_is_renewed_at_half_life(tmp_path: Path) -> None:
    now = [datetime.now(UTC)]

    async def body(mesh: Mesh) -> None:
        first = mesh.tls.cert_pem
        assert mesh.tls.current() is mesh.tls.context
        now[0] += timedelta(hours=11)
        assert mesh.tls.current() is mesh.tls.context and mesh.tls.cert_pem == first
        now[0] += timedelta(hours=2)  # past half of the 24 h certificate
        assert mesh.tls.current() is not mesh.tls.context
        assert mesh.tls.cert_pem != first
        renewed = cert_from_pem(mesh.tls.cert_pem)
        assert renewed.not_valid_before_utc > cert_from_pem(first).not_valid_before_utc

    run(tmp_path, body, clock=lambda: now[0])


def test_nothing_secret_is_in_a_snapshot(tmp_path: Path) -> None:
    async def body(mesh: Mesh) -> None:
        ctx = mesh.credentials()
        for step in ("", "begin", "switch", "finish"):
            if step:
                await mesh.pilot.rotate_root(step)
            resp = await mesh.snapshot(ctx)
            assert resp.status == 200
            data = await resp.read()
            assert b"PRIVATE KEY" not in data and b"CERTIFICATE REQUEST" not in data
            assert data.count(b"BEGIN CERTIFICATE") == len(mesh.ca.authority.roots.trusted)
            ctx = mesh.credentials()  # the next step's certificate and bundle

    run(tmp_path, body)


# --------------------------------------------------------------------------- root rotation


def test_a_root_rotation_never_locks_a_proxy_out(tmp_path: Path) -> None:
    """Each step over the real API: every proxy keeps reaching the pilot, the pilot's own
    certificate follows the signing root, and the old root is refused once it is gone."""

    async def rotate(mesh: Mesh, step: str) -> dict[str, Any]:
        resp = await mesh.host.post(f"{mesh.plain}/v1/ca/rotate", json={"step": step})
        assert resp.status == 200, await resp.text()
        info: dict[str, Any] = await resp.json()
        return info

    async def fetch(mesh: Mesh, ctx: ssl.SSLContext) -> dict[str, Any]:
        resp = await mesh.snapshot(ctx)
        assert resp.status == 200, await resp.text()
        return dict(decode_snapshot(await resp.read()).settings)

    async def body(mesh: Mesh) -> None:
        old_root = mesh.ca.root_cert
        old_fp = fingerprint(old_root)
        before = mesh.credentials()  # a proxy's certificate from the old root
        assert (await fetch(mesh, before))["signing_root"] == old_fp

        info = await rotate(mesh, "begin")
        assert info["rotation_phase"] == "trusting" and info["fingerprint"] == old_fp
        new_fp = info["trusted"][1]["fingerprint"]
        settings = await fetch(mesh, before)  # the old certificate still works
        before = mesh.credentials(keep=before)  # the proxy applies the new bundle
        assert settings["signing_root"] == old_fp
        assert [fingerprint(c) for c in certs_from_pem(settings["trust_bundle"])] == [
            old_fp, new_fp]
        trusting = mesh.credentials()  # still from the old root, trusting both
        verify_chain(await server_certificate(mesh, trusting), [], [old_root])

        info = await rotate(mesh, "switch")
        assert (info["rotation_phase"], info["fingerprint"]) == ("switched", new_fp)
        new_root = mesh.ca.root_cert
        assert (await fetch(mesh, before))["signing_root"] == new_fp  # old cert: still in
        after = mesh.credentials()  # renewed: from the new root
        assert mesh.ca.issued[WEB.node].issuer_fingerprint == new_fp
        assert (await fetch(mesh, after))["signing_root"] == new_fp
        served = await server_certificate(mesh, trusting)  # the pilot's cert: new root's
        verify_chain(served, [], [new_root])
        with pytest.raises(ValueError):
            verify_chain(served, [], [old_root])

        info = await rotate(mesh, "finish")
        assert info["rotation_phase"] == "steady"
        assert [t["fingerprint"] for t in info["trusted"]] == [new_fp]
        assert certs_from_pem((await fetch(mesh, after))["trust_bundle"]) == [new_root]
        with pytest.raises(aiohttp.ClientError):  # the old root is trusted no more
            resp = await mesh.snapshot(before)
            await resp.read()

    run(tmp_path, body)
