"""How the host's user reaches a project's pilot (``engine.pilot_api``): over its Unix socket,
or through ``docker exec`` and the relay, never a network port.

The pilot here is a small aiohttp app on a real Unix socket in tmp_path that answers what it
was asked (method, path, body) and scripted 4xx answers; the Docker engine is the fake of
tests/engine/fake_engine.py, reached through the real Docker SDK: it lists and inspects the
pilot's container as told, and runs an exec as the real relay
(``python3 -m composemesh.engine.pilot_api``, in a process of its own) against that socket.
``PilotClient``, the CLI's client, is tested over the same socket.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from composemesh.engine import pilot_api
from composemesh.engine.pilot_api import (
    Answer,
    PilotChannel,
    PilotClient,
    PilotUnreachable,
    _host_socket,
    find_channel,
    over_socket,
    socket_on_host,
)
from composemesh.errors import ConfigError, EngineError
from composemesh.model import wellknown as wk
from tests.engine.fake_engine import Engine

REPO = Path(__file__).resolve().parents[2]
PILOT_ID = "c0ffee" + "0" * 58


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "method": request.method, "path": request.path_qs,
        "content_type": request.headers.get("Content-Type"),
        "body": body.decode(), "host": request.headers.get("Host"),
    })


async def refuse(request: web.Request) -> web.Response:
    return web.json_response({"error": "a rotation is already under way"}, status=409)


def app() -> web.Application:
    application = web.Application()
    application.router.add_route("*", "/v1/echo", echo)
    application.router.add_post("/v1/ca/rotate", refuse)
    return application


@pytest.fixture
def pilot_socket(tmp_path: Path) -> Iterator[Path]:
    """The app above on a Unix socket (``_data/pilot.sock``, as in the volume's directory),
    served from its own thread so that the blocking client can be called directly."""
    data = tmp_path / "_data"
    data.mkdir()
    sock = data / "pilot.sock"
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app(), access_log=None, shutdown_timeout=0.1)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.UnixSite(runner, str(sock)).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield sock
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# --------------------------------------------------------------------------- over the socket


def test_a_request_over_the_socket_passes_status_and_body_through(pilot_socket: Path) -> None:
    channel = PilotChannel("shop", "unused", host_socket=str(pilot_socket))
    answer = channel.request("GET", "/v1/echo?x=1")
    assert answer.status == 200
    assert answer.json() == {"method": "GET", "path": "/v1/echo?x=1", "content_type": None,
                             "body": "", "host": "composemesh-pilot"}

    sent = json.dumps({"weights": {"v1": 80, "v2": 20}}).encode()
    answer = channel.request("PUT", "/v1/echo", sent)
    assert answer.status == 200
    echoed: Any = answer.json()
    assert (echoed["method"], echoed["content_type"]) == ("PUT", "application/json")
    assert json.loads(echoed["body"]) == {"weights": {"v1": 80, "v2": 20}}


def test_a_4xx_passes_through_as_an_answer(pilot_socket: Path) -> None:
    channel = PilotChannel("shop", "unused", host_socket=str(pilot_socket))
    answer = channel.request("POST", "/v1/ca/rotate", b'{"step": "begin"}')
    assert answer == Answer(409, b'{"error": "a rotation is already under way"}')
    assert answer.json() == {"error": "a rotation is already under way"}
    missing = channel.request("GET", "/v1/nosuch")
    assert missing.status == 404
    assert Answer(204, b"").json() is None


def test_a_missing_socket_is_pilot_unreachable(tmp_path: Path) -> None:
    gone = str(tmp_path / "pilot.sock")
    channel = PilotChannel("shop", "unused", host_socket=gone)
    with pytest.raises(PilotUnreachable, match=re.escape(f"the pilot's socket {gone}: ")):
        channel.request("GET", "/v1/status")
    with pytest.raises(OSError):
        over_socket(gone, "GET", "/v1/status")


def test_something_on_the_socket_that_is_no_http_is_pilot_unreachable(tmp_path: Path) -> None:
    path = str(tmp_path / "pilot.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        server.settimeout(10)

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(PilotUnreachable, match="answered no HTTP"):
            PilotChannel("shop", "unused", host_socket=path).request("GET", "/v1/status")
        thread.join()


# --------------------------------------------------------------------------- the relay


def relay(monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes],
          argv: list[str], stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = pilot_api.main(argv)
    out, err = capsysbinary.readouterr()
    return code, out, err


def test_the_relay_prints_the_status_line_then_the_body(
        pilot_socket: Path, monkeypatch: pytest.MonkeyPatch,
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    monkeypatch.setattr(pilot_api, "PILOT_SOCKET", str(pilot_socket))
    code, out, _ = relay(monkeypatch, capsysbinary, ["GET", "/v1/echo"])
    assert code == 0
    status, _, body = out.partition(b"\n")
    assert status == b"200" and json.loads(body)["method"] == "GET"

    code, out, _ = relay(monkeypatch, capsysbinary, ["POST", "/v1/echo"], b'{"step": "x"}')
    assert code == 0
    status, _, body = out.partition(b"\n")
    assert status == b"200" and json.loads(json.loads(body)["body"]) == {"step": "x"}

    code, out, _ = relay(monkeypatch, capsysbinary, ["POST", "/v1/ca/rotate"], b"{}")
    assert (code, out) == (0, b'409\n{"error": "a rotation is already under way"}')


def test_the_relay_says_why_it_cannot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    monkeypatch.setattr(pilot_api, "PILOT_SOCKET", str(tmp_path / "pilot.sock"))
    code, out, err = relay(monkeypatch, capsysbinary, ["GET", "/v1/status"])
    assert (code, out) == (1, b"")
    assert err.startswith(b"the pilot's socket does not answer: ")
    code, out, err = relay(monkeypatch, capsysbinary, ["GET"])
    assert (code, out) == (2, b"") and b"usage" in err


# --------------------------------------------------------------------------- finding the pilot

PILOT_LABELS = {"com.docker.compose.project": "shop", wk.LABEL_ROLE: wk.ROLE_PILOT}
RELAY = ("import os, sys; from composemesh.engine import pilot_api; "
         "pilot_api.PILOT_SOCKET = os.environ['FAKE_PILOT_SOCKET']; "
         "sys.exit(pilot_api.main(sys.argv[1:]))")


def relay_in_the_container(sock: Path, ran: list[list[str]] | None = None) -> Any:
    """An exec as the pilot's container runs it: the real relay, its socket at ``sock``."""

    def run(container: str, cmd: list[str], env: dict[str, str]) -> tuple[int, bytes, bytes]:
        assert container == PILOT_ID
        assert cmd[:3] == ["python3", "-m", "composemesh.engine.pilot_api"], cmd
        if ran is not None:
            ran.append(cmd)
        proc = subprocess.run([sys.executable, "-c", RELAY, *cmd[3:]], stdin=subprocess.DEVNULL,
                              capture_output=True, cwd=REPO, timeout=30, check=False,
                              env={**os.environ, **env, "FAKE_PILOT_SOCKET": str(sock)})
        return proc.returncode, proc.stdout, proc.stderr

    return run


def mounts(source: Path) -> list[dict[str, str]]:
    return [
        {"Type": "bind", "Source": "/var/run/docker.sock", "Destination": "/var/run/docker.sock"},
        {"Type": "volume", "Name": "shop_composemesh-pilot-socket", "Source": str(source),
         "Destination": wk.PILOT_SOCKET_DIR},
    ]


def test_no_running_pilot_is_pilot_unreachable_in_one_sentence(engine: Engine) -> None:
    engine.add("a" * 64, "shop-web-1", {"com.docker.compose.project": "shop"})
    engine.add(PILOT_ID, "shop-pilot-1", PILOT_LABELS, running=False)
    with pytest.raises(PilotUnreachable) as info:
        find_channel("shop")
    assert str(info.value) == "no running pilot in project 'shop'; is the mesh up?"
    listed = [q for _, path, q in engine.calls if path == "/containers/json"]
    assert [json.loads(q["filters"][0]) for q in listed] == [{"label": [
        "com.docker.compose.project=shop", f"{wk.LABEL_ROLE}={wk.ROLE_PILOT}"]}]


def test_the_pilot_is_found_with_its_sockets_host_path(
        engine: Engine, pilot_socket: Path) -> None:
    engine.add(PILOT_ID, "shop-pilot-1", PILOT_LABELS, Mounts=mounts(pilot_socket.parent))
    channel = find_channel("shop")
    assert channel == PilotChannel("shop", PILOT_ID[:12], str(pilot_socket))  # as docker ps
    assert channel.request("GET", "/v1/echo").status == 200  # straight to the socket
    assert not [c for c in engine.calls if "exec" in c[1]]  # no docker exec


def test_host_socket_is_none_when_the_path_is_not_writable(
        engine: Engine, pilot_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who may not write the socket under Docker's volume directory (not the host's
    root) goes through docker exec instead; so does one whose engine keeps it elsewhere."""
    engine.add(PILOT_ID, "shop-pilot-1", PILOT_LABELS, Mounts=mounts(pilot_socket.parent))
    assert _host_socket(PILOT_ID) == str(pilot_socket)
    assert socket_on_host(mounts(pilot_socket.parent)) == str(pilot_socket)
    asked: list[tuple[str, int]] = []

    def no_write(path: str, mode: int) -> bool:  # as for a user in the docker group
        asked.append((path, mode))
        return False

    with monkeypatch.context() as m:
        m.setattr(pilot_api.os, "access", no_write)
        assert socket_on_host(mounts(pilot_socket.parent)) is None
    assert asked == [(str(pilot_socket), os.W_OK)]
    # no socket there (an engine in a VM keeps its volumes out of reach): not writable either
    assert socket_on_host(mounts(pilot_socket.parent / "elsewhere")) is None
    # no socket volume mounted at all, or a container the engine does not know
    assert socket_on_host([]) is None
    assert _host_socket("gone") is None


def test_without_the_host_path_the_request_goes_through_docker_exec_and_the_relay(
        engine: Engine, pilot_socket: Path) -> None:
    ran: list[list[str]] = []
    engine.add(PILOT_ID, "shop-pilot-1", PILOT_LABELS)
    engine.on_exec = relay_in_the_container(pilot_socket, ran)
    channel = PilotChannel("shop", PILOT_ID[:12], host_socket=None)
    answer = channel.request("POST", "/v1/echo", b'{"step": "begin"}')
    assert answer.status == 200
    echoed: Any = answer.json()
    assert (echoed["method"], json.loads(echoed["body"])) == ("POST", {"step": "begin"})
    assert channel.request("POST", "/v1/ca/rotate", b"{}") == Answer(
        409, b'{"error": "a rotation is already under way"}')
    queried: Any = channel.request("GET", "/v1/echo?x=1").json()
    assert queried["path"] == "/v1/echo?x=1"
    assert ran[0] == ["python3", "-m", "composemesh.engine.pilot_api", "POST", "/v1/echo"]


def test_a_socket_the_user_may_not_open_falls_back_to_docker_exec(
        engine: Engine, pilot_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES on the host path (it was writable when looked at, not when opened): the same
    request through docker exec."""
    ran: list[list[str]] = []
    engine.add(PILOT_ID, "shop-pilot-1", PILOT_LABELS)
    engine.on_exec = relay_in_the_container(pilot_socket, ran)

    def denied(path: str, *args: object, **kwargs: object) -> Answer:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pilot_api, "over_socket", denied)
    # the relay runs in a process of its own: its over_socket is not the denied one
    channel = PilotChannel("shop", PILOT_ID, host_socket=str(pilot_socket))
    assert channel.request("GET", "/v1/echo").status == 200
    assert len(ran) == 1


def test_docker_exec_that_fails_is_pilot_unreachable(engine: Engine, tmp_path: Path) -> None:
    engine.add(PILOT_ID, "shop-pilot-1", PILOT_LABELS)
    engine.on_exec = relay_in_the_container(tmp_path / "none.sock")  # the relay fails
    channel = PilotChannel("shop", PILOT_ID[:12], host_socket=None)
    with pytest.raises(PilotUnreachable) as info:
        channel.request("GET", "/v1/status")
    message = str(info.value)
    assert message.startswith(f"docker exec {PILOT_ID[:12]}: the pilot's socket does not answer")
    assert "\n" not in message
    gone = PilotChannel("shop", "0badc0ffee00", host_socket=None)  # a pilot removed since
    with pytest.raises(PilotUnreachable, match="^docker exec 0badc0ffee00: Error response from "
                                               "daemon: No such container: 0badc0ffee00$"):
        gone.request("GET", "/v1/status")


# --------------------------------------------------------------------------- the CLI's client


def test_the_client_finds_the_pilot_once_and_speaks_json(
        pilot_socket: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found: list[str] = []

    def find(project: str) -> PilotChannel:
        found.append(project)
        return PilotChannel(project, "unused", host_socket=str(pilot_socket))

    monkeypatch.setattr(pilot_api, "find_channel", find)
    client = PilotClient("shop")
    assert client.request("/v1/echo")["method"] == "GET"
    echoed = client.request("/v1/echo", "PUT", {"weights": {"v1": 100}})
    assert (echoed["method"], json.loads(echoed["body"])) == ("PUT", {"weights": {"v1": 100}})
    assert found == ["shop"]


def test_the_clients_errors_are_the_clis(pilot_socket: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    client = PilotClient("shop", PilotChannel("shop", "unused", host_socket=str(pilot_socket)))
    with pytest.raises(ConfigError, match="^a rotation is already under way$"):
        client.request("/v1/ca/rotate", "POST", {"step": "begin"})  # a 4xx to a sent body
    with pytest.raises(EngineError, match="^the pilot of 'shop' answered 404 to /v1/nosuch "
                                          "with no JSON$"):
        client.request("/v1/nosuch")

    def nothing(project: str) -> PilotChannel:
        raise PilotUnreachable(f"no running pilot in project {project!r}; is the mesh up?")

    monkeypatch.setattr(pilot_api, "find_channel", nothing)
    with pytest.raises(EngineError, match="^no running pilot in project 'shop'; is the mesh"):
        PilotClient("shop").status()
    gone = str(tmp_path / "gone.sock")
    lost = PilotClient("shop", PilotChannel("shop", "unused", host_socket=gone))
    with pytest.raises(EngineError, match=f"^the pilot of 'shop' does not answer: the pilot's "
                                          f"socket {re.escape(gone)}: "):
        lost.status()
    # a channel that stopped answering is looked for again on the next call
    with pytest.raises(EngineError, match="^no running pilot in project 'shop'"):
        lost.status()
