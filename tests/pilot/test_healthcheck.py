"""The pilot's healthcheck: ``python3 -m composemesh.healthcheck unix:SOCKET``, one GET of
``/healthz/ready`` on the pilot's Unix socket (the pilot has no port to probe).

The pilot's own app answers, on a real socket in tmp_path bound as the pilot binds it: 503
while it has not synced with the engine, 200 once it has. Readiness asks nobody who calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner

from composemesh import cli, healthcheck
from composemesh.healthcheck import probe
from composemesh.inject.templates import PILOT_HEALTHCHECK
from composemesh.model import wellknown as wk
from composemesh.model.mesh import MeshState
from composemesh.pilot.main import bind_socket
from composemesh.pilot.server import Pilot, make_app
from tests.pilot.callers import Callers


@contextlib.asynccontextmanager
async def serving(sock: Path) -> AsyncIterator[tuple[Pilot, Callers]]:
    attestor = Callers().stranger()  # whoever probes: readiness is no one's secret
    pilot = Pilot(MeshState(project="shop"), attestor=attestor)
    runner = web.AppRunner(make_app(pilot), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    try:
        await web.SockSite(runner, bind_socket(str(sock))).start()
        yield pilot, attestor
    finally:
        await runner.cleanup()


def test_the_probe_of_the_pilots_socket_says_503_then_200(tmp_path: Path) -> None:
    sock = tmp_path / "pilot.sock"

    async def main() -> None:
        async with serving(sock) as (pilot, attestor):
            assert await asyncio.to_thread(probe, str(sock)) == (False, "syncing")
            pilot.synced = True
            assert await asyncio.to_thread(probe, str(sock)) == (True, "")
            assert attestor.calls == 0  # readiness attests nobody
        ready, reason = await asyncio.to_thread(probe, str(sock))  # nobody listens now
        assert not ready and reason.startswith(f"the socket {sock} did not answer")

    asyncio.run(main())


def test_the_healthcheck_command_takes_a_unix_target(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As Docker runs it in the pilot: exit 0 when ready, else 1 and the pilot's reason."""
    sock = tmp_path / "pilot.sock"

    async def main() -> None:
        async with serving(sock) as (pilot, _):
            assert await asyncio.to_thread(healthcheck.main, [f"unix:{sock}"]) == 1
            assert capsys.readouterr().out == "syncing\n"
            pilot.synced = True
            assert await asyncio.to_thread(healthcheck.main, [f"unix:{sock}"]) == 0
            assert capsys.readouterr().out == ""
            # another path on the same socket: the pilot's 404, said as the reason
            assert await asyncio.to_thread(healthcheck.main, [f"unix:{sock}", "/nope"]) == 1
            assert "404" in capsys.readouterr().out

    asyncio.run(main())
    assert healthcheck.main([f"unix:{sock}"]) == 1
    assert f"the socket {sock} did not answer" in capsys.readouterr().out
    assert healthcheck.main(["pilot.sock"]) == 2 and "unix:SOCKET" in capsys.readouterr().err


def test_a_socket_that_answers_no_http_is_said_so(tmp_path: Path) -> None:
    path = str(tmp_path / "other.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        server.settimeout(10)  # the thread ends even if the probe never connects

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        ready, reason = probe(path)
        thread.join()
    assert not ready and reason == f"the socket {path} answered no HTTP: 'SSH-2.0-OpenSSH'"


def test_the_injected_pilot_and_pilot_ready_probe_the_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compose healthcheck of the pilot and `composemesh pilot-ready` name the socket."""
    assert PILOT_HEALTHCHECK["test"] == ["CMD", "python3", "-m", "composemesh.healthcheck",
                                         f"unix:{wk.PILOT_SOCKET}"]
    sock = tmp_path / "pilot.sock"
    monkeypatch.setattr(wk, "PILOT_SOCKET", str(sock))

    async def main() -> None:
        async with serving(sock) as (pilot, _):
            result = await asyncio.to_thread(CliRunner().invoke, cli.main, ["pilot-ready"])
            assert result.exit_code == 1 and "syncing" in result.output
            pilot.synced = True
            result = await asyncio.to_thread(CliRunner().invoke, cli.main, ["pilot-ready"])
            assert result.exit_code == 0, result.output

    asyncio.run(main())
