"""`up` that fails half way says which part and why, and leaves nothing it started running."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import composemesh, force_remove, project_resources, unique_project

pytestmark = pytest.mark.e2e


def run_up(tmp_path: Path, text: str) -> tuple[str, object]:
    (tmp_path / "compose.yaml").write_text(text)
    project = unique_project("fail")
    try:
        proc = composemesh(
            "up",
            "-f",
            str(tmp_path / "compose.yaml"),
            "-p",
            project,
            "--timeout",
            "120",
            cwd=tmp_path,
        )
        left = project_resources(project)
    finally:
        force_remove(project)
    return project, (proc, left)


def test_image_that_does_not_build(tmp_path: Path, images: None) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text(
        "FROM composemesh-demo:0.1.0\nRUN echo 'the build step fails on purpose' && exit 3\n"
    )
    _, (proc, left) = run_up(tmp_path, "services:\n  web:\n    build: ./app\n")
    assert proc.returncode != 0
    assert "web" in proc.stderr and ("build" in proc.stderr.lower()), proc.stderr
    assert left["containers"] == [], left


def test_container_that_exits(tmp_path: Path, images: None) -> None:
    text = """
services:
  ok:
    image: composemesh-demo:0.1.0
    command: ["ratings"]
  crashes:
    image: composemesh-demo:0.1.0
    entrypoint: ["python3", "-c", "import sys; print('boom: missing config'); sys.exit(3)"]
"""
    _, (proc, left) = run_up(tmp_path, text)
    assert proc.returncode != 0
    assert "crashes" in proc.stderr, proc.stderr
    assert left["containers"] == [], left
