"""End-to-end tests of the image builds on the real Docker engine (no registry needed).

They build the real images (or find them up to date), run them with no network, and check
the offline base: the pull gives up in bounded time and debootstrap builds a usable base.
Every container started here is removed again.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composemesh.engine import base_image, images
from composemesh.engine.images import LABEL_SOURCE_HASH, ensure_images
from composemesh.model.wellknown import DEMO_IMAGE, MESH_IMAGE, PROXY_UID

pytestmark = pytest.mark.e2e


class Recorder:
    """Collects progress(stage, detail) calls."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def __call__(self, stage: str, detail: str) -> None:
        self.events.append((stage, detail))

    def stages(self) -> set[str]:
        return {stage for stage, _ in self.events}

    def details(self, stage: str) -> list[str]:
        return [detail for s, detail in self.events if s == stage]


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    import docker

    c = docker.from_env(timeout=600)
    c.ping()
    yield c
    c.close()


@pytest.fixture(scope="module")
def built(client: Any) -> dict[str, str]:
    """Both images, built now or found up to date."""
    return ensure_images(client)


def run(client: Any, image: str, command: list[str], **kwargs: Any) -> str:
    """Runs a container to completion with no network; its output (removed afterwards)."""
    out = client.containers.run(
        image, command, network_mode="none", remove=True, stdout=True, stderr=True, **kwargs
    )
    return out.decode() if isinstance(out, bytes) else str(out)


@pytest.fixture
def frozen_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> images.SourceTree:
    """A snapshot of the source tree, so that edits made meanwhile (by people working in this
    checkout) cannot turn a cache hit into a legitimate rebuild while the test runs."""
    live = images.locate_sources()
    assert live.project_root is not None
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    shutil.copytree(live.package_dir, tmp_path / "composemesh", ignore=ignore)
    shutil.copytree(
        live.project_root / "examples" / "apps", tmp_path / "examples" / "apps", ignore=ignore
    )
    for name in images._PROJECT_FILES:
        if (live.project_root / name).is_file():
            shutil.copy2(live.project_root / name, tmp_path / name)
    tree = images.SourceTree(package_dir=tmp_path / "composemesh", project_root=tmp_path)
    monkeypatch.setattr(images, "locate_sources", lambda: tree)
    return tree


def test_second_call_is_a_cache_hit(client: Any, frozen_sources: images.SourceTree) -> None:
    first = Recorder()
    ids = ensure_images(client, progress=first)
    assert set(ids) == {MESH_IMAGE, DEMO_IMAGE}
    for tag, image_id in ids.items():
        image = client.images.get(tag)
        assert image.id == image_id
        assert len(image.labels[LABEL_SOURCE_HASH]) == 64

    again = Recorder()
    started = time.monotonic()
    ids_again = ensure_images(client, progress=again)
    elapsed = time.monotonic() - started

    assert ids_again == ids
    cached = again.details("cached")
    assert any(d.startswith(MESH_IMAGE) for d in cached), again.events
    assert any(d.startswith(DEMO_IMAGE) for d in cached), again.events
    assert not again.stages() & {"build", "built", "wheelhouse", "wheel"}, again.events
    assert elapsed < 2.0, f"a cached ensure_images took {elapsed:.2f}s"


def test_only_the_images_asked_for_are_looked_at(client: Any, built: dict[str, str]) -> None:
    # what `up` asks for a project that runs no demo app (see images_needed)
    seen = Recorder()
    ids = ensure_images(client, images=(MESH_IMAGE,), progress=seen)
    assert set(ids) == {MESH_IMAGE}
    assert not [detail for _, detail in seen.events if DEMO_IMAGE in detail], seen.events


def test_mesh_image_has_what_it_needs_without_network(client: Any, built: dict[str, str]) -> None:
    out = run(
        client,
        MESH_IMAGE,
        [
            "python",
            "-c",
            "import composemesh, aiohttp, cryptography, httptools, uvloop, yaml, docker, "
            "prometheus_client; print('ok')",
        ],
    )
    assert out.strip() == "ok"
    assert "nf_tables" in run(client, MESH_IMAGE, ["iptables", "--version"])
    assert run(client, MESH_IMAGE, ["id", "-u", "composemesh-proxy"]).strip() == str(PROXY_UID)
    assert run(client, MESH_IMAGE, ["id", "-g", "composemesh-proxy"]).strip() == str(PROXY_UID)
    assert run(client, MESH_IMAGE, ["sh", "-c", "command -v composemesh"]).strip() in (
        "/opt/composemesh/bin/composemesh",
        "/usr/local/bin/composemesh",
    )
    # Nothing of the build is left in the image: no wheelhouse, no pip.
    left = run(client, MESH_IMAGE, ["sh", "-c", "ls /wheels 2>&1; python -m pip 2>&1 | head -1"])
    assert "No such file" in left and "No module named pip" in left


def test_mesh_image_can_set_up_capture_rules(client: Any, built: dict[str, str]) -> None:
    out = run(
        client,
        MESH_IMAGE,
        [
            "sh",
            "-c",
            "iptables -t nat -N COMPOSEMESH_TEST && "
            f"iptables -t nat -A OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN && "
            "iptables -t nat -S OUTPUT",
        ],
        cap_add=["NET_ADMIN"],
    )
    assert f"--uid-owner {PROXY_UID}" in out


def test_demo_image_serves(client: Any, built: dict[str, str]) -> None:
    container = client.containers.run(
        DEMO_IMAGE, ["ratings"], network_mode="none", detach=True, environment={"PORT": "9080"}
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            code, out = container.exec_run(
                ["python3", "/app/demo.py", "get", "http://127.0.0.1:9080/healthz"]
            )
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert code == 0, out.decode(errors="replace")
        attrs = client.images.get(DEMO_IMAGE).attrs["Config"]
        assert attrs["Entrypoint"] == ["python3", "/app/demo.py"]
    finally:
        container.remove(force=True)


def test_dependency_wheels_stay_cached(client: Any, built: dict[str, str]) -> None:
    """A source-only change reuses the wheelhouse: only the composemesh wheel is rebuilt."""
    base = base_image.ensure_base_image(client)
    base_id = client.images.get(base).id
    facts = images.probe_base(client, base, base_id)
    tree = images.locate_sources()
    requirements = images.runtime_requirements(tree)
    lock = images.dependency_lock(requirements)
    rec = Recorder()
    started = time.monotonic()
    wheelhouse = images.ensure_wheelhouse(requirements, lock, facts, rec)
    assert time.monotonic() - started < 1.0
    assert any("cached" in d for d in rec.details("wheelhouse")), rec.events
    names = {p.name.split("-")[0].lower() for p in wheelhouse.glob("*.whl")}
    assert {"aiohttp", "cryptography", "uvloop", "httptools", "pyyaml", "docker"} <= names
    assert "composemesh" not in names


def test_present_base_is_used_without_a_pull(client: Any) -> None:
    base = base_image.ensure_base_image(client)
    present = f"cmtest-base:present-{uuid.uuid4().hex[:12]}"
    client.images.get(base).tag(present)
    try:
        rec = Recorder()
        started = time.monotonic()
        assert base_image.ensure_base_image(client, present, rec) == present
        assert time.monotonic() - started < 1.0
        assert not [d for d in rec.details("base") if d.startswith("pulling")]
    finally:
        client.images.remove(present, noprune=True)


def test_a_registry_that_never_answers_is_given_up_in_bounded_time(client: Any) -> None:
    """A local listener that accepts and stays silent: the engine's pull hangs on it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        reason = base_image.pull_image(client, f"127.0.0.1:{port}/silent:1", answer_timeout=3)
        elapsed = time.monotonic() - started
        assert reason is not None
        assert elapsed < 6, f"took {elapsed:.1f}s: {reason}"
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def test_an_unknown_registry_fails_fast(client: Any) -> None:
    started = time.monotonic()
    reason = base_image.pull_image(client, "registry.invalid/composemesh/none:1")
    assert reason is not None
    assert time.monotonic() - started < base_image.PULL_ANSWER_TIMEOUT + 3


def test_debootstrap_builds_a_usable_base(client: Any) -> None:
    """The offline fallback itself (about a minute; needs the Debian mirror)."""
    tag = f"cmtest-base:{uuid.uuid4().hex[:12]}"  # unique: test runs may overlap
    tmp_root = Path(tempfile.mkdtemp(prefix="cmtest-", dir="/var/tmp"))
    rec = Recorder()
    try:
        base_image.build_fallback_base(client, progress=rec, tag=tag, tmp_root=str(tmp_root))
        assert list(tmp_root.iterdir()) == []  # the rootfs is gone
        image = client.images.get(tag)
        assert image.labels.get(base_image.LABEL_BASE) == "bookworm"
        assert image.attrs["Size"] < 180e6, f"base is {image.attrs['Size'] / 1e6:.0f} MB"
        out = run(
            client,
            tag,
            [
                "sh",
                "-c",
                "python3 -c 'import venv, ssl; print(1)' && iptables --version && "
                "command -v useradd; command -v ip; "
                "find /usr/share/man /usr/share/info /var/lib/apt/lists -mindepth 1 | wc -l",
            ],
        )
        assert out.splitlines()[0] == "1"
        assert "/usr/sbin/useradd" in out and "/usr/sbin/ip" in out
        assert out.splitlines()[-1].strip() == "0", out  # no man pages, no apt lists
    finally:
        import docker.errors

        shutil.rmtree(tmp_root, ignore_errors=True)
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag)
