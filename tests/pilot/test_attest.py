"""The pilot's attestation: cgroup parsing and classification (pure), and the kernel's word for
a real Unix socket's peer (real processes: this one, a child, one that ended)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from composemesh.model.mesh import MeshState, Workload
from composemesh.pilot.attest import (
    AttestationError,
    Caller,
    PeerProcess,
    Unknown,
    classify,
    container_id_of_cgroup,
    own_container_id,
    peer_process,
)

A = "a" * 64
B = "0123456789abcdef" * 4
WEB = Workload(node="p-web-netns-1", project="p", compose_service="web", service="web",
               version="v1", addresses=("10.0.0.2",), running=True,
               proxy_container="p-web-proxy-1", proxy_container_id=A)
STATE = MeshState(project="p", workloads=(WEB,))


@pytest.mark.parametrize("text", [
    f"0::/system.slice/docker-{A}.scope\n",  # systemd driver, cgroup v2
    f"12:memory:/docker/{A}\n11:pids:/docker/{A}\n0::/\n",  # cgroupfs, v1
    f"4:memory:/process_api/xyz/docker/{A}\n3:cpu:/\n",  # an engine in a nested cgroup
    f"0::/../../docker-{A}.scope\n",  # seen from another cgroup namespace
    f"0::/docker/{A}/init.scope\n",  # systemd inside the container
])
def test_a_container_is_named_by_its_cgroup_whatever_the_driver(text: str) -> None:
    assert container_id_of_cgroup(text) == A


@pytest.mark.parametrize("text", [
    "0::/\n",
    "0::/user.slice/user-0.slice/session-1.scope\n",
    "4:memory:/process_api/5ebaa829404546cb37ff5f0736bae383\n",  # 32 hex: not a container
    f"0::/x{A}\n",  # not a path segment of its own
    f"0::/{A}0\n",  # 65 hex
])
def test_a_process_in_no_container_is_named_by_none(text: str) -> None:
    assert container_id_of_cgroup(text) is None


def test_two_containers_in_one_cgroup_list_are_refused() -> None:
    with pytest.raises(AttestationError, match="2 containers"):
        container_id_of_cgroup(f"1:memory:/docker/{A}\n2:pids:/docker/{B}\n")


def test_classify_by_the_engines_view_never_by_a_claim() -> None:
    proxy = classify(PeerProcess(10, 1337, 1337, A), STATE, own_container=B)
    assert isinstance(proxy, Caller) and proxy.role == "proxy" and proxy.workload == WEB
    assert classify(PeerProcess(11, 0, 0, B), STATE, own_container=B) == Caller("pilot", 11, B)
    assert classify(PeerProcess(12, 0, 0, None), STATE, own_container=B) == Caller("host", 12)
    stranger = classify(PeerProcess(13, 0, 0, "c" * 64), STATE, own_container=B)
    assert isinstance(stranger, Unknown) and "no proxy of project 'p'" in stranger.reason
    # the app of the same workload runs in another container: no proxy, whatever its uid
    app = classify(PeerProcess(14, 1337, 1337, "d" * 64), STATE, own_container=B)
    assert isinstance(app, Unknown)
    # a pilot outside any container (tests, a host install) sees no "pilot" caller
    assert classify(PeerProcess(15, 0, 0, B), STATE, own_container=None) != Caller("pilot", 15, B)
    # a stopped-and-recreated proxy has a new id: the old id is nobody
    moved = MeshState(project="p", workloads=(replace(WEB, proxy_container_id=B),))
    assert isinstance(classify(PeerProcess(16, 1337, 1337, A), moved, None), Unknown)


def test_the_kernel_names_the_peer_of_a_real_socket(tmp_path: Path) -> None:
    """A child process connects; the pilot side learns its PID from the kernel (not from
    anything it sent) and reads that process's cgroup."""
    path = str(tmp_path / "pilot.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    child: subprocess.Popen[bytes] | None = None
    try:
        server.bind(path)
        server.listen(1)
        server.settimeout(30)
        child = subprocess.Popen(
            [sys.executable, "-c",
             "import socket, sys, time\n"
             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'pid 1')\n"
             "time.sleep(30)\n", path])
        conn, _ = server.accept()
        with conn:
            peer = peer_process(conn)
            assert peer.pid == child.pid  # what the kernel says, not the b"pid 1" it sent
            assert (peer.uid, peer.gid) == (os.getuid(), os.getgid())
            with open(f"/proc/{child.pid}/cgroup") as f:
                assert peer.container_id == container_id_of_cgroup(f.read())
    finally:
        if child is not None:
            child.kill()
            child.wait()
        server.close()


def test_a_peer_that_ended_is_not_attested(tmp_path: Path) -> None:
    """Its PID may be anybody's by now: the pidfd says it ended, and nothing is concluded."""
    path = str(tmp_path / "pilot.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(path)
        server.listen(1)
        server.settimeout(30)
        child = subprocess.Popen([sys.executable, "-c",
                                  "import socket, sys; socket.socket(socket.AF_UNIX)"
                                  ".connect(sys.argv[1])", path])
        conn, _ = server.accept()
        child.wait()
        with conn:
            try:
                peer = peer_process(conn)
            except AttestationError as exc:
                assert "ended" in str(exc) or "cgroup" in str(exc)
            else:  # a kernel without SO_PEERPIDFD: SO_PEERCRED's PID, gone from /proc
                pytest.fail(f"a process that ended was attested: {peer}")
    finally:
        server.close()


def test_own_container_is_read_from_the_processs_cgroup(tmp_path: Path) -> None:
    """A pilot in a container knows its own id (it is the ``pilot`` caller); outside one it
    knows none (no caller is taken for the pilot)."""
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "cgroup").write_text(f"12:memory:/docker/{B}\n0::/\n")
    assert own_container_id(str(tmp_path)) == B
    (tmp_path / "self" / "cgroup").write_text("0::/user.slice\n")
    assert own_container_id(str(tmp_path)) is None
    assert own_container_id(str(tmp_path / "nowhere")) is None


def test_the_real_attestor_on_the_pilots_socket_knows_the_host(tmp_path: Path) -> None:
    """The pilot's app on a real Unix socket with the kernel's attestor (no stand-in): this
    test process is the host (or, run inside a container, that container is the pilot's):
    status yes, a snapshot no."""
    import asyncio

    from aiohttp import web

    from composemesh.engine.pilot_api import over_socket
    from composemesh.pilot.attest import KernelAttestor
    from composemesh.pilot.main import bind_socket
    from composemesh.pilot.server import Pilot, make_app

    path = str(tmp_path / "pilot.sock")

    async def main() -> list[tuple[int, bytes]]:
        pilot = Pilot(STATE, attestor=KernelAttestor(own_container=own_container_id() or B))
        pilot.synced = True
        runner = web.AppRunner(make_app(pilot))
        await runner.setup()
        try:
            await web.SockSite(runner, bind_socket(path)).start()
            answers = []
            for target in ("/v1/status", "/v1/snapshot"):
                answer = await asyncio.to_thread(over_socket, path, "GET", target)
                answers.append((answer.status, answer.body))
            return answers
        finally:
            await runner.cleanup()

    (status, body), (snap, refusal) = asyncio.run(main())
    assert status == 200 and b'"project": "p"' in body
    role = b"pilot" if own_container_id() else b"host"
    assert snap == 403 and b"a snapshot is not for the " + role in refusal
