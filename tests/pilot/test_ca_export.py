"""`POST /v1/ca/export` and `composemesh certs export`: the signing root, to the host only.

The API runs as the pilot serves it (the real aiohttp app, the real CAService with its state
in tmp_path); the CLI reaches it on a real Unix socket with its own client
(``engine.pilot_api.PilotChannel``, given the socket's path as the host path of the socket
volume), as in test_rotate_root_cli.py. Who calls is said by ``tests/pilot/callers.Callers``
(attestation itself: test_attest.py; on the real engine: tests/e2e)."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from click.testing import CliRunner

from composemesh import cli
from composemesh.ca import (
    cert_from_pem,
    cert_to_pem,
    fingerprint,
    key_from_pem,
    key_to_pem,
    load_user_root,
    make_root,
)
from composemesh.engine import pilot_api
from composemesh.engine.pilot_api import PilotChannel
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.settings import MeshSettings, parse_settings
from composemesh.pilot.ca_service import (
    ENV_CA_CERT_FILE,
    ENV_CA_KEY_FILE,
    CAService,
    ExportRefused,
)
from composemesh.pilot.main import bind_socket
from composemesh.pilot.monitoring import make_monitoring_app
from composemesh.pilot.server import Pilot, make_app
from tests.pilot.callers import Callers

WEB = Workload(
    node="shop-web-netns-1", project="shop", compose_service="web", service="web",
    version="v1", addresses=("10.9.0.2",), running=True, proxy_container="shop-web-proxy-1",
    proxy_container_id="a" * 64)
ROTATING = "a root rotation is under way (phase trusting): finish " \
           "`composemesh certs rotate-root` first"
USERS = "the root is your own files (x-composemesh.mtls.root): copy them"


def generated(tmp_path: Path) -> CAService:
    return CAService.load_or_create(MeshSettings(), "shop", tmp_path / "state", {})


def users_own(tmp_path: Path) -> CAService:
    cert, key = make_root("acme root", "cluster.local")
    (tmp_path / "acme.pem").write_bytes(cert_to_pem(cert))
    (tmp_path / "acme-key.pem").write_bytes(key_to_pem(key))
    settings = parse_settings({"mtls": {"root": {"cert": "x", "key": "y"}}})
    ca = CAService.load_or_create(settings, "shop", tmp_path / "state", {
        ENV_CA_CERT_FILE: str(tmp_path / "acme.pem"),
        ENV_CA_KEY_FILE: str(tmp_path / "acme-key.pem")})
    assert ca.source == "user"
    return ca


def run(body: Callable[[Callers, TestClient], Awaitable[None]], ca: CAService | None) -> None:
    async def main() -> None:
        callers = Callers().host()
        pilot = Pilot(MeshState(project="shop", workloads=(WEB,)), None, ca, attestor=callers)
        pilot.synced = True
        async with TestClient(TestServer(make_app(pilot), host="127.0.0.1")) as client:
            await body(callers, client)

    asyncio.run(main())


async def export(client: TestClient) -> tuple[int, dict[str, Any], str]:
    resp = await client.post("/v1/ca/export", json={})
    text = await resp.text()
    return resp.status, await resp.json(), text


# --------------------------------------------------------------------------- the API


def test_the_host_gets_the_signing_roots_cert_and_key(tmp_path: Path) -> None:
    ca = generated(tmp_path)

    async def body(callers: Callers, client: TestClient) -> None:
        for who in (callers.host, callers.pilot):  # `docker exec` into the pilot: the host too
            who()
            status, answer, _ = await export(client)
            assert status == 200, answer
            cert = cert_from_pem(answer["cert_pem"])
            assert cert == ca.root_cert
            assert answer["fingerprint"] == fingerprint(ca.root_cert)
            assert key_to_pem(key_from_pem(answer["key_pem"].encode())) == \
                key_to_pem(ca.authority.roots.active.key)
            load_user_root(answer["cert_pem"].encode(), answer["key_pem"].encode())
            # what is stored in the CA's state dir, as the importing host's pilot will find it
            assert (tmp_path / "state" / "ca" / "root.pem").read_text() == answer["cert_pem"]
        resp = await client.post("/v1/ca/export", json={})
        assert resp.headers["Cache-Control"] == "no-store"
        assert (await client.get("/v1/ca/export")).status == 405  # POST only

    run(body, ca)


def test_a_proxy_or_a_stranger_gets_refused_and_nothing(tmp_path: Path) -> None:
    ca = generated(tmp_path)
    key = key_to_pem(ca.authority.roots.active.key).decode()
    secret = key.splitlines()[1]

    async def body(callers: Callers, client: TestClient) -> None:
        callers.proxy(WEB.node)
        status, answer, text = await export(client)
        assert status == 403
        assert answer == {"error": "the root's key is not for the proxy"}
        assert secret not in text and "PRIVATE KEY" not in text
        callers.stranger()
        status, answer, text = await export(client)
        assert status in (403, 503) and "PRIVATE KEY" not in text and secret not in text
        assert set(answer) == {"error"}

    run(body, ca)


def test_refused_during_a_rotation_with_the_sentence(tmp_path: Path) -> None:
    ca = generated(tmp_path)
    ca.rotate("begin")

    async def body(callers: Callers, client: TestClient) -> None:
        status, answer, text = await export(client)
        assert status == 409
        assert answer == {"error": ROTATING}
        assert "PRIVATE KEY" not in text
        ca.rotate("switch")
        status, answer, _ = await export(client)
        assert status == 409 and "(phase switched)" in answer["error"]
        ca.rotate("finish")
        status, answer, _ = await export(client)  # steady again: the new root
        assert status == 200 and cert_from_pem(answer["cert_pem"]) == ca.root_cert

    run(body, ca)


def test_refused_for_the_users_own_root_with_the_sentence(tmp_path: Path) -> None:
    ca = users_own(tmp_path)
    with pytest.raises(ExportRefused, match="copy them"):
        ca.export_root()

    async def body(callers: Callers, client: TestClient) -> None:
        status, answer, text = await export(client)
        assert (status, answer) == (409, {"error": USERS})
        assert "PRIVATE KEY" not in text

    run(body, ca)


def test_no_ca_is_404() -> None:
    async def body(callers: Callers, client: TestClient) -> None:
        status, answer, _ = await export(client)
        assert (status, answer) == (404, {"error": "this pilot runs no CA"})

    run(body, None)


def test_the_monitoring_port_does_not_serve_it(tmp_path: Path) -> None:
    async def main() -> None:
        pilot = Pilot(MeshState(project="shop", workloads=(WEB,)), None, generated(tmp_path),
                      attestor=Callers().host())
        app = make_monitoring_app(pilot.metrics, lambda: pilot.state, frozenset())
        async with TestClient(TestServer(app, host="127.0.0.1")) as mon:
            for method in ("POST", "GET"):
                resp = await mon.request(method, "/v1/ca/export")
                assert resp.status in (404, 405)
                assert "PRIVATE KEY" not in await resp.text()

    asyncio.run(main())


# --------------------------------------------------------------------------- the command


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Pilot]:
    """A pilot with a CA on a Unix socket in its own thread (its callers attested as the
    host); the CLI's channel to project "shop" is that socket."""
    the_pilot = Pilot(MeshState(project="shop", workloads=(WEB,)), None, generated(tmp_path),
                      attestor=Callers().host())
    the_pilot.synced = True
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(the_pilot), access_log=None, shutdown_timeout=0.1)
    loop.run_until_complete(runner.setup())
    sock = tmp_path / "pilot.sock"
    loop.run_until_complete(web.SockSite(runner, bind_socket(str(sock))).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(pilot_api, "find_channel",
                        lambda project: PilotChannel(project, "unused", host_socket=str(sock)))
    for console in (cli.out, cli.err):
        monkeypatch.setattr(console, "width", 300)
    try:
        yield the_pilot
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def export_cli(*args: str) -> Any:
    return CliRunner().invoke(cli.main, ["certs", "export", "-p", "shop", *args])


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_export_writes_the_pair_the_key_0600_from_its_first_byte(
        served: Pilot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int) -> None:
    out = tmp_path / "out" / "root"
    seen: list[tuple[str, int]] = []  # every file of ours in DIR, with its mode, as it appears
    real_link, real_replace, real_fchmod = os.link, os.replace, os.fchmod

    def watch() -> None:
        for entry in out.iterdir():
            seen.append((entry.name, mode(entry)))

    def link(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        watch()
        real_link(src, dst, *a, **kw)
        watch()

    def replace(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        watch()
        real_replace(src, dst, *a, **kw)
        watch()

    def fchmod(fd: int, m: int) -> None:
        watch()  # the sibling as mkstemp made it, before its mode is set
        real_fchmod(fd, m)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fchmod", fchmod)
    old = os.umask(umask)
    try:
        result = export_cli(str(out))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    ca = served.ca
    assert ca is not None
    cert_pem = (out / "root.pem").read_bytes()
    key_pem = (out / "root-key.pem").read_bytes()
    assert cert_from_pem(cert_pem) == ca.root_cert
    assert key_to_pem(key_from_pem(key_pem)) == key_to_pem(ca.authority.roots.active.key)
    assert mode(out / "root-key.pem") == 0o600
    assert mode(out / "root.pem") == 0o644
    assert mode(out) == 0o700
    assert sorted(p.name for p in out.iterdir()) == ["root-key.pem", "root.pem"]  # no temps
    keyish = [m for name, m in seen if name.startswith((".root-key.pem.", "root-key.pem"))]
    # never readable by others, not even for a moment (0400 under umask 0277 until fchmod)
    assert keyish and all(m & 0o077 == 0 for m in keyish), seen
    assert [m for name, m in seen if name == "root-key.pem"][-1] == 0o600
    assert fingerprint(ca.root_cert) in result.output
    assert "composemesh certs import" in result.output
    assert "whole mesh's trust" in result.output


def test_export_does_not_overwrite_without_force(served: Pilot, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "root-key.pem").write_text("mine")
    os.chmod(out / "root-key.pem", 0o640)
    result = export_cli(str(out))
    assert result.exit_code == 1
    assert "root-key.pem already there; pass --force to replace it" in result.output
    assert (out / "root-key.pem").read_text() == "mine" and mode(out / "root-key.pem") == 0o640
    assert not (out / "root.pem").exists()
    assert sorted(p.name for p in out.iterdir()) == ["root-key.pem"]

    (out / "root.pem").symlink_to(tmp_path / "elsewhere.pem")  # a dangling link counts too
    result = export_cli(str(out))
    assert result.exit_code == 1 and "root.pem and" in result.output
    assert not (tmp_path / "elsewhere.pem").exists()

    result = export_cli(str(out), "--force")
    assert result.exit_code == 0, result.output
    assert mode(out / "root-key.pem") == 0o600 and mode(out / "root.pem") == 0o644
    assert not (out / "root.pem").is_symlink() and not (tmp_path / "elsewhere.pem").exists()
    ca = served.ca
    assert ca is not None and cert_from_pem((out / "root.pem").read_bytes()) == ca.root_cert


def test_export_refuses_during_a_rotation_and_for_a_users_root(
        served: Pilot, tmp_path: Path) -> None:
    ca = served.ca
    assert ca is not None
    ca.rotate("begin")
    result = export_cli(str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {ROTATING}"
    assert not (tmp_path / "out").exists()

    (tmp_path / "acme").mkdir()
    served.ca = users_own(tmp_path / "acme")
    result = export_cli(str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {USERS}"
    assert not (tmp_path / "out").exists()


def test_export_refused_by_the_pilot_is_the_one_sentence(
        served: Pilot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rotation begun between the CLI's look at /v1/ca and its export: the route's 409."""
    ca = served.ca
    assert ca is not None
    steady_info = ca.info()
    monkeypatch.setattr(pilot_api.PilotClient, "ca", lambda self: steady_info)
    ca.rotate("begin")
    result = export_cli(str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output.strip() == f"error: {ROTATING}"
    assert not (tmp_path / "out").exists()


def test_the_groups_project_option_counts_too(served: Pilot, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.main, ["certs", "-p", "shop", "export", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert mode(tmp_path / "o" / "root-key.pem") == 0o600
