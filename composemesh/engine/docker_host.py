"""The CLI's one way to the Docker engine for everything but `docker compose` itself: a few
synchronous calls over the Docker SDK (``docker.from_env()``: ``DOCKER_HOST`` and its TLS
variables, else the local socket).

Each call answers as the ``docker`` command it replaces did where that matters to a caller:
a container list the engine does not give is empty (``docker ps`` printed nothing), logs of a
container the engine does not know say the engine's error (``docker logs`` printed it), and
so on. `docker compose` stays a subprocess (``engine.compose.run``).

``exec_run`` is ``docker exec -e``: what a command needs comes in its environment (the SDK
has no public way to write an exec's stdin), its output back through the SDK's own reader.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


class DockerUnavailable(Exception):  # noqa: N818 (a condition, said as such)
    """The engine did not answer a call, or answered it with an error; the message says
    which, as the docker CLI would (``Error response from daemon: ...``)."""


@functools.cache
def _client() -> docker.DockerClient:
    """One client per process (the CLI runs one command); ``DockerUnavailable`` if none."""
    try:
        return docker.from_env()
    except docker.errors.DockerException as exc:
        raise DockerUnavailable(str(exc)) from None


def pinged_client(timeout: float) -> docker.DockerClient:
    """A client of its own for long calls (image builds: ``timeout`` seconds per call), the
    engine asked once that it answers; DockerUnavailable saying why if it does not."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except Exception as exc:  # docker's own exception types stop here
        raise DockerUnavailable(str(exc)) from None
    return client


def _said(exc: docker.errors.DockerException) -> str:
    """The engine's own sentence for a failed call, as the docker CLI prints it."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return f"Error response from daemon: {exc.explanation}"
    return str(exc)


def _inspect(container: str) -> dict[str, Any]:
    try:
        return dict(_client().api.inspect_container(container))
    except docker.errors.DockerException as exc:
        raise DockerUnavailable(_said(exc)) from None


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ContainerRef:
    """A container as ``docker ps`` lists it: its short ID and its name."""

    id: str
    name: str


def project_containers(project: str, *, labels: dict[str, str] | None = None,
                       running_only: bool = True) -> list[ContainerRef]:
    """The containers of compose project ``project`` (with ``labels`` too), newest first, as
    ``docker ps [-a] --filter label=...`` lists them; empty if the engine does not answer."""
    wanted = [f"{PROJECT_LABEL}={project}", *(f"{k}={v}" for k, v in (labels or {}).items())]
    try:
        rows = _client().api.containers(all=not running_only, filters={"label": wanted})
    except (DockerUnavailable, docker.errors.DockerException):
        return []
    return [ContainerRef(str(r["Id"])[:12], container_name(r)) for r in rows]


def container_name(row: dict[str, Any]) -> str:
    """The name ``docker ps`` shows for a row of the engine's container list."""
    names = [str(n).lstrip("/") for n in row.get("Names") or ()]
    return next((n for n in names if "/" not in n), names[0] if names else "")


# --------------------------------------------------------------------------- one container


def logs_tail(container: str, lines: int) -> str:
    """The last ``lines`` lines of a container's output (stdout and stderr), or the engine's
    error if it has none to give (what ``docker logs --tail`` printed)."""
    try:
        raw = _client().api.logs(container, tail=lines)
    except DockerUnavailable as exc:
        return str(exc)
    except docker.errors.DockerException as exc:
        return _said(exc)
    return bytes(raw).decode(errors="replace").strip()


def health_log(container: str) -> list[dict[str, Any]]:
    """The container's recent healthcheck results, oldest first; empty if none or unknown."""
    try:
        state = _inspect(container).get("State") or {}
    except DockerUnavailable:
        return []
    return list((state.get("Health") or {}).get("Log") or [])


def mounts(container: str) -> list[dict[str, Any]]:
    """The container's mounts as the engine describes them; empty if it is unknown."""
    try:
        return list(_inspect(container).get("Mounts") or [])
    except DockerUnavailable:
        return []


def published_address(container: str, port: int) -> str | None:
    """``host:port`` where the container's ``port``/tcp is published (the first line that
    ``docker port <container> <port>/tcp`` prints), or None."""
    try:
        bindings = (_inspect(container).get("NetworkSettings") or {}).get("Ports") or {}
    except DockerUnavailable:
        return None
    return first_address(bindings.get(f"{port}/tcp"))


def first_address(bindings: Sequence[dict[str, Any]] | None) -> str | None:
    """The first of ``host:port`` for an engine's port bindings, as ``docker port`` sorts
    and writes them (an IPv6 host in brackets)."""
    texts = sorted(_join_host_port(str(b.get("HostIp", "")), str(b.get("HostPort", "")))
                   for b in bindings or ())
    return texts[0] if texts else None


def _join_host_port(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- exec


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


def exec_run(container: str, cmd: Sequence[str], environment: Mapping[str, str],
             timeout: float) -> ExecResult:
    """Run ``cmd`` in ``container`` with ``environment`` added to its own, as ``docker exec
    -e`` does; its exit code and output. ``DockerUnavailable`` if the engine cannot run it,
    ``TimeoutError`` if its output has not ended within ``timeout`` seconds."""
    def run() -> ExecResult:
        api = docker.from_env(timeout=max(1, math.ceil(timeout))).api
        exec_id = api.exec_create(container, list(cmd), stdout=True, stderr=True,
                                  environment=dict(environment))["Id"]
        stdout, stderr = api.exec_start(exec_id, demux=True)
        code = api.exec_inspect(exec_id).get("ExitCode")
        return ExecResult(int(code) if code is not None else -1, stdout or b"", stderr or b"")

    # The SDK reads an exec's output with no timeout of its own: a daemon thread reads it and
    # this one waits at most ``timeout`` (a thread left behind ends with the exec, or with
    # the CLI's process).
    done: list[ExecResult | BaseException] = []

    def work() -> None:
        try:
            done.append(run())
        except BaseException as exc:  # noqa: BLE001 (carried to the caller's thread)
            done.append(exc)

    worker = threading.Thread(target=work, name="docker-exec", daemon=True)
    worker.start()
    worker.join(timeout)
    if not done:
        raise TimeoutError(f"no end of output within {timeout:g}s")
    outcome = done[0]
    if isinstance(outcome, docker.errors.DockerException):
        raise DockerUnavailable(_said(outcome))
    if isinstance(outcome, OSError):  # the engine's connection broke (requests' are OSErrors)
        raise DockerUnavailable(f"the exec's connection: {outcome}")
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
