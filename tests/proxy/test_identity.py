"""The proxy's workload identity: key in memory, renewal at half-life, retries, nothing leaked.

The pilot here is ``CADouble``, a small aiohttp test double of the pilot's ``POST
/v1/certificate``: it signs with the real ``CertificateAuthority``, but attests every caller
as one fixed identity, because the real pilot attests through the Docker engine, which these
tests do not run. Time is a fake clock whose ``sleep`` moves it on, so a day of renewals
takes milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import random
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from composemesh.backoff import backoff_delay
from composemesh.ca import (
    CertificateAuthority,
    IssuanceRefused,
    SpiffeId,
    cert_from_pem,
    cert_to_pem,
    csr_to_pem,
    fingerprint,
    generate_key,
    make_csr,
    make_root,
)
from composemesh.healthcheck import probe
from composemesh.model.snapshot import (
    CertificateResponse,
    ProxyIdentity,
    Snapshot,
    SnapshotError,
    SnapshotSettings,
)
from composemesh.model.wire import encode
from composemesh.proxy.admin import AdminContext, build_admin_app
from composemesh.proxy.identity import (
    IdentityError,
    WorkloadCertificate,
    WorkloadIdentity,
    trust_bundle_applier,
)
from composemesh.proxy.pilot_client import ConfigStore
from composemesh.proxy.server import ProxyConfig, serve
from composemesh.proxy.stats import INBOUND, OUTBOUND, ProxyStats
from tests.support import free_port, until

from .pilot_double import PilotDouble, snapshot_body

TD = "cluster.local"
WEB = SpiffeId(TD, "shop", "web")
HOUR = timedelta(hours=1)


class FakeClock:
    """Time that moves only when someone sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)
        self.slept: list[float] = []

    def __call__(self) -> datetime:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += timedelta(seconds=seconds)
        await asyncio.sleep(0)


class CADouble:
    """Test double of the pilot's certificate endpoint (see the module docstring)."""

    def __init__(self, clock: Callable[[], datetime], ttl: timedelta = HOUR) -> None:
        self.clock = clock
        self.root, root_key = make_root("test root", TD, now=clock() - timedelta(days=1))
        self.ca = CertificateAuthority(self.root, root_key, TD, ttl, clock=clock)
        self.requests: list[tuple[datetime, bytes]] = []
        self.answer_with: list[int] = []  # statuses to answer the next requests with
        self.for_another_key = False  # sign a CSR of our own instead of the caller's
        self.on_request: Callable[[], None] | None = None

    async def certificate(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((self.clock(), body))
        if self.on_request is not None:
            self.on_request()
        if self.answer_with:
            status = self.answer_with.pop(0)
            return web.json_response({"error": f"told to answer {status}"}, status=status)
        csr = csr_to_pem(make_csr(generate_key())) if self.for_another_key else body
        try:
            signed = self.ca.sign(csr, WEB)
        except IssuanceRefused as exc:
            return web.json_response({"error": exc.reason}, status=403)
        return web.Response(body=encode(CertificateResponse(
            cert_pem=signed.cert_pem.decode(),
            chain_pem=signed.chain_pem.decode(),
            trust_bundle_pem=self.ca.trust_bundle().decode(),
            spiffe=signed.spiffe.uri,
            not_after=signed.not_after.isoformat(),
            serial=f"{cert_from_pem(signed.cert_pem).serial_number:x}",
        )), content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/certificate", self.certificate)
        return app


Body = Callable[[WorkloadIdentity, CADouble, FakeClock, TestClient], Awaitable[None]]


def run(body: Body, ttl: timedelta = HOUR, fake_sleep: bool = True, **options: Any) -> None:
    """``body`` with an identity whose ``run()`` loop talks to a CADouble.

    With ``fake_sleep`` the loop's naps move the fake clock at once (renewals come as fast as
    the loop turns: read the state in callbacks, not afterwards); without, it really sleeps.
    """

    async def main() -> None:
        clock = FakeClock()
        double = CADouble(clock, ttl)
        async with TestClient(TestServer(double.app(), host="127.0.0.1")) as client:
            identity = WorkloadIdentity(str(client.make_url("")), clock=clock,
                                        sleep=clock.sleep if fake_sleep else asyncio.sleep,
                                        **options)
            task = asyncio.create_task(identity.run())
            try:
                await body(identity, double, clock, client)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if task.done() and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]

    asyncio.run(main())


# --------------------------------------------------------------------------- schedule


def test_renews_at_half_life_with_jitter_on_the_fake_clock() -> None:
    rotated: list[WorkloadCertificate] = []

    async def body(identity: WorkloadIdentity, double: CADouble, clock: FakeClock,
                   client: TestClient) -> None:
        identity.on_rotate.append(rotated.append)
        await until(lambda: len(rotated) >= 4)

    run(body, rng=random.Random(7))
    for cert in rotated:
        life = cert.not_after - cert.not_before
        assert life == HOUR + timedelta(minutes=1)  # back-dated one minute for clock skew
        share = (cert.renew_at - cert.not_before) / life
        assert 0.4 <= share <= 0.6
    assert len({c.renew_at - c.not_before for c in rotated}) == len(rotated)  # jittered
    assert len({c.serial for c in rotated}) == len(rotated)


def test_without_jitter_each_request_comes_exactly_at_half_life() -> None:
    async def body(identity: WorkloadIdentity, double: CADouble, clock: FakeClock,
                   client: TestClient) -> None:
        seen: list[WorkloadCertificate] = []
        identity.on_rotate.append(seen.append)
        await until(lambda: len(seen) >= 3)
        for cert, (asked_at, _) in zip(seen, double.requests[1:], strict=False):
            assert cert.renew_at == cert.not_before + (cert.not_after - cert.not_before) / 2
            assert abs((asked_at - cert.renew_at).total_seconds()) < 0.001
        assert max(clock.slept) <= 60.0  # the clock is looked at again at least every minute

    run(body, renew_jitter=0.0)


# --------------------------------------------------------------------------- failures


def test_failures_are_retried_with_capped_backoff_then_the_certificate_comes() -> None:
    async def body(identity: WorkloadIdentity, double: CADouble, clock: FakeClock,
                   client: TestClient) -> None:
        ready_while_failing: list[tuple[bool, str]] = []
        at_first: list[Any] = []
        double.answer_with = [503, 403, 500, 503]
        double.on_request = lambda: ready_while_failing.append(identity.readiness())
        identity.on_rotate.append(lambda cert: at_first.append((
            len(double.requests), list(clock.slept), identity.failures, identity.last_error,
            identity.readiness())))
        await until(lambda: bool(at_first))
        requests, slept, failures, last_error, readiness = at_first[0]
        assert requests == 5
        assert [ok for ok, _ in ready_while_failing[:5]] == [False] * 5
        assert "answered 503: told to answer 503" in ready_while_failing[4][1]
        assert len(slept) == 4
        for n, delay in enumerate(slept, start=1):
            low = backoff_delay(n, lambda: 0.0, identity.backoff_initial, identity.backoff_max)
            high = backoff_delay(n, lambda: 1.0, identity.backoff_initial, identity.backoff_max)
            assert low <= delay <= high
        assert max(slept) <= identity.backoff_max
        assert (failures, last_error, readiness) == (0, "", (True, ""))

    run(body, backoff_initial=0.5, backoff_max=2.0)


def test_the_current_certificate_keeps_serving_while_renewal_fails() -> None:
    async def body(identity: WorkloadIdentity, double: CADouble, clock: FakeClock,
                   client: TestClient) -> None:
        await until(lambda: identity.certificate is not None)
        first = identity.current()
        assert first is not None
        seen_while_failing: list[Any] = []
        at_second: list[Any] = []
        double.answer_with = [503] * 6
        double.on_request = lambda: seen_while_failing.append(
            (identity.current(), identity.readiness()))
        identity.on_rotate.append(
            lambda cert: at_second.append((len(seen_while_failing), identity.current())))
        await until(lambda: bool(at_second))
        count, current = at_second[0]
        assert count == 7  # 6 failures, then the renewal that worked
        assert all(held == first and ready == (True, "")
                   for held, ready in seen_while_failing[:7])
        assert current != first

    run(body)


def test_an_expired_certificate_makes_the_proxy_unready() -> None:
    async def main() -> None:
        clock = FakeClock()
        double = CADouble(clock)
        async with TestClient(TestServer(double.app(), host="127.0.0.1")) as client:
            identity = WorkloadIdentity(str(client.make_url("")), clock=clock)
            async with aiohttp.ClientSession() as session:
                cert = await identity.renew(session)
        assert identity.readiness() == (True, "")
        clock.now = cert.not_after
        ready, reason = identity.readiness()
        assert not ready and reason.startswith("the workload certificate expired at")

    asyncio.run(main())


def test_a_certificate_for_another_key_is_refused() -> None:
    async def body(identity: WorkloadIdentity, double: CADouble, clock: FakeClock,
                   client: TestClient) -> None:
        double.for_another_key = True
        await until(lambda: identity.failures >= 2)
        assert identity.certificate is None
        assert "not for the key this proxy asked with" in identity.last_error
        double.for_another_key = False
        await until(lambda: identity.certificate is not None)

    run(body)

    async def direct() -> None:
        identity = WorkloadIdentity("http://127.0.0.1:1")
        key = generate_key()
        with pytest.raises(IdentityError, match="unusable"):
            identity._check(CertificateResponse("nope", "", "", "", "", ""), identity_key(key))

    asyncio.run(direct())


def identity_key(key: Any) -> Any:
    from composemesh.proxy.identity import _PrivateKey

    return _PrivateKey(key)


def test_a_pilot_without_a_ca_404_leaves_the_proxy_ready_without_a_certificate() -> None:
    async def main() -> None:
        clock = FakeClock()
        async with TestClient(TestServer(web.Application(), host="127.0.0.1")) as client:
            identity = WorkloadIdentity(str(client.make_url("")), clock=clock,
                                        sleep=clock.sleep)
            assert identity.readiness()[0] is False  # not known yet
            task = asyncio.create_task(identity.run())
            await until(lambda: identity.offered is False)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert identity.readiness() == (True, "")
        assert identity.describe()["offered"] is False
        assert identity.current() is None

    asyncio.run(main())


# --------------------------------------------------------------------------- the key


def test_the_key_is_fresh_each_time_matches_and_is_never_shown_logged_or_sent(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    held: list[tuple[bytes, bytes, bytes, bytes]] = []

    async def body(identity: WorkloadIdentity, double: CADouble, clock: FakeClock,
                   client: TestClient) -> None:
        identity.on_rotate.append(lambda cert: held.append(identity.current() or (b"",) * 4))
        await until(lambda: len(held) >= 2)
        shown = " ".join([repr(identity), str(identity), repr(identity.certificate),
                          json.dumps(identity.describe()), repr(identity._held)])
        for cert_pem, key_pem, chain_pem, bundle_pem in held:
            assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
            key = load_pem_private_key(key_pem, None)
            assert cert_from_pem(cert_pem).public_key() == key.public_key()
            assert chain_pem.startswith(cert_pem) and bundle_pem == cert_to_pem(double.root)
            assert key_pem.decode() not in shown
        assert "PRIVATE KEY" not in shown
        assert held[0][1] != held[1][1]  # a new key for every certificate
        for _, sent in double.requests:
            assert sent.startswith(b"-----BEGIN CERTIFICATE REQUEST-----")
            assert b"PRIVATE" not in sent
        with pytest.raises(TypeError):
            pickle.dumps(identity._held)

    run(body)
    assert "workload certificate spiffe://cluster.local/ns/shop/sa/web serial" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


# --------------------------------------------------------------------------- trust bundle


def snapshot_with_bundle(bundle: object) -> bytes:
    identity = ProxyIdentity(node="shop-web-netns-1", project="shop", compose_service="web",
                             service="web", version="v1")
    wire = json.loads(encode(Snapshot(version="b1", identity=identity)))
    wire["settings"]["trust_bundle"] = bundle  # any JSON: the proxy must check it
    return json.dumps(wire).encode()


def test_a_snapshots_trust_bundle_is_taken_and_one_without_our_root_forces_renewal() -> None:
    async def body(identity: WorkloadIdentity, double: CADouble, clock: FakeClock,
                   client: TestClient) -> None:
        rotated: list[WorkloadCertificate] = []
        await until(lambda: identity.certificate is not None)
        identity.on_rotate.append(rotated.append)
        store = ConfigStore([trust_bundle_applier(identity)])
        mine = cert_to_pem(double.root).decode()
        assert store.offer(snapshot_with_bundle(mine)).ok
        assert rotated == []  # the same bundle: nothing to tell anyone

        other, _ = make_root("next root", TD)
        both = mine + cert_to_pem(other).decode()
        assert store.offer(snapshot_with_bundle(both)).ok
        current = identity.current()
        assert current is not None and current[3] == both.encode()
        assert len(rotated) == 1 and identity.issued == 1  # still covered: no renewal

        assert not store.offer(snapshot_with_bundle("garbage")).ok
        answer = store.offer(snapshot_with_bundle(7))
        assert not answer.ok
        assert "$.settings.trust_bundle: Expected `str`, got `int`" in answer.reason

        # the loop naps (really) for up to a minute; a bundle without our root wakes it
        await asyncio.sleep(0.05)
        assert identity.issued == 1
        assert store.offer(snapshot_with_bundle(cert_to_pem(other).decode())).ok
        await until(lambda: identity.issued == 2, timeout=5)
        assert len(double.requests) == 2

    run(body, fake_sleep=False)


def test_the_bundle_applier_checks_before_anything_changes() -> None:
    identity = WorkloadIdentity("http://127.0.0.1:1")
    prepare = trust_bundle_applier(identity)
    with pytest.raises(SnapshotError, match=r"^\$\.settings\.trust_bundle: "):
        prepare(Snapshot(version="x", identity=ProxyIdentity("n", "p", "c", "s", "v1"),
                         settings=SnapshotSettings(
                             trust_bundle="-----BEGIN CERTIFICATE-----\nxx\n")))
    prepare(Snapshot(version="x", identity=ProxyIdentity("n", "p", "c", "s", "v1")))()


# --------------------------------------------------------------------------- admin and serve


def test_admin_certs_and_config_dump_show_the_certificate_but_never_the_key() -> None:
    async def body(identity: WorkloadIdentity, double: CADouble, clock: FakeClock,
                   client: TestClient) -> None:
        ctx = AdminContext(stats=ProxyStats(), store=ConfigStore(),
                           listeners={OUTBOUND: True, INBOUND: True}, identity=identity)
        ctx.store.offer(snapshot_body("v1"))
        async with TestClient(TestServer(build_admin_app(ctx))) as admin:
            status = (await admin.get("/ready")).status
            if identity.certificate is None:
                assert status == 503
            await until(lambda: identity.certificate is not None)
            assert (await admin.get("/ready")).status == 200
            certs = await (await admin.get("/certs")).json()
            dump = await (await admin.get("/config_dump")).json()
            text = json.dumps(certs) + json.dumps(dump)
        cert = identity.certificate  # real sleeps, a one-hour TTL: still the first one
        assert cert is not None and identity.issued == 1
        assert certs["identity"] == WEB.uri
        assert certs["serial"] == cert.serial
        assert certs["not_after"] == cert.not_after.isoformat(timespec="seconds")
        assert certs["not_before"] == cert.not_before.isoformat(timespec="seconds")
        assert certs["issuer_fingerprint"] == fingerprint(double.root)
        assert certs["trust_bundle"][0]["fingerprint"] == fingerprint(double.root)
        assert dump["identity"]["serial"] == cert.serial
        assert "PRIVATE KEY" not in text

    run(body, fake_sleep=False)
    ctx = AdminContext(stats=ProxyStats(), store=ConfigStore())
    assert ctx.certs()["identity"] is None


class PilotWithCA(PilotDouble):
    """pilot_double's snapshot and ACK endpoints plus a CADouble's certificate endpoint, on one
    Unix socket, as the pilot serves its whole API (``start_unix``). ``order`` records what was
    asked, in turn: "certificate" and the polls with what each said the proxy holds."""

    def __init__(self, ca: CADouble) -> None:
        super().__init__(hold=0.2)
        self.ca = ca
        self.order: list[str] = []

    async def _polled(self, request: web.Request) -> web.Response:
        self.order.append(f"poll {request.query.get('cert_serial', '-')}")
        return await self._snapshot(request)

    async def _certificate(self, request: web.Request) -> web.Response:
        self.order.append("certificate")
        return await self.ca.certificate(request)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/snapshot", self._polled)
        app.router.add_post("/v1/ack", self._ack)
        app.router.add_post("/v1/certificate", self._certificate)
        return app


def test_serve_is_ready_only_once_it_holds_a_certificate(tmp_path: Path) -> None:
    """The proxy reaches its pilot on the Unix socket its URL names (``pilot_session``'s Unix
    connector) for certificates and snapshots alike, and says with its polls which certificate
    it holds."""
    async def main() -> None:
        ca = CADouble(lambda: datetime.now(UTC))
        ca.answer_with = [503] * 3
        pilot = PilotWithCA(ca)
        url = await pilot.start_unix(str(tmp_path / "pilot.sock"))
        pilot.publish("v1", snapshot_body("v1"))
        config = ProxyConfig(
            pilot_url=url, capture_host="127.0.0.1",
            outbound_port=free_port(), inbound_port=free_port(), admin_port=free_port(),
            health_host="127.0.0.1", health_port=free_port(),
            prometheus_host="127.0.0.1", prometheus_port=free_port(),
            resolver=lambda sock: ("127.0.0.1", 1),
        )
        assert config.pilot_url.startswith("unix://")
        stop = asyncio.Event()
        contexts: list[AdminContext] = []
        serving = asyncio.create_task(serve(config, stop, contexts))
        try:
            await until(lambda: bool(contexts) and contexts[0].store.snapshot is not None)
            ctx = contexts[0]
            if ctx.identity is not None and ctx.identity.certificate is None:
                ready, reason = ctx.readiness()
                assert not ready and "no workload certificate" in reason
            await until(lambda: ctx.readiness()[0], timeout=15)
            assert (await asyncio.to_thread(probe, config.health_port))[0]
            admin = f"http://127.0.0.1:{config.admin_port}/certs"
            certs = json.loads(await asyncio.to_thread(
                lambda: urllib.request.urlopen(admin, timeout=5).read()))
            assert certs["identity"] == WEB.uri and "PRIVATE KEY" not in json.dumps(certs)
            assert len(ca.requests) == 4  # three 503s, then the certificate, all on the socket
            assert pilot.answers and pilot.answers[0].ok  # the ACK came the same way
            # once it holds the certificate, each poll says so: its serial and expiry
            assert ctx.identity is not None and ctx.identity.certificate is not None
            serial = ctx.identity.certificate.serial
            await until(lambda: f"poll {serial}" in pilot.order)
            held = [p.held for p in pilot.polls if p.held is not None]
            assert held and held[-1] == (serial, certs["not_after"])
            assert all(entry in ("certificate", "poll -", f"poll {serial}")
                       for entry in pilot.order), pilot.order
            assert pilot.order.index(f"poll {serial}") > pilot.order.index("certificate")
        finally:
            stop.set()
            await asyncio.wait_for(serving, 5)
            await pilot.stop()

    asyncio.run(main())


def test_the_identity_asks_for_its_certificate_on_a_unix_socket(tmp_path: Path) -> None:
    """``WorkloadIdentity.run`` with a ``unix://`` URL makes its own session to that socket."""
    async def main() -> None:
        double = CADouble(lambda: datetime.now(UTC))
        runner = web.AppRunner(double.app(), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        sock = tmp_path / "pilot.sock"
        await web.UnixSite(runner, str(sock)).start()
        identity = WorkloadIdentity(f"unix://{sock}", service="web")
        task = asyncio.create_task(identity.run())
        try:
            await until(lambda: identity.certificate is not None)
            assert identity.certificate is not None
            assert identity.certificate.spiffe == WEB.uri
            assert identity.held() == (identity.certificate.serial, identity.certificate
                                       .not_after.astimezone(UTC).isoformat(timespec="seconds"))
            assert len(double.requests) == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await runner.cleanup()

    asyncio.run(main())


def test_cancelling_run_stops_it_whatever_it_is_doing() -> None:
    async def main() -> None:
        clock = FakeClock()
        double = CADouble(clock)
        async with TestClient(TestServer(double.app(), host="127.0.0.1")) as client:
            for turns in range(40):
                identity = WorkloadIdentity(str(client.make_url("")), clock=clock,
                                            sleep=clock.sleep)
                task = asyncio.create_task(identity.run())
                for _ in range(turns):  # let it get somewhere: asking, napping, waking
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 2)
                assert task.cancelled()

    asyncio.run(main())
