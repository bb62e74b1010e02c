"""`composemesh certs export` and `certs import` on the real engine: two "hosts" (two compose
projects) with one trust root (issue 13).

Host A comes up with a root its CA generates; `certs export` writes it to a directory; A goes
down (-v). `certs import` puts it into the CA volume of project B before B's first `up`; B's
pilot loads it as its stored root, and B's proxies hold certificates that chain to it. Then
another root is refused while B is up and after a `down` without -v (the volume holds B's
root), the same root again changes nothing, and after `down -v` the other root goes in.

Projects are named ``cmx-certs-…``; everything they made (containers, networks, volumes, the
import's short-lived container) is removed even when a step fails.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from composemesh.ca import (
    cert_from_pem,
    cert_to_pem,
    fingerprint,
    key_to_pem,
    make_root,
    verify_chain,
)
from composemesh.engine.ca_volume import volume_name
from composemesh.model.wellknown import MESH_IMAGE
from tests.e2e.conftest import (
    DEMO,
    bring_up,
    composemesh,
    docker,
    force_remove,
    project_resources,
    tear_down,
)

pytestmark = pytest.mark.e2e

COMPOSE = f"""\
{DEMO}
services:
  web:
    <<: *demo
    command: ["ratings"]
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def root_in_volume(volume: str) -> str:
    """The root certificate (public) in a project's CA volume, read by a container with no
    network and the volume read-only."""
    return docker("run", "--rm", "--network", "none", "--pull", "never",
                  "--mount", f"type=volume,source={volume},target=/v,readonly",
                  "--entrypoint", "cat", MESH_IMAGE, "/v/ca/root.pem")


def no_import_containers() -> list[str]:
    return docker("ps", "-a", "--filter", "name=composemesh-ca-import-",
                  "--format", "{{.Names}}").split()


@pytest.fixture
def projects(images: None) -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    a, b = f"cmx-certs-{tag}-a", f"cmx-certs-{tag}-b"
    try:
        yield a, b
    finally:
        for project in (a, b):
            force_remove(project)
            assert project_resources(project) == {"containers": [], "networks": [],
                                                  "volumes": []}
        assert no_import_containers() == []


def test_a_second_host_imports_the_first_hosts_root(
        projects: tuple[str, str], tmp_path: Path) -> None:
    a, b = projects
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    file_a, file_b = tmp_path / "a" / "compose.yaml", tmp_path / "b" / "compose.yaml"
    file_a.write_text(COMPOSE)
    file_b.write_text(COMPOSE)
    shared = tmp_path / "shared-root"

    # host A: its CA generates a root; export it
    mesh_a = bring_up(a, [file_a], {})
    try:
        ca_a = mesh_a.pilot_get("/v1/ca")
        assert ca_a["source"] == "generated"
        proc = composemesh("certs", "export", "-p", a, str(shared))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert ca_a["fingerprint"] in proc.stdout
        assert f"composemesh certs import {shared}" in proc.stdout
        again = composemesh("certs", "export", "-p", a, str(shared))
        assert again.returncode == 1 and "pass --force" in again.stderr
    finally:
        tear_down(mesh_a)
    assert mode(shared / "root-key.pem") == 0o600
    assert mode(shared / "root.pem") == 0o644
    root_a = cert_from_pem((shared / "root.pem").read_bytes())
    assert fingerprint(root_a) == ca_a["fingerprint"]

    # host B: import before its first `up`, then up: its pilot signs with A's root
    proc = composemesh("certs", "import", str(shared), "-f", str(file_b), "-p", b)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "imported the root" in proc.stdout and ca_a["fingerprint"] in proc.stdout
    assert no_import_containers() == []
    mesh_b = bring_up(b, [file_b], {})
    down_b = True
    try:
        ca_b = mesh_b.pilot_get("/v1/ca")
        assert ca_b["source"] == "stored"
        assert ca_b["fingerprint"] == ca_a["fingerprint"]
        listed = json.loads(composemesh("certs", "-p", b, "--json").stdout)
        assert listed["ca"]["fingerprint"] == ca_a["fingerprint"]
        held = mesh_b.certs("web")
        verify_chain(cert_from_pem(held["cert_pem"]), [], [root_a])
        assert held["issuer_fingerprint"] == ca_a["fingerprint"]
        assert held["identity"] == f"spiffe://cluster.local/ns/{b}/sa/web"
        assert all(row["cert_issuer_fingerprint"] == ca_a["fingerprint"]
                   for row in listed["proxies"])

        # another root: refused while B's pilot runs
        other_cert, other_key = make_root("another root", "cluster.local")
        other = tmp_path / "other-root"
        other.mkdir()
        (other / "root.pem").write_bytes(cert_to_pem(other_cert))
        (other / "root-key.pem").write_bytes(key_to_pem(other_key))
        os.chmod(other / "root-key.pem", 0o600)
        proc = composemesh("certs", "import", str(other), "-f", str(file_b), "-p", b)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"the pilot of {b} is running" in proc.stderr
        assert "`composemesh down` first" in proc.stderr

        # ... and after `down` without -v: the volume holds B's (A's) root
        down = composemesh("down", "-f", str(file_b), "-p", b)
        assert down.returncode == 0, down.stdout + down.stderr
        down_b = False
        volume = volume_name(b)
        assert project_resources(b)["volumes"] and volume in project_resources(b)["volumes"]
        proc = composemesh("certs", "import", str(other), "-f", str(file_b), "-p", b)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "already holds another root" in proc.stderr
        assert ca_a["fingerprint"] in proc.stderr and "`composemesh down -v`" in proc.stderr
        assert cert_from_pem(root_in_volume(volume)) == root_a
        same = composemesh("certs", "import", str(shared), "-f", str(file_b), "-p", b)
        assert same.returncode == 0, same.stdout + same.stderr
        assert "holds this root already: nothing to do" in same.stdout

        # after `down -v` (the old root and its identities gone): accepted
        down = composemesh("down", "-f", str(file_b), "-p", b, "-v")
        assert down.returncode == 0, down.stdout + down.stderr
        assert volume not in project_resources(b)["volumes"]
        proc = composemesh("certs", "import", str(other), "-p", b)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert fingerprint(other_cert) in proc.stdout
        assert cert_from_pem(root_in_volume(volume)) == other_cert
        labels = json.loads(docker("volume", "inspect", volume, "--format",
                                   "{{json .Labels}}"))
        assert labels["com.docker.compose.project"] == b
        assert labels["com.docker.compose.volume"] == "composemesh-pilot-state"
        # compose takes it as the project's own: `down -v` removes it with the project
        down = composemesh("down", "-f", str(file_b), "-p", b, "-v")
        assert down.returncode == 0, down.stdout + down.stderr
        assert project_resources(b) == {"containers": [], "networks": [], "volumes": []}
    finally:
        if down_b:
            tear_down(mesh_b)
    assert no_import_containers() == []

