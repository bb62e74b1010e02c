"""`docker compose` itself accepts every injected case and reads it exactly as it was written."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from composemesh.errors import ComposeError
from composemesh.inject import compose_config_check, dump_yaml, inject, load_project
from composemesh.inject.templates import SOCKET_VOLUME
from composemesh.model import wellknown as wk

from .casefiles import (
    CASES_DIR,
    case_dir,
    case_names,
    holder_of,
    injected,
    labels_of,
    loaded,
    role_of,
    user_services,
)

CASES = case_names()


@pytest.fixture
def meshed_file(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A temp file in the cases directory (relative paths resolve as in the case); removed after."""
    path = CASES_DIR / f".meshed-{uuid.uuid4().hex[:8]}.yaml"
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("case", CASES)
def test_compose_accepts_the_output(case: str) -> None:
    compose_config_check(dump_yaml(injected(case).model), CASES_DIR)


@pytest.mark.parametrize("case", CASES)
def test_compose_reads_the_output_as_written(case: str, meshed_file: Path) -> None:
    """Loaded back through compose: the same model, holders carry the ports, a fixpoint."""
    result = injected(case)
    meshed_file.write_text(dump_yaml(result.model))
    again = load_project([str(meshed_file)], loaded(case).name)
    assert again.model == result.model
    assert inject(again.model).model == again.model

    before = loaded(case).model
    for name, svc in user_services(before).items():
        holder = holder_of(again.model, name)
        if holder is None or "ports" not in svc:
            continue
        if svc.get("network_mode", "").startswith("service:"):
            continue  # already meshed: its ports were on its holder all along
        assert "ports" not in again.model["services"][name], name
        assert holder["ports"] == svc["ports"], name


def test_the_pilot_publishes_nothing() -> None:
    """Its API is on a Unix socket in a volume: no port of it on the host or any network."""
    pilot = injected("single").model["services"][wk.PILOT_SERVICE]
    assert "ports" not in pilot
    assert "expose" not in pilot
    assert {"type": "volume", "source": SOCKET_VOLUME, "target": wk.PILOT_SOCKET_DIR} in pilot[
        "volumes"]


def _origin(svc: dict[str, Any]) -> str:
    """The user service an injected holder's namespace was made for (instance 1 of a
    replicated service carries its name; instance N is named ``<name>-N``)."""
    labels = labels_of(svc)
    app = labels.get(wk.LABEL_OF, "")
    instance = labels.get(wk.LABEL_INSTANCE, "1")
    return app if instance == "1" else app.removesuffix(f"-{instance}")


@pytest.mark.parametrize("case", CASES)
def test_no_injected_service_publishes_what_the_user_did_not_write(
    case: str, meshed_file: Path
) -> None:
    """Read back through compose: a holder publishes only ports its app's user wrote (a
    replica fewer, never more); a proxy and the pilot publish nothing."""
    result = injected(case)
    meshed_file.write_text(dump_yaml(result.model))
    again = load_project([str(meshed_file)], loaded(case).name).model["services"]
    before = loaded(case).model["services"]
    injected_names = {a.name for a in result.added}
    assert injected_names <= set(again)
    for name in injected_names:
        svc = again[name]
        role = role_of(svc)
        if role != wk.ROLE_NETNS:
            assert "ports" not in svc, name
            continue
        written = list(before.get(name, {}).get("ports") or [])  # a holder of a meshed input
        written += before.get(_origin(svc), {}).get("ports") or []
        for port in svc.get("ports") or []:
            assert port in written, (name, port)


def test_compose_config_check_reports_what_compose_says(tmp_path: Path) -> None:
    text = "services:\n  web:\n    image: x\n    networks: [nowhere]\n"
    with pytest.raises(ComposeError) as info:
        compose_config_check(text, tmp_path)
    message = str(info.value)
    assert "nowhere" in message
    assert "\n" not in message


def test_compose_config_check_accepts_relative_paths_from_workdir(tmp_path: Path) -> None:
    (tmp_path / "vars.env").write_text("A=1\n")
    text = "services:\n  web:\n    image: x\n    env_file: vars.env\n"
    compose_config_check(text, tmp_path)


def test_the_written_file_works_from_another_directory(tmp_path: Path) -> None:
    """Paths compose resolved (build contexts, binds, env files) are absolute in the output."""
    text = dump_yaml(injected("build").model)
    out = tmp_path / "meshed.yaml"
    out.write_text(text)
    again = load_project([str(out)], "elsewhere")
    context = again.model["services"]["short"]["build"]["context"]
    assert os.path.isabs(context) and Path(context) == CASES_DIR / "app"


_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def _variables_of(case: str) -> set[str]:
    """Every variable a case's files mention, and every one its .env sets."""
    project = loaded(case)
    texts = [Path(project.project_dir, f).read_text() for f in project.files]
    names = set()
    dotenv = case_dir(case) / ".env"
    if dotenv.is_file():
        texts.append(dotenv.read_text())
        names = {ln.partition("=")[0].strip() for ln in texts[-1].splitlines() if "=" in ln}
    return names | {m.group(1) for t in texts for m in _VARIABLE.finditer(t.replace("$$", ""))}


@pytest.mark.parametrize("case", CASES)
def test_the_output_refers_to_no_variable(case: str) -> None:
    """Compose's resolved model: a `$` left in it is a literal one, written `$$`."""
    text = dump_yaml(injected(case).model)
    assert "$" not in text.replace("$$", ""), case


@pytest.mark.parametrize("case", CASES)
def test_the_output_means_the_same_written_elsewhere(case: str, tmp_path: Path) -> None:
    """Written into another folder, beside a .env that gives every variable of the case
    another value and under an environment that does too, compose reads the same model."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names = _variables_of(case) - {"COMPOSE_FILE"}
    (elsewhere / ".env").write_text("".join(f"{n}=/wrong/{n}\n" for n in sorted(names)))
    out = elsewhere / "meshed.yaml"
    result = injected(case)
    out.write_text(dump_yaml(result.model))
    again = load_project([str(out)], loaded(case).name, env={n: "/wrong" for n in names},
                         workdir=tmp_path)
    assert again.model == result.model
