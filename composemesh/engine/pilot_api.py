"""How the host's user reaches a project's pilot: its Unix socket, never a network port.

The pilot serves its API on ``/run/composemesh/pilot.sock`` in the project's socket volume.
From the host the CLI connects to that socket where Docker keeps the volume
(``/var/lib/docker/volumes/<volume>/_data``, open to the host's root only); where it cannot
(a user in the ``docker`` group, an engine in a VM) it asks through the Docker API instead:
``docker exec <pilot> python3 -m composemesh.engine.pilot_api METHOD PATH``, which relays one
request to the socket from inside the pilot's container. Either way the pilot attests the
caller by the kernel's word (the host, or its own container) and no neighbour on a network
can ask.

``PilotClient`` is the CLI's client of that API: JSON in and out, its failures as the
CLI's errors, the pilot found once per command.

This module is also the relay's ``main``: it imports the standard library only (the Docker
SDK only when the host side needs it), as it runs inside the pilot's container on every call.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from composemesh.errors import ConfigError, EngineError
from composemesh.healthcheck import connect_unix
from composemesh.model.wellknown import LABEL_ROLE, PILOT_SOCKET, PILOT_SOCKET_DIR, ROLE_PILOT

TIMEOUT_S = 10.0
RELAY_BODY = "COMPOSEMESH_PILOT_BODY"  # the request body, for the relay run by docker exec


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
        from composemesh.engine import docker_host

        try:
            proc = docker_host.exec_run(
                self.container, ["python3", "-m", "composemesh.engine.pilot_api", method, target],
                {RELAY_BODY: body.decode()} if body is not None else {}, timeout + 20)
        except (docker_host.DockerUnavailable, TimeoutError) as exc:
            raise PilotUnreachable(f"docker exec {self.container}: {exc}") from None
        status, _, rest = proc.stdout.partition(b"\n")
        if proc.exit_code != 0 or not status.strip().isdigit():
            why = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise PilotUnreachable(f"docker exec {self.container}: {why or 'no answer'}")
        return Answer(int(status), rest)


def find_channel(project: str) -> PilotChannel:
    """The way to ``project``'s running pilot; PilotUnreachable if it runs none."""
    from composemesh.engine import docker_host

    found = docker_host.project_containers(project, labels={LABEL_ROLE: ROLE_PILOT})
    if not found:
        raise PilotUnreachable(f"no running pilot in project {project!r}; is the mesh up?")
    return PilotChannel(project, found[0].id, _host_socket(found[0].id))


def _host_socket(container: str) -> str | None:
    """Where the pilot's socket is on the host, if this process may reach it there."""
    from composemesh.engine import docker_host

    return socket_on_host(docker_host.mounts(container))


def socket_on_host(mounts: list[dict[str, Any]]) -> str | None:
    """The host path of the pilot's socket from its container's ``mounts``, if this process
    may write it (the host's root may; a user in the docker group, or one whose engine is in
    a VM, may not)."""
    for mount in mounts:
        if mount.get("Destination") == PILOT_SOCKET_DIR and mount.get("Source"):
            path = os.path.join(str(mount["Source"]), os.path.basename(PILOT_SOCKET))
            return path if os.access(path, os.W_OK) else None
    return None


class PilotClient:
    """The CLI's client of one project's pilot API: JSON in and out, its failures as the
    CLI's errors. The pilot is found on the first call and kept for the command; a channel
    that stops answering is looked for again on the next call (a pilot recreated since)."""

    def __init__(self, project: str, channel: PilotChannel | None = None) -> None:
        self.project = project
        self._channel = channel

    def channel(self) -> PilotChannel:
        if self._channel is None:
            try:
                self._channel = find_channel(self.project)
            except PilotUnreachable as exc:
                raise EngineError(str(exc)) from None
        return self._channel

    def status(self) -> dict[str, Any]:
        return self.request("/v1/status")

    def ca(self) -> dict[str, Any]:
        return self.request("/v1/ca")

    def request(self, path: str, method: str = "GET", body: object = None) -> dict[str, Any]:
        """One call; a 4xx answer to a sent body is the user's error (ConfigError, exit 2),
        any other failure an EngineError naming the project."""
        channel = self.channel()
        data = json.dumps(body).encode() if body is not None else None
        try:
            answer = channel.request(method, path, data, timeout=5 if body is None else 10)
            decoded = answer.json()
        except PilotUnreachable as exc:
            self._channel = None
            raise EngineError(f"the pilot of {self.project!r} does not answer: {exc}") from None
        except ValueError:
            raise EngineError(f"the pilot of {self.project!r} answered {answer.status} to "
                              f"{path} with no JSON") from None
        if 200 <= answer.status < 300 and isinstance(decoded, dict):
            return decoded
        message = decoded.get("error", "") if isinstance(decoded, dict) else ""
        message = message or f"HTTP {answer.status}"
        if body is not None and 400 <= answer.status < 500:
            raise ConfigError(message) from None
        raise EngineError(f"the pilot of {self.project!r} answered {answer.status} to {path}: "
                          f"{message}")


def main(argv: list[str] | None = None) -> int:
    """The relay inside the pilot's container: ``METHOD PATH``, the body (JSON, so text) in
    ``COMPOSEMESH_PILOT_BODY`` or else on stdin for a POST or PUT; prints the status on one
    line, then the body."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python3 -m composemesh.engine.pilot_api METHOD PATH", file=sys.stderr)
        return 2
    given = os.environ.get(RELAY_BODY)
    if given is not None:
        body: bytes | None = given.encode()
    else:
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
