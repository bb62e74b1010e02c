"""`composemesh inject` as a user runs it: no -f, compose's own discovery, -o elsewhere.

Real `docker compose config` throughout (no engine needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from composemesh.cli import main
from composemesh.inject import load_project


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Immich's shape: a variable bind source from .env, merged with an override file."""
    folder = tmp_path / "photos"
    write(folder / "compose.yaml", """
        services:
          server:
            image: ghcr.io/example/server:${TAG:-release}
            container_name: photos_server
            volumes: ["${UPLOAD_LOCATION}:/data"]
          db:
            image: postgres:16
        """)
    write(folder / "compose.override.yaml", """
        services:
          server:
            labels: {composemesh.version: v2}
        """)
    write(folder / ".env", "UPLOAD_LOCATION=./library\n")
    return folder


def test_inject_with_no_file_reads_what_compose_reads(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, ["inject"])
    assert result.exit_code == 0, result.output
    model = yaml.safe_load(result.stdout)
    server = model["services"]["server"]
    assert server["labels"] == {"composemesh.version": "v2"}  # the override, merged
    assert server["volumes"][0]["type"] == "bind"
    assert server["volumes"][0]["source"] == str(project / "library")
    assert model["services"]["server-netns"]["networks"]["default"]["aliases"] == [
        "server", "photos_server"]


def test_inject_o_elsewhere_means_the_same(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written into another folder with another .env, read from there: the same project."""
    monkeypatch.chdir(project)
    out = tmp_path / "deploy" / "meshed.yaml"
    write(tmp_path / "deploy" / ".env", "UPLOAD_LOCATION=/elsewhere\nTAG=wrong\n")
    result = CliRunner().invoke(main, ["inject", "-o", str(out), "--env-file", ".env"])
    assert result.exit_code == 0, result.output
    again = load_project([str(out)], "photos", workdir=out.parent)
    here = load_project([str(project / "compose.yaml"), str(project / "compose.override.yaml")],
                        "photos")
    assert again.model["services"]["server"]["volumes"] == here.model["services"]["server"][
        "volumes"]
    assert again.model["services"]["server"]["image"] == "ghcr.io/example/server:release"


def test_env_file_option_is_compose_s(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(project / "prod.env", "UPLOAD_LOCATION=/srv/photos\nTAG=v1.2\n")
    monkeypatch.chdir(project)
    result = CliRunner().invoke(main, ["inject", "--env-file", "prod.env"])
    assert result.exit_code == 0, result.output
    server = yaml.safe_load(result.stdout)["services"]["server"]
    assert server["image"] == "ghcr.io/example/server:v1.2"
    assert server["volumes"][0]["source"] == "/srv/photos"


def test_no_compose_file_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["inject"])
    assert result.exit_code != 0
    assert "no configuration file provided" in result.output


def test_the_written_file_is_private_it_holds_the_env_values(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compose's resolved model carries the .env's values (passwords, often): 0600."""
    import stat

    write(project / ".env", "UPLOAD_LOCATION=./library\nDB_PASSWORD=hunter2\n")
    write(project / "compose.override.yaml", """
        services:
          db:
            environment: {POSTGRES_PASSWORD: "${DB_PASSWORD}"}
        """)
    monkeypatch.chdir(project)
    out = tmp_path / "out" / "meshed.yaml"
    for _ in range(2):  # written anew over an existing file: still private
        result = CliRunner().invoke(main, ["inject", "-o", str(out)])
        assert result.exit_code == 0, result.output
        assert "hunter2" in out.read_text()
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
