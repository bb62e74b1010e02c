"""Runs `docker compose` for the CLI: the command line it needs, its output line by line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from composemesh.engine.process import stream_lines
from composemesh.errors import ComposeError


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


def running_containers(project: str) -> list[str]:
    """Names of the project's containers (any state), from the engine's labels."""
    out = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={project}",
         "--format", "{{.Names}}"],
        capture_output=True, text=True, check=False,
    )
    return [n for n in out.stdout.split() if n]


def published_port(project: str, service: str, port: int) -> str | None:
    """``host:port`` where a service's container port is published, if it is."""
    out = subprocess.run(
        ["docker", "ps", "--filter", f"label=com.docker.compose.project={project}",
         "--filter", f"label=com.docker.compose.service={service}",
         "--format", "{{.ID}}"],
        capture_output=True, text=True, check=False,
    )
    ids = out.stdout.split()
    if not ids:
        return None
    port_out = subprocess.run(["docker", "port", ids[0], f"{port}/tcp"],
                              capture_output=True, text=True, check=False)
    first = port_out.stdout.split()
    return first[0] if first else None
