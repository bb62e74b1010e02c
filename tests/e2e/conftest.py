"""Fixtures for end-to-end tests on the real Docker engine: images, meshes, and clean-up."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from composemesh.engine.compose import state_dir
from composemesh.model.wellknown import DEMO_IMAGE, PILOT_SERVICE, PORT_ADMIN
from tests.support import free_port

REPO = Path(__file__).resolve().parents[2]
BOOKINFO = REPO / "examples" / "bookinfo" / "compose.yaml"
PREFIX = "cmtest"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def composemesh(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI as a user would (a new process), capturing what it prints."""
    return subprocess.run(
        [sys.executable, "-m", "composemesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {}), "COLUMNS": "200"},
    )


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def project_resources(project: str) -> dict[str, list[str]]:
    """Whatever of ``project`` still exists in the engine."""
    label = f"label=com.docker.compose.project={project}"
    return {
        "containers": docker("ps", "-a", "--filter", label, "--format", "{{.Names}}").split(),
        "networks": docker("network", "ls", "--filter", label, "--format", "{{.Name}}").split(),
        "volumes": docker("volume", "ls", "--filter", label, "--format", "{{.Name}}").split(),
    }


def force_remove(project: str) -> None:
    """Last-resort clean-up, used only when a test failed before its own `down`."""
    left = project_resources(project)
    if left["containers"]:
        docker("rm", "-f", "-v", *left["containers"], check=False)
    for net in left["networks"]:
        docker("network", "rm", net, check=False)
    for vol in left["volumes"]:
        docker("volume", "rm", "-f", vol, check=False)


def unique_project(tag: str) -> str:
    return f"{PREFIX}-{tag}-{uuid.uuid4().hex[:6]}"


# Run with python3 in a container: GET http://127.0.0.1:<argv[1]><argv[2]>, the body to stdout
# (a proxy's admin port is loopback-only, as Istio's).
LOOPBACK_GET = (
    "import sys, urllib.request;"
    "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:' + sys.argv[1] + sys.argv[2],"
    " timeout=5).read().decode())"
)


SPOOF = Path(__file__).with_name("spoof.py")


def spoof(network: str, victim: str, target: str, port: int, *extra: str,
          tries: int = 3) -> dict[str, Any]:
    """The JSON line of tests/e2e/spoof.py run by an attacker container on ``network`` with
    Docker's default capabilities: ARP-poison ``target`` so that it takes the attacker for
    ``victim``, handshake by hand from the victim's address to ``target:port``, send the
    payload (``extra``: the tool's options). Run again (up to ``tries``) only when nothing
    answered at all, as on a busy machine; the container is removed even when it hangs."""
    result: dict[str, Any] = {}
    for _ in range(tries):
        name = f"{PREFIX}-attacker-{uuid.uuid4().hex[:8]}"
        try:
            proc = subprocess.run(
                ["docker", "run", "--rm", "--name", name, "--network", network,
                 "--entrypoint", "python3", DEMO_IMAGE, "-c", SPOOF.read_text(),
                 "--victim", victim, "--target", target, "--port", str(port),
                 "--timeout", "30", *extra],
                capture_output=True, text=True, timeout=180)
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        assert proc.returncode == 0, f"spoof.py: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"spoof.py printed:\n{proc.stdout}{proc.stderr}"
        result = dict(json.loads(lines[0]))
        if result["result"] != "no-answer":
            break
    return result


def logs_of(container: str) -> str:
    """Everything ``container`` wrote, both streams (the pilot and proxies log to stderr)."""
    proc = subprocess.run(["docker", "logs", container], capture_output=True, text=True,
                          timeout=60)
    return proc.stdout + proc.stderr


@dataclass
class Mesh:
    """A running meshed compose project, as `composemesh up` left it."""

    project: str
    files: list[Path]
    env: dict[str, str] = field(default_factory=dict)
    up_seconds: float = 0.0
    up_output: str = ""

    def container(self, compose_service: str) -> str:
        name = docker(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={compose_service}",
            "--format",
            "{{.Names}}",
        ).split()
        assert len(name) == 1, f"expected one container of {compose_service}, got {name}"
        return name[0]

    def exec(self, compose_service: str, *cmd: str, timeout: float = 60) -> str:
        proc = subprocess.run(
            ["docker", "exec", self.container(compose_service), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"{cmd} in {compose_service}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def get_json(self, compose_service: str, url: str, *extra: str,
                 timeout: float = 120) -> list[dict]:
        """HTTP GETs made by an app container, as an app would make them: one JSON line each
        (status 0 when no answer came); every request must have produced a line."""
        proc = subprocess.run(
            ["docker", "exec", self.container(compose_service),
             "python3", "/app/demo.py", "get", url, *extra],
            capture_output=True, text=True, timeout=timeout)
        answers = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        count = int(extra[extra.index("--count") + 1]) if "--count" in extra else 1
        assert len(answers) == count, f"{url} from {compose_service}: {proc.stdout}{proc.stderr}"
        return answers

    def address(self, compose_service: str) -> str:
        """An address of the netns holder of ``compose_service`` (reachable from the host)."""
        holder = self.container(f"{compose_service}-netns")
        nets = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", holder))
        return next(n["IPAddress"] for n in nets.values() if n["IPAddress"])

    def admin(self, compose_service: str, path: str) -> str:
        """GET ``path`` of the admin port of ``compose_service``'s sidecar, from inside it."""
        return self.exec(f"{compose_service}-proxy", "python3", "-c", LOOPBACK_GET,
                         str(PORT_ADMIN), path)

    def certs(self, compose_service: str) -> dict[str, Any]:
        """The workload certificate ``compose_service``'s sidecar holds (admin /certs)."""
        return dict(json.loads(self.admin(compose_service, "/certs")))

    def pilot_get(self, path: str) -> dict[str, Any]:
        """The pilot's JSON answer to ``GET path``, asked on its socket from inside it (as
        the CLI does where it cannot reach the socket's directory on the host)."""
        status, _, body = self.exec(PILOT_SERVICE, "python3", "-m",
                                    "composemesh.engine.pilot_api", "GET", path).partition("\n")
        assert status == "200", f"GET {path} at the pilot: {status} {body}"
        return dict(json.loads(body))

    def proxy_stats(self, compose_service: str) -> dict:
        """The admin /stats JSON of the sidecar of ``compose_service``; asked again for up to
        30 s while the proxy (re)starts."""
        deadline = time.monotonic() + 30
        while True:
            try:
                return dict(json.loads(self.admin(compose_service, "/stats")))
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def containers(self) -> list[str]:
        """The names of every container of the project."""
        return docker("ps", "-a", "--filter", f"label=com.docker.compose.project={self.project}",
                      "--format", "{{.Names}}").split()

    def network(self) -> str:
        """One network of the project (the test meshes have one)."""
        nets = docker("network", "ls", "--filter",
                      f"label=com.docker.compose.project={self.project}",
                      "--format", "{{.Name}}").split()
        assert nets, f"no network of {self.project}"
        return nets[0]

    def outsider(self, image: str, *cmd: str,
                 timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``cmd`` run in a new container of ``image`` on the project's network, not in the
        mesh; the container is removed even when the command hangs past ``timeout``."""
        name = f"{PREFIX}-outsider-{uuid.uuid4().hex[:8]}"
        try:
            return subprocess.run(
                ["docker", "run", "--rm", "--name", name, "--network", self.network(), image,
                 *cmd], capture_output=True, text=True, timeout=timeout)
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)

    def prometheus(self, compose_service: str) -> str:
        """What Prometheus scrapes: port 15090 on the namespace's address, from the host."""
        url = f"http://{self.address(compose_service)}:15090/stats/prometheus"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def compose(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`docker compose` on the meshed file that `up` wrote."""
        meshed = state_dir(self.project) / "compose.yaml"
        return subprocess.run(
            [
                "docker",
                "compose",
                "-p",
                self.project,
                "--project-directory",
                str(self.files[0].parent),
                "-f",
                str(meshed),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **self.env},
        )


@pytest.fixture(scope="session")
def engine() -> None:
    """The real engine must answer; in CI its absence is a failure, not a skip."""
    proc = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        message = f"Docker engine not reachable: {proc.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def images(engine: None) -> None:
    """Build (or find cached) the mesh and demo images once per session."""
    import docker as docker_sdk

    from composemesh.engine.images import ensure_images

    ensure_images(docker_sdk.from_env(timeout=900))


# The demo app as a compose anchor (`<<: *demo`), for the meshes a test module writes itself.
DEMO = f"""\
x-demo: &demo
  image: {DEMO_IMAGE}
  restart: unless-stopped
  healthcheck:
    test: ["CMD", "python3", "/app/demo.py", "get", "http://127.0.0.1:9080/healthz"]
    interval: 1s
    timeout: 2s
    retries: 30
"""


def bring_up(project: str, files: list[Path], env: dict[str, str]) -> Mesh:
    started = time.monotonic()
    try:
        proc = composemesh("up", *sum((["-f", str(f)] for f in files), []), "-p", project,
                           env=env)
    except BaseException:  # a hung `up` (TimeoutExpired) must not leave the project behind
        force_remove(project)
        raise
    mesh = Mesh(project=project, files=files, env=env, up_seconds=time.monotonic() - started,
                up_output=proc.stdout)
    if proc.returncode != 0:
        force_remove(project)
        raise AssertionError(
            f"composemesh up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return mesh


def tear_down(mesh: Mesh) -> None:
    args = sum((["-f", str(f)] for f in mesh.files), [])
    proc = composemesh("down", *args, "-p", mesh.project, "-v", env=mesh.env)
    left = project_resources(mesh.project)
    force_remove(mesh.project)
    assert proc.returncode == 0, f"composemesh down failed:\n{proc.stdout}\n{proc.stderr}"
    assert left == {"containers": [], "networks": [], "volumes": []}, f"left behind: {left}"


@contextlib.contextmanager
def meshed(name: str, folder: Path, compose_text: str) -> Iterator[Mesh]:
    """A project ``cmtest-<name>-…`` from ``compose_text`` written to ``folder``/compose.yaml:
    up, yielded, and always removed."""
    compose = folder / "compose.yaml"
    compose.write_text(compose_text)
    mesh = bring_up(unique_project(name), [compose], {})
    try:
        yield mesh
    finally:
        tear_down(mesh)


@pytest.fixture(scope="module")
def bookinfo(images: None) -> Iterator[Mesh]:
    project = unique_project("bookinfo")
    mesh = bring_up(project, [BOOKINFO], {"BOOKINFO_PORT": str(free_port())})
    try:
        yield mesh
    finally:
        tear_down(mesh)
