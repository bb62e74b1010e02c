"""composemesh as a user gets it: a wheel installed into a fresh virtualenv, run outside the
source tree, brings up a compose file of the user's own on the real engine.

The compose file runs two plain images that are not ours (Python's http.server and a client,
built here offline FROM the base image, as the tests' apps are) and never names the demo
image: `up` must build the mesh image from the installed files alone, leave the demo image
alone (an installed composemesh has no demo apps to build it from), and report the mesh
ready; a request from the client to the server goes through both sidecars and answers 200.

The installed composemesh rebuilds ``composemesh:<version>`` (its inputs are the installed
files, not the source tree's, so their hash differs); the image the source tree built is kept
under a tag of the test meanwhile and tagged back at the end, so the tests after this one find
it up to date. Everything else the test makes (containers, networks, volumes, its own images,
the virtualenv) is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composemesh.engine import images as engine_images
from composemesh.engine.base_image import ensure_base_image
from composemesh.model.wellknown import DEMO_IMAGE, MESH_IMAGE
from tests.e2e.conftest import REPO, Mesh, docker, force_remove, project_resources

pytestmark = pytest.mark.e2e

SERVER_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
RUN mkdir -p /srv && echo "hello from a plain image" > /srv/index.html
STOPSIGNAL SIGINT
CMD ["python3", "-m", "http.server", "8080", "--directory", "/srv"]
"""

CLIENT_DOCKERFILE = """\
ARG BASE
FROM ${BASE}
STOPSIGNAL SIGINT
CMD ["python3", "-c", "import signal; signal.pause()"]
"""

COMPOSE = """\
services:
  web:
    image: {server}
    healthcheck:
      test: ["CMD", "python3", "-c",
             "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/', timeout=2)"]
      interval: 1s
      timeout: 3s
      retries: 60
  client:
    image: {client}
    depends_on: [web]
"""

GET = (
    "import urllib.request;"
    "r = urllib.request.urlopen('http://web:8080/', timeout=10);"
    "print(r.status, r.read().decode().strip())"
)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def user_env(state: Path) -> dict[str, str]:
    """A user's shell: nothing that points Python at the source tree; the project's state in
    the test's folder (the image cache, the wheelhouse among it, is the host's as ever)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return {**env, "XDG_STATE_HOME": str(state), "COLUMNS": "200", "PYTHONNOUSERSITE": "1"}


def install_composemesh(client: Any, base: str, work: Path, env: dict[str, str]) -> Path:
    """A virtualenv in ``work`` with a wheel of this project and its dependencies, installed
    by pip as a user would (the dependencies from the wheelhouse that the mesh image builds
    from, so no index is needed; from the index, at the same versions, where the host's Python
    is not the image's); its bin directory."""
    tree = engine_images.locate_sources()
    assert tree.project_root == REPO
    quiet = lambda stage, detail: None  # noqa: E731
    wheel = engine_images.build_composemesh_wheel(tree, work / "dist", quiet, scratch=work)
    venv = work / "venv"
    ok(run([sys.executable, "-m", "venv", venv], env=env), "python -m venv")
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet",
           "--disable-pip-version-check"]
    requirements = engine_images.runtime_requirements(tree)
    lock = engine_images.dependency_lock(requirements)
    facts = engine_images.probe_base(client, base, str(client.images.get(base).id))
    wheelhouse = engine_images.ensure_wheelhouse(requirements, lock, facts, quiet)
    proc = run([*pip, "--no-index", "--find-links", wheelhouse, wheel], cwd=work, env=env)
    if proc.returncode != 0:  # the host's Python or platform is not the image's
        constraints = work / "constraints.txt"
        constraints.write_text("\n".join(lock) + "\n")
        ok(run([*pip, "-c", constraints, wheel], cwd=work, env=env), "pip install (index)")
    where = ok(run([venv / "bin" / "python", "-c",
                    "import composemesh; print(composemesh.__file__)"], cwd=work, env=env),
               "import composemesh")
    assert Path(where.strip()).is_relative_to(venv), f"not the installed one: {where}"
    assert not (Path(where.strip()).parents[1] / "examples").exists()
    return venv / "bin"


def dangling_images_of_ours() -> set[str]:
    """Untagged images that composemesh's builds labelled (a build's leftovers)."""
    found: set[str] = set()
    for label in (engine_images.LABEL_IMAGE, engine_images.LABEL_BUILD_CACHE):
        found |= set(docker("images", "-q", "--no-trunc", "--filter", "dangling=true",
                            "--filter", f"label={label}").split())
    return found


@contextlib.contextmanager
def source_tree_mesh_image_kept(client: Any, keep: str) -> Iterator[str]:
    """The mesh image the source tree built, under ``keep`` too while the test runs (so that
    nothing sweeps it once the installed composemesh retags the name), then tagged back;
    whatever the test built under the name is removed. Yields the kept image's id."""
    import docker.errors

    saved = client.images.get(MESH_IMAGE)
    repo, _, tag = keep.partition(":")
    saved.tag(repo, tag)
    try:
        yield str(saved.id)
    finally:
        replaced = None
        with contextlib.suppress(docker.errors.ImageNotFound):
            replaced = str(client.images.get(MESH_IMAGE).id)
        repo, _, tag = MESH_IMAGE.partition(":")
        client.images.get(keep).tag(repo, tag)
        client.images.remove(keep)  # only the tag: MESH_IMAGE still names the image
        if replaced is not None and replaced != saved.id:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(replaced)


@pytest.mark.timeout(600)
def test_an_installed_composemesh_brings_up_plain_images_of_the_users_own(
    images: None,
) -> None:
    import docker as docker_sdk

    started = time.monotonic()
    client = docker_sdk.from_env(timeout=600)
    hexid = uuid.uuid4().hex[:8]
    project = f"cmtest-installed-{hexid}"
    server, client_image = f"{project}-web:1", f"{project}-client:1"
    base = ensure_base_image(client)
    demo_before = str(client.images.get(DEMO_IMAGE).id)
    dangling_before = dangling_images_of_ours()
    work = Path(tempfile.mkdtemp(prefix="composemesh-installed-"))
    assert not work.is_relative_to(REPO)
    try:
        env = user_env(work / "state")
        bin_dir = install_composemesh(client, base, work, env)
        installed = time.monotonic()

        for tag, dockerfile in ((server, SERVER_DOCKERFILE), (client_image, CLIENT_DOCKERFILE)):
            context = work / "images" / tag.split(":")[0]
            context.mkdir(parents=True)
            (context / "Dockerfile").write_text(dockerfile)
            ok(run(["docker", "build", "--quiet", "--network", "none", "--pull=false",
                    "--build-arg", f"BASE={base}", "-t", tag, context], timeout=180),
               f"docker build {tag}")

        folder = work / "myapp"
        folder.mkdir()
        compose = folder / "compose.yaml"
        compose.write_text(COMPOSE.format(server=server, client=client_image))
        assert "composemesh" not in compose.read_text()

        with source_tree_mesh_image_kept(client, f"{project}-keep:mesh") as source_built:
            try:
                up_started = time.monotonic()
                up = run([bin_dir / "composemesh", "up", "-f", "compose.yaml", "-p", project],
                         cwd=folder, env=env, timeout=420)
                up_seconds = time.monotonic() - up_started
                ok(up, "composemesh up (installed)")
                assert f"mesh {project} ready" in up.stdout, up.stdout + up.stderr
                # the images `up` made sure of: the mesh image, and no other
                assert re.search(rf"images: ready: {re.escape(MESH_IMAGE)}\s", up.stderr), up.stderr
                assert DEMO_IMAGE not in up.stdout + up.stderr, up.stderr
                built = client.images.get(MESH_IMAGE)
                assert str(built.id) != source_built, "the installed composemesh built nothing"
                assert str(client.images.get(DEMO_IMAGE).id) == demo_before

                mesh = Mesh(project=project, files=[compose], env=env)
                # both sidecars ready and in sync, as `up` said
                status = json.loads(ok(run([bin_dir / "composemesh", "status", "-p", project,
                                            "--json"], cwd=folder, env=env), "status"))
                rows = {p["compose_service"]: p for p in status["proxies"]}
                assert set(rows) == {"web", "client"}, rows
                assert all(r["proxy_healthy"] and r["in_sync"] for r in rows.values()), rows

                before = mesh.proxy_stats("web")
                answer = mesh.exec("client", "python3", "-c", GET)
                assert answer.strip() == "200 hello from a plain image"
                after = mesh.proxy_stats("web")
                by_source = after["http_inbound"]["requests_by_source"]
                was = before["http_inbound"]["requests_by_source"].get("client", 0)
                assert by_source.get("client", 0) == was + 1, (before, after)
                assert mesh.proxy_stats("client")["http"]["requests"] >= 1

                down = run([bin_dir / "composemesh", "down", "-f", "compose.yaml", "-p",
                            project, "-v"], cwd=folder, env=env, timeout=180)
                ok(down, "composemesh down -v (installed)")
                left = project_resources(project)
                assert left == {"containers": [], "networks": [], "volumes": []}, left
            finally:
                force_remove(project)
        print(f"\ninstalled composemesh: install {installed - started:.0f}s, up "
              f"{up_seconds:.0f}s, whole test {time.monotonic() - started:.0f}s")
    finally:
        for tag in (server, client_image):
            docker("rmi", "-f", tag, check=False)
        shutil.rmtree(work, ignore_errors=True)
        client.close()
    assert not docker("images", "-q", "--filter", f"reference={project}*")
    assert dangling_images_of_ours() <= dangling_before, "the build left images behind"
