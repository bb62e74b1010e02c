"""`composemesh certs rotate-root` against a real pilot API (its proxies stood in for by a
test double that ACKs and renews as proxies do); its pure decisions: tests/engine/test_rotation.py.

The pilot runs in-process, served on a real Unix socket in tmp_path as it serves its API; the
CLI reaches it with its own socket client (``engine.pilot_api.PilotChannel``, given the
socket's path as the host path of the socket volume). Who calls is said by
``tests/pilot/callers.Callers`` (the host; attestation itself: test_attest.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from composemesh import cli
from composemesh.ca import csr_to_pem, fingerprint, generate_key, make_csr
from composemesh.engine import pilot_api
from composemesh.engine.pilot_api import PilotChannel, PilotUnreachable
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.settings import MeshSettings
from composemesh.pilot.ca_service import CAService
from composemesh.pilot.main import bind_socket
from composemesh.pilot.server import AckRecord, HeldCertificate, Pilot, make_app
from tests.pilot.callers import Callers

# --------------------------------------------------------------------------- the command

WORKLOADS = tuple(
    Workload(node=f"shop-{s}-netns-1", project="shop", compose_service=s, service=s,
             version="v1", addresses=(f"10.9.0.{i}",), running=True, proxy_healthy=True,
             proxy_container=f"shop-{s}-proxy-1", proxy_container_id=f"{i:x}" * 64)
    for i, s in enumerate(("web", "db"), start=10)
)


@dataclass
class FakeProxies:
    """Stands in for the proxies (their data path is not what is tested here): each ACKs
    the snapshot the pilot renders for it and, when ``renew``, gets a new certificate as
    soon as the snapshot names another signing root, and says it holds it, as a real proxy
    does (its CSR from its container, its next poll naming the serial)."""

    pilot: Pilot
    renew: bool = True
    asked: list[str] | None = None  # the projects the CLI asked a channel for

    async def run(self) -> None:
        ca = self.pilot.ca
        assert ca is not None
        while True:
            for w in self.pilot.state.workloads:
                snap = self.pilot.snapshot_for(w)
                record = ca.record_for(w)
                if self.renew and (record is None or
                                   record.issuer_fingerprint != snap.settings.signing_root):
                    ca.issue(csr_to_pem(make_csr(generate_key())), w, w.proxy_container_id or "")
                    issued = ca.issued[w.node]
                    self.pilot.held[w.node] = HeldCertificate(issued.serial, issued.not_after)
                self.pilot.acks[w.node] = AckRecord(snap.version, True, "", time.time())
            await asyncio.sleep(0.02)


@pytest.fixture
def pilot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProxies]:
    """A pilot with a CA on a Unix socket in its own thread, which attests every caller as
    the host; the CLI's channel to project "shop" is that socket."""
    ca = CAService.load_or_create(MeshSettings(), "shop", tmp_path / "state", {})
    the_pilot = Pilot(MeshState(project="shop", workloads=WORKLOADS), None, ca,
                      attestor=Callers().host())
    the_pilot.synced = True
    proxies = FakeProxies(the_pilot)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(make_app(the_pilot), access_log=None, shutdown_timeout=0.1)
    loop.run_until_complete(runner.setup())
    sock = tmp_path / "pilot.sock"
    loop.run_until_complete(web.SockSite(runner, bind_socket(str(sock))).start())
    task = loop.create_task(proxies.run())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asked: list[str] = []

    def channel(project: str) -> PilotChannel:
        asked.append(project)
        return PilotChannel(project, "unused", host_socket=str(sock))

    monkeypatch.setattr(pilot_api, "find_channel", channel)
    proxies.asked = asked
    try:
        yield proxies
    finally:
        loop.call_soon_threadsafe(task.cancel)
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines as they are, not folded at the runner's 80 columns."""
    for console in (cli.out, cli.err):
        monkeypatch.setattr(console, "width", 300)


def rotate_root(*args: str) -> Any:
    return CliRunner().invoke(cli.main, ["certs", "rotate-root", "-p", "shop", *args])


def test_rotate_root_takes_every_step_and_waits_for_every_proxy(pilot: FakeProxies) -> None:
    ca = pilot.pilot.ca
    assert ca is not None
    old = fingerprint(ca.root_cert)
    result = rotate_root("--timeout", "10")
    assert result.exit_code == 0, result.output
    new = fingerprint(ca.root_cert)
    assert new != old and ca.authority.roots.phase == "steady"
    assert ca.authority.roots.trusted == (ca.root_cert,)
    assert all(r.issuer_fingerprint == new for r in ca.issued.values())
    assert set(pilot.asked or ()) == {"shop"}
    attestor = pilot.pilot.attestor
    assert isinstance(attestor, Callers)
    assert attestor.calls >= 6  # every request over the socket, each attested
    text = " ".join(result.output.split())
    for line in ("begin: 2/2 proxies ACKed the bundle with both roots",
                 "switch: 2/2 proxies ACKed the new signing root, 2/2 hold a certificate of "
                 "the new root",
                 "finish: 2/2 proxies ACKed the bundle without the old root",
                 f"old root {old}", f"new root {new}",
                 "every proxy trusts and holds a certificate of the new root in"):
        assert line in text, line


def test_a_proxy_that_does_not_renew_stops_it_and_a_second_run_goes_on(
        pilot: FakeProxies) -> None:
    ca = pilot.pilot.ca
    assert ca is not None
    old = fingerprint(ca.root_cert)
    pilot.renew = False
    started = time.monotonic()
    result = rotate_root("--timeout", "1")
    assert result.exit_code == 1
    assert time.monotonic() - started < 5
    assert " ".join(result.output.split()).endswith(
        "error: the root rotation stopped after its switch step: shop-db-netns-1, "
        "shop-web-netns-1 did not catch up within 1s; the mesh keeps working as it is, and "
        "`composemesh certs rotate-root` goes on from there")
    assert ca.authority.roots.phase == "switched"  # the old root is still trusted

    pilot.renew = True
    result = rotate_root("--timeout", "10")
    assert result.exit_code == 0, result.output
    assert f"old root {old}" in " ".join(result.output.split())  # the same rotation
    assert ca.authority.roots.phase == "steady"


def test_the_users_own_root_is_refused_up_front(pilot: FakeProxies) -> None:
    assert pilot.pilot.ca is not None
    pilot.pilot.ca.source = "user"
    result = rotate_root()
    assert result.exit_code == 1
    assert "the mesh's root is your own (x-composemesh.mtls.root)" in result.output
    assert pilot.pilot.ca.authority.roots.phase == "steady"


def test_the_host_only_api_refuses_a_proxy_and_the_cli_says_so_in_one_line(
        pilot: FakeProxies) -> None:
    """The same socket, but the kernel names a proxy as the caller: the root is not its to
    rotate (403), and the CLI says the pilot's reason and changes nothing."""
    attestor = pilot.pilot.attestor
    assert isinstance(attestor, Callers)
    attestor.proxy(WORKLOADS[0].node)
    result = rotate_root("--timeout", "2")
    assert result.exit_code == 2  # a refused request (a 4xx to what was sent)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text == "error: a root rotation is not for the proxy"  # GET /v1/ca: any caller
    assert pilot.pilot.ca is not None and pilot.pilot.ca.authority.roots.phase == "steady"


def test_no_running_pilot_is_one_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    """``find_channel`` finds no pilot container: the CLI says so in one sentence."""
    asked: list[str] = []

    def nothing(project: str) -> PilotChannel:
        asked.append(project)
        raise PilotUnreachable(f"no running pilot in project {project!r}; is the mesh up?")

    monkeypatch.setattr(pilot_api, "find_channel", nothing)
    result = rotate_root()
    assert result.exit_code == 1
    assert asked == ["shop"]
    assert "no running pilot in project 'shop'; is the mesh up?" in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


def test_a_pilot_whose_socket_does_not_answer_is_one_sentence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel to a socket nobody listens on (a pilot that went away): one line, exit 1."""
    gone = str(tmp_path / "pilot.sock")
    monkeypatch.setattr(pilot_api, "find_channel",
                        lambda project: PilotChannel(project, "unused", host_socket=gone))
    result = rotate_root()
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert f"the pilot of 'shop' does not answer: the pilot's socket {gone}" in text


def test_the_project_comes_from_the_compose_file_as_compose_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def nothing(project: str) -> PilotChannel:
        asked.append(project)
        raise PilotUnreachable(f"no running pilot in project {project!r}; is the mesh up?")

    monkeypatch.setattr(pilot_api, "find_channel", nothing)
    compose = tmp_path / "compose.yaml"
    compose.write_text("name: shop-two\nservices:\n  web:\n    image: busybox\n")
    args = ["certs", "rotate-root", "-f", str(compose)]
    assert CliRunner().invoke(cli.main, args).exit_code == 1
    assert CliRunner().invoke(cli.main, [*args, "-p", "other"]).exit_code == 1
    assert asked == ["shop-two", "other"]


def test_certs_without_a_subcommand_still_shows_the_ca(pilot: FakeProxies) -> None:
    result = CliRunner().invoke(cli.main, ["certs", "-p", "shop", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ca"]["rotation_phase"] == "steady" and "trust_bundle_pem" not in data["ca"]
    assert {p["node"] for p in data["proxies"]} == {w.node for w in WORKLOADS}
    result = CliRunner().invoke(cli.main, ["certs", "-p", "shop"])
    assert result.exit_code == 0 and "none under way" in result.output
