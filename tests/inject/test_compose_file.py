"""The I/O edge: reading compose files through `docker compose config`, writing YAML back."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import yaml

from composemesh.errors import ComposeError, ConfigError
from composemesh.inject import dump_yaml, load_project

from .casefiles import CASES_DIR, case_dir, case_files, loaded


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


def test_model_is_compose_canonical_and_interpolated(tmp_path: Path) -> None:
    """Variables resolved as compose resolves them for `up`; a literal `$` stays `$$`."""
    path = write(
        tmp_path / "compose.yaml",
        """
        services:
          web:
            image: "nginx:${TAG:-latest}"
            ports: ["8080:80"]
            labels: ["a=b"]
            environment: {PRICE: "$$5"}
        """,
    )
    project = load_project([path], "myproj", env={"TAG": ""})
    assert project.name == "myproj"
    web = project.model["services"]["web"]
    assert web["image"] == "nginx:latest"
    assert web["environment"] == {"PRICE": "$$5"}
    assert web["ports"] == [
        {"mode": "ingress", "protocol": "tcp", "published": "8080", "target": 80}
    ]
    assert web["networks"] == {"default": None}
    assert "command" not in web and "entrypoint" not in web  # compose's nulls, dropped
    assert project.raw == ({"services": {"web": {
        "image": "nginx:${TAG:-latest}", "ports": ["8080:80"], "labels": ["a=b"],
        "environment": {"PRICE": "$$5"}}}},)
    assert project.files == (path,)
    assert project.project_dir == str(tmp_path)


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
    path = write(sub / "compose.yaml", "services:\n  web:\n    image: x\n"
                 "    volumes: [./data:/data]\n")
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        model = load_project([os.path.relpath(path)]).model
    finally:
        os.chdir(old)
    volume = model["services"]["web"]["volumes"][0]
    assert (volume["type"], volume["source"]) == ("bind", str(sub / "data"))


def test_a_variable_bind_source_stays_a_bind_mount() -> None:
    """Immich's ``${UPLOAD_LOCATION}:/data`` with ``UPLOAD_LOCATION=./library`` in .env: a
    bind mount of the project's ./library, never a named volume "./library"."""
    volumes = loaded("variable_paths").model["services"]["server"]["volumes"]
    assert volumes[0] == {"type": "bind", "source": str(case_dir("variable_paths") / "library"),
                          "target": "/data", "bind": {"create_host_path": True}}


def test_absolute_paths_from_variables_are_not_put_under_the_project() -> None:
    model = loaded("variable_paths").model
    services = model["services"]
    cases = str(CASES_DIR.resolve())
    server = services["server"]
    assert [v["source"] for v in server["volumes"][1:3]] == [
        "/srv/variable-paths/data", f"{cases}/app"]
    assert services["builder"]["build"]["context"] == f"{cases}/app"
    assert services["mixed"]["build"]["context"] == f"{cases}/app"  # ../app, relative
    assert model["secrets"]["token"]["file"] == f"{cases}/db_password.txt"
    assert model["configs"]["settings"]["file"] == f"{cases}/app.conf"
    assert server["environment"] == {"FROM_FILE": "1", "OTHER": "two"}  # env_file: ${APP_ENV}
    assert server["container_name"] == "vp_server"


def test_build_args_given_by_name_take_their_value_from_the_environment() -> None:
    """Sentry's ``args: [SENTRY_IMAGE]``: alone, beside others, and unset (left out)."""
    services = loaded("variable_paths").model["services"]
    assert services["builder"]["build"]["args"] == {"SENTRY_IMAGE": "getsentry/sentry:nightly"}
    assert services["mixed"]["build"]["args"] == {"BARE": "from-dotenv", "OTHER": "1"}


def test_with_no_file_compose_finds_them_and_merges_the_override() -> None:
    """Zulip's documented setup: compose.yaml and compose.override.yaml, no -f."""
    project = loaded("discovered")
    folder = case_dir("discovered")
    assert project.files == (str(folder / "compose.yaml"), str(folder / "compose.override.yaml"))
    assert project.project_dir == str(folder)
    web = project.model["services"]["web"]
    assert web["labels"] == {"composemesh.version": "v2"}
    assert web["environment"] == {"SETTING": "from-dotenv"}
    assert set(project.model["services"]) == {"web", "db", "worker"}
    assert project.file_of("worker") == str(folder / "compose.override.yaml")


def test_compose_file_in_dotenv_picks_the_files() -> None:
    project = loaded("compose_file_env")
    folder = case_dir("compose_file_env")
    assert project.files == (str(folder / "compose.yaml"), str(folder / "more.yaml"))
    assert set(project.model["services"]) == {"api", "extra"}  # not the override's "ignored"


def test_compose_file_env_file_and_parent_directories(tmp_path: Path) -> None:
    """COMPOSE_FILE from the environment, --env-file, and a project found from below."""
    write(tmp_path / "a.yaml", "services:\n  web:\n    image: x:${TAG}\n")
    write(tmp_path / "b.yaml", "services:\n  web:\n    labels: {b: '1'}\n")
    write(tmp_path / "custom.env", "TAG=from-env-file\n")
    project = load_project(env={"COMPOSE_FILE": "a.yaml:b.yaml"}, env_files=["custom.env"],
                           workdir=tmp_path)
    assert project.model["services"]["web"]["image"] == "x:from-env-file"
    assert project.model["services"]["web"]["labels"] == {"b": "1"}
    assert project.files == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"))
    write(tmp_path / "compose.yaml", "services:\n  api:\n    image: y\n")
    below = tmp_path / "deep" / "er"
    below.mkdir(parents=True)
    found = load_project(workdir=below)
    assert set(found.model["services"]) == {"api"}
    assert found.files == (str(tmp_path / "compose.yaml"),)
    assert found.project_dir == str(tmp_path)


def test_every_profile_is_kept_whatever_compose_profiles_says_now() -> None:
    """COMPOSE_PROFILES picks the services at `up`, so the model has them all, each with its
    ``profiles:``, whichever are active while injecting."""
    project = load_project(case_files("profiles"), env={"COMPOSE_PROFILES": "monitoring"})
    services = project.model["services"]
    assert set(services) == {"web", "debug", "metrics"}
    assert services["debug"]["profiles"] == ["debug", "tools"]


def test_no_file_anywhere_is_compose_error(tmp_path: Path) -> None:
    with pytest.raises(ComposeError, match="no configuration file provided"):
        load_project(workdir=tmp_path)


def test_a_refusal_names_the_same_service_every_run(tmp_path: Path) -> None:
    """Compose checks references in map order: alone, it names b, a, c or d by turns."""
    path = write(tmp_path / "compose.yaml", """
        services:
          d: {image: x, networks: [n2]}
          b: {image: x, volumes: ["v1:/a"]}
          c: {image: x, networks: [n1]}
          a: {image: x, volumes: ["v2:/a"]}
        """)
    messages = set()
    for _ in range(6):
        with pytest.raises(ComposeError) as info:
            load_project([path])
        messages.add(str(info.value))
    assert messages == {f'{path}: service "a" refers to undefined volume v2: '
                        "invalid compose project"}


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
