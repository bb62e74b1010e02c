"""Runs `docker compose` for the CLI: the command line it needs, its output line by line;
and what a project's containers and published ports are (through ``engine.docker_host``)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composemesh.engine.process import stream_lines
from composemesh.errors import ComposeError, ImageBuildError
from composemesh.model import wellknown as wk


@dataclass(frozen=True)
class ComposeProject:
    """How to address one meshed project with `docker compose`."""

    name: str
    meshed_file: Path | None  # the injected file, when there is one
    project_dir: Path

    def command(self, *args: str) -> list[str]:
        cmd = ["docker", "compose", "-p", self.name, "--project-directory", str(self.project_dir)]
        if self.meshed_file is not None:
            cmd += ["-f", str(self.meshed_file)]
        return [*cmd, *args]


def state_dir(project: str) -> Path:
    """Where composemesh keeps a project's meshed compose file."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "composemesh" / project


def require_compose() -> None:
    if shutil.which("docker") is None:
        raise ComposeError("the docker CLI is not installed; run scripts/bootstrap.sh")


def run(
    project: ComposeProject,
    args: Sequence[str],
    *,
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, list[str]]:
    """Run one compose command; feed each output line to ``on_line``; return code and lines."""
    require_compose()
    return stream_lines(
        project.command(*args),
        on_line,
        env={**(env or {}), "COMPOSE_ANSI": "never", "COMPOSE_PROGRESS": "plain"},
    )


_FAILED = re.compile(
    r"(container \S+ (?:exited \(\d+\)|is unhealthy)|dependency failed to start: .*"
    r"|Error response from daemon: .*|no such image: .*|pull access denied.*"
    r"|failed to solve: .*|executor failed running .*|The command .* returned a non-zero code.*)",
    re.IGNORECASE,
)


def failure_reason(lines: Sequence[str]) -> str:
    """The line of compose's output that says what went wrong (the last such line)."""
    for line in reversed(lines):
        m = _FAILED.search(line)
        if m:
            return m.group(1)
    return lines[-1] if lines else "docker compose failed without output"


def failed_container(reason: str) -> str | None:
    """The container a failure line of compose's (``failure_reason``) names, if it names one."""
    m = re.search(r"container (\S+)", reason)
    return m.group(1) if m else None


def services_to_build(model: dict[str, Any]) -> list[str]:
    """The services of ``model`` with a ``build:`` of the user's, in the file's order."""
    return [name for name, svc in model.get("services", {}).items() if svc.get("build")]


def build_service(project: ComposeProject, service: str,
                  on_line: Callable[[str], None] | None = None) -> None:
    """`docker compose build <service>`; ImageBuildError naming the service if it fails."""
    code, lines = run(project, ["build", service], on_line=on_line)
    if code != 0:
        raise ImageBuildError(
            f"service {service!r}: its image does not build: {failure_reason(lines)}")


def running_containers(project: str) -> list[str]:
    """Names of the project's containers (any state), from the engine's labels."""
    from composemesh.engine import docker_host

    return [c.name for c in docker_host.project_containers(project, running_only=False) if c.name]


def published_port(project: str, service: str, port: int) -> str | None:
    """``host:port`` where a service's container port is published, if it is."""
    from composemesh.engine import docker_host

    found = docker_host.project_containers(project, labels={docker_host.SERVICE_LABEL: service})
    return docker_host.published_address(found[0].id, port) if found else None


def published_target(port: object) -> int | None:
    """The container port of a published port entry (short or long syntax), else None."""
    if isinstance(port, dict):
        target, published = port.get("target"), port.get("published")
        return int(target) if target and published else None
    spec = str(port).split("/")[0]
    if ":" not in spec:
        return None  # not published on the host
    target = spec.rsplit(":", 1)[1]
    return int(target) if target.isdigit() else None


@dataclass(frozen=True)
class PublishedPort:
    """A container port the meshed model publishes on the host: the compose service that
    publishes it, the app's service as the user named it, and the container port."""

    compose_service: str
    service: str
    target: int


def published_ports(model: dict[str, Any]) -> list[PublishedPort]:
    """The ports of the meshed ``model`` that reach an app from the host (the pilot's are
    none of the user's); a netns holder publishes its app's ports under the app's name."""
    found = []
    for name, svc in model.get("services", {}).items():
        labels = svc.get("labels") or {}
        if isinstance(labels, dict) and labels.get(wk.LABEL_ROLE) == wk.ROLE_PILOT:
            continue
        for port in svc.get("ports") or []:
            target = published_target(port)
            if target is None:
                continue
            of = labels.get(wk.LABEL_OF, name) if isinstance(labels, dict) else name
            found.append(PublishedPort(name, str(of), target))
    return found


def published_addresses(project: str, model: dict[str, Any]) -> list[tuple[PublishedPort, str]]:
    """Each port of ``model`` published on the host with the ``host:port`` it has there."""
    found = []
    for port in published_ports(model):
        where = published_port(project, port.compose_service, port.target)
        if where:
            found.append((port, where))
    return found
