from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from composemesh.engine import docker_host
from tests.engine.fake_engine import Engine, serve


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The fake Docker engine (tests/engine/fake_engine.py) as ``DOCKER_HOST``, and a Docker
    SDK client made afresh for it."""
    fake = Engine()
    with serve(tmp_path / "docker.sock", fake) as host:
        monkeypatch.setenv("DOCKER_HOST", host)
        for name in ("DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONTEXT"):
            monkeypatch.delenv(name, raising=False)
        docker_host._client.cache_clear()
        try:
            yield fake
        finally:
            docker_host._client.cache_clear()
