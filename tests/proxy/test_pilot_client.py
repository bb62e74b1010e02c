"""The proxy's side of the pilot protocol: apply whole or NACK, survive the pilot going away.

The pilot here is tests/proxy/pilot_double.py, a test double (see its docstring), but for
the last tests, which poll the real pilot's app in-process. Both are served on a Unix socket
in tmp_path, as the pilot serves its API, so the client's way there (``pilot_session``'s
Unix connector) is the one a proxy takes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web

from composemesh.backoff import backoff_delay
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.snapshot import Snapshot, SnapshotError
from composemesh.pilot import server
from composemesh.pilot.main import bind_socket
from composemesh.pilot.server import Pilot, make_app
from composemesh.proxy.pilot_client import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    ConfigStore,
    PilotClient,
    hints,
)
from tests.pilot.callers import Callers
from tests.support import until

from .pilot_double import PilotDouble, snapshot_body


def test_backoff_doubles_from_half_a_second_to_five_with_jitter() -> None:
    def delay(n: int, draw: float) -> float:  # as the client paces its retries
        return backoff_delay(n, jitter=lambda: draw, initial=BACKOFF_INITIAL, cap=BACKOFF_MAX)

    low = [delay(n, 0.0) for n in range(1, 8)]
    high = [delay(n, 1.0) for n in range(1, 8)]
    mid = [delay(n, 0.5) for n in range(1, 8)]
    assert mid == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert all(0.5 <= d <= 5.0 for d in low + high)
    assert high[1] > mid[1] > low[1]


def test_hints_read_what_they_can() -> None:
    assert hints(b'{"version": "abc", "schema": 99, "identity": {"node": "n1"}}') == ("abc", "n1")
    assert hints(b'{"version": "abc", "identity": 3}') == ("abc", "")
    assert hints(b"not json") == ("", "")
    assert hints(b"[1, 2]") == ("", "")


def test_a_first_snapshot_that_cannot_be_decoded_is_nacked_in_the_name_it_claims() -> None:
    answer = ConfigStore().offer(b'{"version": "v1", "schema": 5, "identity": {"node": "n1"}}')
    assert (answer.ok, answer.version, answer.node) == (False, "v1", "n1")


def test_a_good_snapshot_is_applied_and_acked() -> None:
    store = ConfigStore()
    answer = store.offer(snapshot_body("v1", node="shop-web-netns-1"))
    assert (answer.ok, answer.version, answer.node) == (True, "v1", "shop-web-netns-1")
    assert store.snapshot is not None and store.snapshot.version == "v1"
    assert store.seen_version == "v1"


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "$: JSON is malformed"),
    (b'{"version": "v2", "schema": 99}', "unknown snapshot schema 99"),
    (b'{"version": "v2", "schema": 1}', "$: Object missing required field `identity`"),
])
def test_a_bad_snapshot_is_nacked_and_the_last_good_one_kept(body: bytes, reason: str) -> None:
    store = ConfigStore()
    store.offer(snapshot_body("v1"))
    answer = store.offer(body)
    assert not answer.ok
    assert reason in answer.reason
    assert answer.node == "shop-web-netns-1"
    assert store.snapshot is not None and store.snapshot.version == "v1"
    assert store.last_answer is answer


def test_a_snapshot_one_applier_rejects_is_applied_by_none() -> None:
    committed: list[str] = []

    def accepts(snapshot: Snapshot) -> Callable[[], None]:
        return lambda: committed.append(snapshot.version)

    def rejects(snapshot: Snapshot) -> Callable[[], None]:
        if snapshot.version == "v2":
            raise SnapshotError("route to unknown service 'ratings'")
        return lambda: None

    store = ConfigStore([accepts, rejects])
    store.offer(snapshot_body("v1"))
    answer = store.offer(snapshot_body("v2"))
    assert (answer.ok, answer.version, answer.reason) == (
        False, "v2", "route to unknown service 'ratings'")
    assert committed == ["v1"]
    assert store.snapshot is not None and store.snapshot.version == "v1"
    assert store.seen_version == "v2"  # so the pilot does not send v2 again


@contextlib.asynccontextmanager
async def running(client: PilotClient):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(client.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def polling(pilot: PilotDouble, sock: Path, store: ConfigStore | None = None,
                  **options: object):  # type: ignore[no-untyped-def]
    """Start ``pilot`` on the Unix socket ``sock`` and a PilotClient polling it; both are
    stopped even when the test fails."""
    try:
        url = await pilot.start_unix(str(sock))
        assert url == f"unix://{sock}"
        client = PilotClient(url, store or ConfigStore(), **options)  # type: ignore[arg-type]
        async with running(client):
            yield client
    finally:
        await pilot.stop()


def test_polls_applies_acks_then_nacks_a_bad_one_and_moves_on(tmp_path: Path) -> None:
    async def main() -> None:
        pilot = PilotDouble(hold=0.2)
        pilot.publish("v1", snapshot_body("v1"))
        store = ConfigStore()
        async with polling(pilot, tmp_path / "pilot.sock", store, service="web-v1"):
            await until(lambda: len(pilot.answers) == 1)
            assert pilot.answers[0].ok and pilot.answers[0].version == "v1"
            assert pilot.answers[0].node == "shop-web-netns-1"
            assert pilot.polls[0].version == ""
            assert pilot.polls[0].service_header == "web-v1"
            await until(lambda: len(pilot.polls) >= 3)  # long polls that end in 304
            assert {p.version for p in pilot.polls[1:]} == {"v1"}

            pilot.publish("v2", b'{"version": "v2", "schema": 7}')
            await until(lambda: len(pilot.answers) == 2)
            nack = pilot.answers[1]
            assert (nack.ok, nack.version) == (False, "v2")
            assert "schema" in nack.reason
            assert store.snapshot is not None and store.snapshot.version == "v1"
            polls = len(pilot.polls)
            await asyncio.sleep(0.5)
            assert pilot.polls[-1].version == "v2"  # it does not ask for v2 again
            assert len(pilot.polls) - polls <= 3  # each poll waits; no hot loop

            pilot.publish("v3", snapshot_body("v3"))
            await until(lambda: len(pilot.answers) == 3)
            assert pilot.answers[2].ok and pilot.answers[2].version == "v3"
            assert store.snapshot is not None and store.snapshot.version == "v3"

    asyncio.run(main())


def test_keeps_the_last_snapshot_while_the_pilot_is_gone_and_catches_up_after(
        tmp_path: Path) -> None:
    async def main() -> None:
        sock = tmp_path / "pilot.sock"
        pilot = PilotDouble(hold=0.2)
        pilot.publish("v1", snapshot_body("v1"))
        store = ConfigStore()
        async with polling(pilot, sock, store,
                           backoff_initial=0.05, backoff_max=0.2) as client:
            await until(lambda: store.snapshot is not None)
            await pilot.stop()
            await until(lambda: client.failures >= 3)
            assert store.snapshot is not None and store.snapshot.version == "v1"
            assert client.last_error

            back = PilotDouble(hold=0.2)  # the pilot comes back, with news
            back.publish("v2", snapshot_body("v2"))
            try:
                await back.start_unix(str(sock))  # a new pilot, on the same path
                await until(lambda: any(a.version == "v2" and a.ok for a in back.answers))
                assert back.polls[0].version == "v1"
                # the count is reset once the round (its ACK sent) is over, a moment after
                # the pilot has the ACK: waited for, not read at once
                await until(lambda: client.failures == 0)
            finally:
                await back.stop()

    asyncio.run(main())


def test_an_answer_the_pilot_did_not_take_is_delivered_before_the_next_poll(tmp_path: Path) -> None:
    async def main() -> None:
        pilot = PilotDouble(hold=0.2)
        pilot.publish("v1", snapshot_body("v1"))
        pilot.fail_answers = 1
        async with polling(pilot, tmp_path / "pilot.sock", backoff_initial=0.05,
                           backoff_max=0.1) as client:
            await until(lambda: len(pilot.polls) >= 2)
            assert pilot.log[:4] == ["poll ", "refused", "ACK v1", "poll v1"]
            assert client.pending is None

    asyncio.run(main())


def test_an_answer_the_pilot_refuses_for_good_is_dropped_not_resent(tmp_path: Path) -> None:
    async def main() -> None:
        pilot = PilotDouble(hold=0.2)
        pilot.publish("v1", snapshot_body("v1"))
        pilot.refuse_answers = 1
        async with polling(pilot, tmp_path / "pilot.sock", backoff_initial=0.05,
                           backoff_max=0.1) as client:
            await until(lambda: len(pilot.polls) >= 3)
            assert pilot.log[:3] == ["poll ", "forbidden", "poll v1"]
            assert client.pending is None

    asyncio.run(main())


def test_an_unexpected_status_is_a_failure_with_backoff(tmp_path: Path) -> None:
    async def main() -> None:
        pilot = PilotDouble()
        pilot.poll_status = 500
        store = ConfigStore()
        async with polling(pilot, tmp_path / "pilot.sock", store, backoff_initial=0.1,
                           backoff_max=0.1) as client:
            await asyncio.sleep(0.55)
            assert 3 <= len(pilot.polls) <= 7
            assert "500" in client.last_error
            assert store.snapshot is None

    asyncio.run(main())


def test_each_poll_says_which_certificate_the_proxy_holds(tmp_path: Path) -> None:
    """``held`` is asked at every poll (it changes at rotation); none held: nothing said."""
    held: list[tuple[str, str] | None] = [None]

    async def main() -> None:
        pilot = PilotDouble(hold=0.1)
        pilot.publish("v1", snapshot_body("v1"))
        async with polling(pilot, tmp_path / "pilot.sock", held=lambda: held[0]):
            await until(lambda: len(pilot.polls) >= 2)
            assert {p.held for p in pilot.polls} == {None}
            held[0] = ("1f2e", "2030-01-01T00:00:00+00:00")
            count = len(pilot.polls)
            await until(lambda: len(pilot.polls) >= count + 2)
            assert pilot.polls[-1].held == ("1f2e", "2030-01-01T00:00:00+00:00")

    asyncio.run(main())


ME = Workload(node="p-web-netns-1", project="p", compose_service="web", service="web",
              version="v1", addresses=("10.9.0.2",), running=True,
              proxy_container="p-web-proxy-1", proxy_container_id="a" * 64)


@contextlib.asynccontextmanager
async def real_pilot(sock: Path, attestor: Callers):  # type: ignore[no-untyped-def]
    """The pilot's own app, on a Unix socket bound as the pilot binds it."""
    pilot = Pilot(MeshState(project="p", workloads=(ME,)), attestor=attestor)
    pilot.synced = True
    runner = web.AppRunner(make_app(pilot), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.SockSite(runner, bind_socket(str(sock))).start()
        yield pilot
    finally:
        await runner.cleanup()


def test_the_real_pilot_in_process_is_polled_applied_and_acked(tmp_path: Path) -> None:
    """No double: the pilot's own app on its Unix socket, which attests the caller as the proxy
    of the one workload (``Callers``: the kernel's attestation is test_attest.py's)."""
    me = ME
    sock = tmp_path / "pilot.sock"

    async def main() -> None:
        attestor = Callers(me.node)
        async with real_pilot(sock, attestor) as pilot:
            store = ConfigStore()
            client = PilotClient(f"unix://{sock}", store, service="web",
                                 held=lambda: ("0a1b", "2030-01-01T00:00:00+00:00"))
            async with running(client):
                await until(lambda: me.node in pilot.acks)
                first = store.snapshot
                assert first is not None and first.identity.node == me.node
                assert pilot.acks[me.node].ok and pilot.acks[me.node].version == first.version
                assert attestor.calls >= 2  # the poll and the ACK, each attested
                # what the proxy said it holds is what status shows
                assert pilot.held[me.node].serial == "0a1b"
                assert pilot.held[me.node].not_after == "2030-01-01T00:00:00+00:00"

                other = replace(me, node="p-db-netns-1", compose_service="db", service="db",
                                addresses=("10.9.0.9",), proxy_container_id="b" * 64)
                await pilot.publish(replace(pilot.state, workloads=(me, other)))
                await until(lambda: pilot.acks[me.node].version != first.version)
                assert pilot.acks[me.node].ok
                assert store.snapshot is not None
                assert store.snapshot.version == pilot.acks[me.node].version
                assert "db" in store.snapshot.settings.services

    asyncio.run(main())


def test_the_real_pilot_gives_a_caller_that_is_no_proxy_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host (or a container that is no proxy) polls the real socket: refused, no snapshot
    applied, no ACK recorded; the client counts failures and keeps its (empty) state."""
    monkeypatch.setattr(server, "UNKNOWN_GRACE_S", 0.2)  # how long an unknown poll is held
    sock = tmp_path / "pilot.sock"

    async def refused(attestor: Callers, status: str) -> None:
        async with real_pilot(sock, attestor) as pilot:
            store = ConfigStore()
            client = PilotClient(f"unix://{sock}", store, backoff_initial=0.05,
                                 backoff_max=0.05)
            async with running(client):
                await until(lambda: client.failures >= 1, timeout=10)
            assert store.snapshot is None
            assert pilot.acks == {}
            assert client.last_error == f"GET /v1/snapshot answered {status}"

    async def main() -> None:
        await refused(Callers().host(), "403")  # the host steers the mesh; it is no proxy
        await refused(Callers().stranger(), "503")  # maybe a proxy not seen yet: come back

    asyncio.run(main())
