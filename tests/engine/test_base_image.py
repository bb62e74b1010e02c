"""Pure tests of the base image: the configured reference, the slimming and removal of the
debootstrap rootfs, and how a pull is followed and its failure worded. No engine."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from composemesh.engine import base_image
from composemesh.errors import ImageBuildError


def test_configured_base_image_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(base_image.BASE_IMAGE_ENV, raising=False)
    assert base_image.configured_base_image() == "python:3.11-slim-bookworm"
    assert base_image.configured_base_image("debian:12") == "debian:12"
    monkeypatch.setenv(base_image.BASE_IMAGE_ENV, "registry.local/python:3.11")
    assert base_image.configured_base_image("debian:12") == "registry.local/python:3.11"
    monkeypatch.setenv(base_image.BASE_IMAGE_ENV, "  ")
    assert base_image.configured_base_image() == "python:3.11-slim-bookworm"


@pytest.mark.parametrize(
    ("ref", "repo", "tag"),
    [
        ("python:3.11-slim-bookworm", "python", "3.11-slim-bookworm"),
        ("python", "python", "latest"),
        ("localhost:5000/py", "localhost:5000/py", "latest"),
        ("localhost:5000/py:3", "localhost:5000/py", "3"),
        ("py@sha256:abc", "py", "sha256:abc"),
    ],
)
def test_split_ref(ref: str, repo: str, tag: str) -> None:
    assert base_image._split_ref(ref) == (repo, tag)


def test_slim_rootfs_removes_caches_docs_and_keeps_what_matters(tmp_path: Path) -> None:
    root = tmp_path

    def put(rel: str, data: str = "x" * 100) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)
        return path

    removed = [
        put("var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease"),
        put("var/cache/apt/archives/bash_5.2_amd64.deb"),
        put("var/cache/apt/pkgcache.bin"),
        put("usr/share/man/man1/ls.1.gz"),
        put("usr/share/doc/bash/changelog.gz"),
        put("usr/share/locale/de/LC_MESSAGES/apt.mo"),
        put("usr/share/info/coreutils.info.gz"),
        put("usr/lib/python3/dist-packages/__pycache__/x.cpython-311.pyc"),
        put("var/log/dpkg.log"),
    ]
    kept = [
        put("usr/share/doc/bash/copyright"),
        put("usr/share/locale/locale.alias"),
        put("usr/lib/python3.11/__pycache__/os.cpython-311.pyc"),
        put("usr/lib/python3.11/asyncio/__pycache__/base_events.cpython-311.pyc"),
        put("usr/bin/python3.11"),
        put("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
    ]
    put("etc/resolv.conf", "nameserver 10.0.0.1\n")
    freed = base_image.slim_rootfs(root)
    assert freed >= 100 * len(removed)
    assert [p for p in removed if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert (root / "etc/resolv.conf").read_text() == ""
    assert (
        "path-exclude /usr/share/doc/*"
        in (root / "etc/dpkg/dpkg.cfg.d/composemesh-slim").read_text()
    )
    sources = (root / "etc/apt/sources.list").read_text()
    assert "deb http://deb.debian.org/debian-security bookworm-security main" in sources


def test_remove_tree_removes_a_plain_directory(tmp_path: Path) -> None:
    target = tmp_path / "rootfs"
    (target / "a" / "b").mkdir(parents=True)
    (target / "a" / "b" / "f").write_text("x")
    base_image.remove_tree(target)
    assert not target.exists()
    base_image.remove_tree(target)  # gone already: fine


def test_missing_debootstrap_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(base_image, "SBIN_DIRS", ())
    with pytest.raises(ImageBuildError, match="debootstrap is not installed"):
        base_image.build_fallback_base(client=None)


# --- following a pull -----------------------------------------------------------------------


def follow(items: list[object], answer: float = 0.2, stall: float = 0.2) -> tuple[Any, list[str]]:
    """What _follow_pull makes of ``items`` handed over by the pulling thread."""
    events: queue.Queue[object] = queue.Queue()
    for item in items:
        events.put(item)
    seen: list[str] = []
    reason = base_image._follow_pull(
        events, "py:3", lambda stage, detail: seen.append(detail), answer, stall
    )
    return reason, seen


HEADERS, END = base_image._HEADERS, base_image._END


def test_a_pull_that_ends_without_error_worked() -> None:
    reason, seen = follow(
        [
            HEADERS,
            {"status": "Pulling from library/py", "id": "3"},
            {"status": "Downloading", "progressDetail": {"current": 1}},
            {"status": "Digest: sha256:abc"},
            END,
        ]
    )
    assert reason is None
    assert seen == ["pull py:3: Pulling from library/py", "pull py:3: Digest: sha256:abc"]


def test_the_timeouts_of_a_pull_are_worded_by_how_far_it_got() -> None:
    assert follow([]) == ("no answer within 0s (ReadTimeout)", [])
    assert follow([HEADERS], answer=1.0)[0] == "registry did not answer within 1s"
    reason, _ = follow([HEADERS, {"status": "Pulling fs layer"}], stall=0.1)
    assert reason == "pull stalled for 0s (ReadTimeout)"


def test_events_that_do_not_answer_do_not_extend_the_answer_deadline() -> None:
    events: queue.Queue[object] = queue.Queue()
    events.put(HEADERS)

    def trickle() -> None:
        for _ in range(10):
            events.put({"status": "Waiting"})
            time.sleep(0.05)

    thread = threading.Thread(target=trickle)
    thread.start()
    started = time.monotonic()
    reason = base_image._follow_pull(events, "py:3", lambda s, d: None, 0.2, 5.0)
    elapsed = time.monotonic() - started
    thread.join()
    assert reason == "registry did not answer within 0s"
    assert elapsed < 0.45


def test_the_failures_of_a_pull_are_one_line() -> None:
    refused = docker.errors.APIError("404", explanation="manifest for py:3 not\n found")
    assert follow([refused])[0] == "manifest for py:3 not found"
    assert follow([ConnectionError("refused")])[0] == "no answer within 0s (ConnectionError)"
    assert follow([HEADERS, {"error": "toomanyrequests:\n  rate"}])[0] == "toomanyrequests: rate"
    answered = [HEADERS, {"status": "Downloading"}, OSError("reset")]
    assert follow(answered, stall=60)[0] == "pull stalled for 60s (OSError)"


class PullingEngine:
    """A stand-in for the Docker SDK client (unit tests run without an engine): its pull
    streams the given events; ``images.get`` finds the image once the stream has ended."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.pulled: list[tuple[str, str | None]] = []
        self.done = False
        self.api = self
        self.images = self
        self.closed = threading.Event()

    def pull(self, repository: str, tag: str | None = None, **kwargs: Any) -> Any:
        assert kwargs == {"stream": True, "decode": True}
        self.pulled.append((repository, tag))

        def stream() -> Any:
            try:
                yield from self.events
                self.done = True
            finally:
                self.closed.set()

        return stream()

    def get(self, ref: str) -> Any:
        if not self.done:
            raise docker.errors.ImageNotFound(ref)
        return object()


def test_pull_image_through_the_sdk() -> None:
    engine = PullingEngine([{"status": "Pulling from x"}, {"status": "Status: Downloaded"}])
    seen: list[str] = []
    reason = base_image.pull_image(
        engine, "localhost:5000/py:3", progress=lambda s, d: seen.append(d)
    )
    assert reason is None
    assert engine.pulled == [("localhost:5000/py", "3")]
    assert seen == ["pull localhost:5000/py:3: Pulling from x",
                    "pull localhost:5000/py:3: Status: Downloaded"]  # fmt: skip
    assert engine.closed.wait(1)


def test_a_pull_that_reports_no_image_failed() -> None:
    engine = PullingEngine([])
    engine.get = lambda ref: (_ for _ in ()).throw(docker.errors.ImageNotFound(ref))  # type: ignore[method-assign]
    assert base_image.pull_image(engine, "py:3") == "the engine reported no image"
