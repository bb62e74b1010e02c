"""The I/O edge: reading compose files through `docker compose config`, writing YAML back."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml

from composemesh.errors import ComposeError, ConfigError
from composemesh.inject import dump_yaml, load_project

from .casefiles import case_files, loaded


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


# --------------------------------------------------------------------------- bad input


def test_not_yaml_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "compose.yaml", "services:\n  web: [image: x\n")
    with pytest.raises(ConfigError) as info:
        load_project([path])
    message = str(info.value)
    assert message.startswith(f"{path}: line ")
    assert "column" in message and "not valid YAML" in message
    assert info.value.file == path
    assert "\n" not in message


def test_a_tab_indented_file_points_at_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "compose.yaml", "services:\n  web:\n\timage: x\n")
    with pytest.raises(ConfigError, match=r"compose\.yaml: line 3, column 1: not valid YAML"):
        load_project([path])


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    good = write(tmp_path / "compose.yaml", "services:\n  web:\n    image: x\n")
    missing = str(tmp_path / "override.yaml")
    with pytest.raises(ConfigError) as info:
        load_project([good, missing])
    assert str(info.value) == f"{missing}: no such file"


@pytest.mark.parametrize(("text", "found"), [("", "nothing"), ("- a\n- b\n", "a list")])
def test_the_top_level_must_be_a_mapping(tmp_path: Path, text: str, found: str) -> None:
    path = write(tmp_path / "compose.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_project([path])
    assert str(info.value).startswith(f"{path}: the top level must be a mapping")
    assert found in str(info.value)


def test_compose_refusal_names_the_file_and_says_what_compose_said(tmp_path: Path) -> None:
    path = write(tmp_path / "compose.yaml", "services:\n  web:\n    image: x\n    ports: 12\n")
    with pytest.raises(ComposeError) as info:
        load_project([path])
    message = str(info.value)
    assert message.startswith(path)
    assert "ports" in message
    assert "\n" not in message


def test_compose_reference_errors_are_caught(tmp_path: Path) -> None:
    path = write(tmp_path / "compose.yaml", "services:\n  web:\n    image: x\n"
                 "    networks: [nowhere]\n")
    with pytest.raises(ComposeError, match="undefined network nowhere"):
        load_project([path])


def test_missing_docker_is_a_compose_error(tmp_path: Path) -> None:
    path = write(tmp_path / "compose.yaml", "services:\n  web:\n    image: x\n")
    with pytest.raises(ComposeError, match="docker compose is not installed"):
        load_project([path], env={"PATH": str(tmp_path)})


# --------------------------------------------------------------------------- what is loaded


def test_model_is_compose_canonical_and_not_interpolated(tmp_path: Path) -> None:
    path = write(
        tmp_path / "compose.yaml",
        """
        services:
          web:
            image: "nginx:${TAG:-latest}"
            ports: ["8080:80"]
            labels: ["a=b"]
        """,
    )
    project = load_project([path], "myproj")
    assert project.name == "myproj"
    web = project.model["services"]["web"]
    assert web["image"] == "nginx:${TAG:-latest}"
    assert web["ports"] == [
        {"mode": "ingress", "protocol": "tcp", "published": "8080", "target": 80}
    ]
    assert web["networks"] == {"default": None}
    assert project.raw == ({"services": {"web": {
        "image": "nginx:${TAG:-latest}", "ports": ["8080:80"], "labels": ["a=b"]}}},)
    assert project.files == (path,)


def test_project_name_comes_from_the_file_the_env_or_the_directory(tmp_path: Path) -> None:
    path = write(tmp_path / "compose.yaml", "services:\n  web:\n    image: x\n")
    assert load_project([path]).name == tmp_path.name.lower()
    assert load_project([path], env={"COMPOSE_PROJECT_NAME": "fromenv"}).name == "fromenv"
    named = write(tmp_path / "named.yaml", "name: fromfile\nservices:\n  web:\n    image: x\n")
    assert load_project([named]).name == "fromfile"
    assert load_project([named], "flag").name == "flag"


def test_derived_network_and_volume_names_are_not_pinned(tmp_path: Path) -> None:
    path = write(
        tmp_path / "compose.yaml",
        """
        services:
          web:
            image: x
            networks: [front, shared, named]
            volumes: [data:/data, keep:/keep]
        networks:
          front: {driver: bridge}
          shared: {external: true}
          named: {name: exact-name}
        volumes:
          data:
          keep: {name: kept-volume}
        """,
    )
    model = load_project([path], "pinned").model
    assert model["networks"] == {
        "front": {"driver": "bridge"},
        "shared": {"external": True, "name": "shared"},
        "named": {"name": "exact-name"},
    }
    assert model["volumes"] == {"data": None, "keep": {"name": "kept-volume"}}


def test_compose_warnings_are_kept() -> None:
    project = loaded("project_name")
    assert any("version" in w and "obsolete" in w for w in project.warnings)
    assert "version" not in project.model


def test_file_of_prefers_the_file_that_sets_the_field() -> None:
    project = loaded("override")
    base, override = case_files("override")
    assert project.file_of("web", "labels") == override
    assert project.file_of("web", "image") == base
    assert project.file_of("web") == override
    assert project.file_of("api", "image") == base
    assert project.file_of("unknown") == base
    assert project.locate(None, "x-composemesh") == base


def test_file_of_key_finds_the_last_file_with_the_section(tmp_path: Path) -> None:
    base = write(tmp_path / "a.yaml", "services:\n  web:\n    image: x\n")
    over = write(tmp_path / "b.yaml", "x-composemesh:\n  trust_domain: b.example\n")
    project = load_project([base, over])
    assert project.file_of_key("x-composemesh") == over
    assert project.locate(None, "x-composemesh") == over
    assert project.model["x-composemesh"] == {"trust_domain": "b.example"}


def test_relative_paths_resolve_against_the_first_file(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "app.env", "A=1\n")
    path = write(sub / "compose.yaml", "services:\n  web:\n    image: x\n    env_file: app.env\n")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        model = load_project([os.path.relpath(path)]).model
    finally:
        os.chdir(old)
    env_file = model["services"]["web"]["env_file"]
    assert env_file[0]["path"] == str(sub / "app.env")


# --------------------------------------------------------------------------- writing


def test_dump_yaml_is_deterministic_block_style_without_anchors() -> None:
    shared = {"a": 1}
    model = {"services": {"z": {"x": shared}, "a": {"x": shared}}, "b": [1, 2]}
    text = dump_yaml(model)
    assert text == dump_yaml(model)
    assert "&" not in text and "*" not in text
    assert "{" not in text and "[" not in text
    assert text.index("z:") < text.index("a:")  # order kept, not sorted
    assert yaml.safe_load(text) == model


def test_dump_yaml_quotes_what_yaml_1_2_would_not_read_as_text() -> None:
    values = ["1e3", "2E+5", "0o17", "0755", "yes", "on", "null", "12", "1.5", "", "a: b"]
    text = dump_yaml({"v": values})
    assert yaml.safe_load(text) == {"v": values}
    for value in ("1e3", "2E+5", "0o17"):
        assert f'"{value}"' in text


def test_dump_yaml_writes_multiline_text_as_a_literal_block() -> None:
    text = dump_yaml({"command": "echo one\necho two\n"})
    assert text == "command: |\n  echo one\n  echo two\n"
