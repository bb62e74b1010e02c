"""Who is calling the pilot: the kernel's word for the peer of its Unix socket, never a claim.

This is SPIRE's Docker workload attestor, for one pilot. The pilot's API is served on a Unix
socket (``/run/composemesh/pilot.sock``) in a volume that only the mesh's own containers
mount (the proxies read-only, so none can put a socket of its own in its place); no port of
the pilot is on any network. For each connection the kernel names the peer process
(``SO_PEERPIDFD``, or ``SO_PEERCRED`` where the kernel is older); the pilot runs in the host's
PID namespace (``pid: host``) so that every PID means the same process as on the host. The
process's cgroup (``/proc/<pid>/cgroup``) names the container it runs in; while the pidfd
shows the process alive, that PID cannot have been handed to another process. Then the
Docker engine's view decides, in ``classify`` (pure):

- a proxy container of this project, paired by the engine with the netns holder whose
  namespace it joined: a ``proxy`` caller, of that workload (its certificate names the
  workload's mesh service; its ACKs are its own);
- the pilot's own container (``docker exec`` into it): the ``pilot`` itself;
- a process in no container: the ``host`` (only the host's root can reach the socket there,
  under Docker's volume directory): route changes, root rotation, status;
- any other container: refused. An app shares its proxy's network namespace but not its
  mounts: it cannot open the socket at all.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import struct
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from composemesh.errors import MeshError
from composemesh.model.mesh import MeshState, Workload

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.11 lacks the name
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
# A container id in a cgroup path: cgroupfs (/docker/<id>), systemd (docker-<id>.scope),
# nested engines (/…/docker/<id>), each as its own path segment.
_CONTAINER_ID = re.compile(r"(?:^|/)(?:docker-)?([0-9a-f]{64})(?:\.scope)?(?=/|$)")

Role = Literal["proxy", "pilot", "host"]


class AttestationError(MeshError):
    """The peer of the pilot's socket cannot be attested; the message says why."""


@dataclass(frozen=True)
class PeerProcess:
    """The process at the other end of a Unix socket, as the kernel names it."""

    pid: int  # in the pilot's PID namespace (the host's)
    uid: int
    gid: int
    container_id: str | None  # the container its cgroup names, None: in no container


@dataclass(frozen=True)
class Caller:
    """An attested caller of the pilot's API."""

    role: Role
    pid: int
    container_id: str | None = None
    workload: Workload | None = None  # a proxy's workload

    @property
    def proxy_workload(self) -> Workload:
        """The workload of a ``proxy`` caller (whose role the caller has checked)."""
        assert self.workload is not None, self
        return self.workload

    def describe(self) -> str:
        """For logs: who it is and how it was known."""
        if self.role == "proxy" and self.workload is not None:
            return f"proxy of {self.workload.node} (pid {self.pid})"
        return f"{self.role} (pid {self.pid})"


@dataclass(frozen=True)
class Unknown:
    """A peer the pilot does not serve (yet): ``retry`` when it may be a proxy not seen yet."""

    reason: str
    retry: bool = False


def container_id_of_cgroup(text: str) -> str | None:
    """The container id a ``/proc/<pid>/cgroup`` names (pure), None for a process in none.

    AttestationError when its lines name different containers: nothing sane does that.
    """
    ids = {m.group(1) for line in text.splitlines()
           for m in _CONTAINER_ID.finditer(line.split(":", 2)[-1])}
    if len(ids) > 1:
        raise AttestationError(f"the peer's cgroups name {len(ids)} containers")
    return next(iter(ids), None)


def classify(peer: PeerProcess, state: MeshState, own_container: str | None) -> Caller | Unknown:
    """Who ``peer`` is in the mesh of ``state`` (pure); the pilot runs in ``own_container``."""
    cid = peer.container_id
    if cid is None:
        return Caller("host", peer.pid)
    if own_container is not None and cid == own_container:
        return Caller("pilot", peer.pid, cid)
    for workload in state.workloads:
        if workload.proxy_container_id == cid:
            return Caller("proxy", peer.pid, cid, workload)
    return Unknown(f"container {cid[:12]} is no proxy of project {state.project!r} that the "
                   f"pilot knows", retry=True)


def peer_process(sock: socket.socket, proc: str = "/proc") -> PeerProcess:
    """The peer of the connected Unix socket ``sock``, its container from its cgroup.

    AttestationError when the kernel names no process the pilot can see (a peer in another
    PID namespace: the pilot must run with ``pid: host``), or it ended before it was known.
    """
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    pidfd = _peer_pidfd(sock)
    try:
        if pidfd is not None:
            pid = _pid_of_pidfd(pidfd, proc)
        if pid < 0:
            raise AttestationError("the peer's process ended before it was attested")
        if pid == 0:
            raise AttestationError("the peer's process is not visible to the pilot (the pilot "
                                   "must share the host's PID namespace: pid: host)")
        try:
            with open(f"{proc}/{pid}/cgroup") as f:
                cgroup = f.read()
        except OSError as exc:
            raise AttestationError(f"cannot read the cgroup of pid {pid}: {exc}") from None
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, 0)  # signal 0: only whether it still lives
            except PermissionError:
                pass  # another user's process (the proxies' uid): alive, or it would be ESRCH
            except ProcessLookupError:
                raise AttestationError(f"pid {pid} ended before it was attested") from None
        return PeerProcess(pid, uid, gid, container_id_of_cgroup(cgroup))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def own_container_id(proc: str = "/proc") -> str | None:
    """The container this process runs in (its cgroup), None outside one."""
    with contextlib.suppress(OSError, AttestationError), open(f"{proc}/self/cgroup") as f:
        return container_id_of_cgroup(f.read())
    return None


def _peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd of the peer (Linux 6.5+), None where the kernel has no SO_PEERPIDFD."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        return None


def _pid_of_pidfd(pidfd: int, proc: str) -> int:
    """The PID a pidfd refers to, in our PID namespace (0: not in it; -1: it ended)."""
    with open(f"{proc}/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return 0


class KernelAttestor:
    """The real attestor: the peer of the Unix socket the request came on (``attest``)."""

    def __init__(self, own_container: str | None = None) -> None:
        self.own_container = own_container if own_container is not None else own_container_id()

    def __call__(self, request: web.Request, state: MeshState) -> Caller | Unknown:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family != socket.AF_UNIX:
            return Unknown("the pilot answers on its Unix socket only")
        try:
            peer = peer_process(sock)
        except (AttestationError, OSError) as exc:
            return Unknown(str(exc))
        return classify(peer, state, self.own_container)
