"""How the host's user reaches a project's pilot: its Unix socket, never a network port.

The pilot serves its API on ``/run/composemesh/pilot.sock`` in the project's socket volume.
From the host the CLI connects to that socket where Docker keeps the volume
(``/var/lib/docker/volumes/<volume>/_data``, open to the host's root only); where it cannot
(a user in the ``docker`` group, an engine in a VM) it asks through the Docker API instead:
``docker exec <pilot> python3 -m composemesh.engine.pilot_api METHOD PATH``, which relays one
request to the socket from inside the pilot's container. Either way the pilot attests the
caller by the kernel's word (the host, or its own container) and no neighbour on a network
can ask.

This module is also the relay's ``main``: it imports the standard library only, as it runs
inside the pilot's container on every call.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from composemesh.healthcheck import connect_unix
from composemesh.model.wellknown import LABEL_ROLE, PILOT_SOCKET, PILOT_SOCKET_DIR, ROLE_PILOT

TIMEOUT_S = 10.0


class PilotUnreachable(Exception):  # noqa: N818 (a condition, said as such)
    """No way to the pilot: it is not running, or neither its socket nor docker exec answers."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body) if self.body else None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("composemesh-pilot", timeout=timeout)
        self.path = path
        self.seconds = timeout

    def connect(self) -> None:
        self.sock = connect_unix(self.path, self.seconds)


def over_socket(path: str, method: str, target: str, body: bytes | None = None,
                timeout: float = TIMEOUT_S) -> Answer:
    """One HTTP request to the pilot's socket at ``path``; OSError if it cannot be made."""
    conn = _UnixConnection(path, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, response.read())
    except http.client.HTTPException as exc:
        raise OSError(f"the pilot's socket answered no HTTP: {exc}") from None
    finally:
        conn.close()


@dataclass(frozen=True)
class PilotChannel:
    """The way to one project's pilot: its container, and its socket's host path if open."""

    project: str
    container: str
    host_socket: str | None  # None: through docker exec

    def request(self, method: str, target: str, body: bytes | None = None,
                timeout: float = TIMEOUT_S) -> Answer:
        if self.host_socket is not None:
            try:
                return over_socket(self.host_socket, method, target, body, timeout)
            except PermissionError:
                pass  # not the host's root: through the Docker API
            except OSError as exc:
                raise PilotUnreachable(f"the pilot's socket {self.host_socket}: {exc}") from None
        return self._exec(method, target, body, timeout)

    def _exec(self, method: str, target: str, body: bytes | None, timeout: float) -> Answer:
        try:
            proc = subprocess.run(
                ["docker", "exec", "-i", self.container, "python3", "-m",
                 "composemesh.engine.pilot_api", method, target],
                input=body or b"", capture_output=True, timeout=timeout + 20, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PilotUnreachable(f"docker exec {self.container}: {exc}") from None
        status, _, rest = proc.stdout.partition(b"\n")
        if proc.returncode != 0 or not status.strip().isdigit():
            why = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise PilotUnreachable(f"docker exec {self.container}: {why or 'no answer'}")
        return Answer(int(status), rest)


def find_channel(project: str) -> PilotChannel:
    """The way to ``project``'s running pilot; PilotUnreachable if it runs none."""
    try:
        out = subprocess.run(
            ["docker", "ps", "--filter", f"label=com.docker.compose.project={project}",
             "--filter", f"label={LABEL_ROLE}={ROLE_PILOT}", "--format", "{{.ID}}"],
            capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PilotUnreachable(f"docker ps: {exc}") from None
    ids = out.stdout.split()
    if not ids:
        raise PilotUnreachable(f"no running pilot in project {project!r}; is the mesh up?")
    return PilotChannel(project, ids[0], _host_socket(ids[0]))


def _host_socket(container: str) -> str | None:
    """Where the pilot's socket is on the host, if this process may reach it there."""
    try:
        out = subprocess.run(["docker", "inspect", "-f", "{{json .Mounts}}", container],
                             capture_output=True, text=True, check=False, timeout=30)
        mounts = json.loads(out.stdout or "[]")
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    for mount in mounts or ():
        if mount.get("Destination") == PILOT_SOCKET_DIR and mount.get("Source"):
            path = os.path.join(str(mount["Source"]), os.path.basename(PILOT_SOCKET))
            return path if os.access(path, os.W_OK) else None
    return None


def main(argv: list[str] | None = None) -> int:
    """The relay inside the pilot's container: ``METHOD PATH``, the body on stdin; prints the
    status on one line, then the body."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python3 -m composemesh.engine.pilot_api METHOD PATH", file=sys.stderr)
        return 2
    body = sys.stdin.buffer.read() if args[0] in ("POST", "PUT") else None
    try:
        answer = over_socket(PILOT_SOCKET, args[0], args[1], body)
    except OSError as exc:
        print(f"the pilot's socket does not answer: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(b"%d\n" % answer.status + answer.body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
