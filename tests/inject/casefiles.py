"""The compose files under cases/, loaded through `docker compose config` once per session."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from composemesh.inject import (
    InjectResult,
    LoadedProject,
    inject,
    load_project,
    validate_project,
)
from composemesh.inject.compose_syntax import NETNS_KEYS
from composemesh.model import wellknown as wk
from composemesh.model.labels import normalize_labels

CASES_DIR = Path(__file__).parent / "cases"
OVERRIDE_SUFFIX = ".override.yaml"
# What a directory case's files may take from the environment: where the cases are, as an
# absolute path (a variable holding an absolute path is a shape of its own).
CASE_ENV = {"CASES_DIR": str(CASES_DIR.resolve())}


def case_names() -> list[str]:
    """Every case: a ``NAME.yaml`` (with ``NAME.override.yaml`` as a second -f when present),
    or a directory ``NAME/`` that compose reads by itself, as `docker compose up` would in it
    (its ``compose.yaml``, ``compose.override.yaml``, ``.env``), with no -f."""
    files = [
        p.name.removesuffix(".yaml")
        for p in CASES_DIR.glob("*.yaml")
        if not p.name.endswith(OVERRIDE_SUFFIX)
    ]
    dirs = [p.name for p in CASES_DIR.iterdir() if (p / "compose.yaml").is_file()]
    return sorted(files + dirs)


def case_dir(name: str) -> Path:
    """The case's project directory (where compose resolves its relative paths)."""
    folder = CASES_DIR / name
    return folder if (folder / "compose.yaml").is_file() else CASES_DIR


def case_files(name: str) -> list[str]:
    """The -f files of a case; none for a directory case (compose finds them)."""
    if case_dir(name) != CASES_DIR:
        return []
    files = [str(CASES_DIR / f"{name}.yaml")]
    override = CASES_DIR / f"{name}{OVERRIDE_SUFFIX}"
    if override.exists():
        files.append(str(override))
    return files


@functools.cache
def loaded(name: str) -> LoadedProject:
    return load_project(case_files(name), env=CASE_ENV, workdir=case_dir(name))


@functools.cache
def injected(name: str) -> InjectResult:
    project = loaded(name)
    validated = validate_project(project)
    return inject(project.model, validated.labels, ca=validated.ca)


def labels_of(svc: dict[str, Any]) -> dict[str, str]:
    return normalize_labels(svc.get("labels"), service="?")


def role_of(svc: dict[str, Any]) -> str | None:
    return labels_of(svc).get(wk.LABEL_ROLE)


def user_services(model: dict[str, Any]) -> dict[str, Any]:
    """Services the user wrote (not added by the injector)."""
    return {n: s for n, s in model["services"].items() if role_of(s) is None}


def holder_of(model: dict[str, Any], app: str) -> dict[str, Any] | None:
    """The holder whose namespace ``app`` joined, if it joined one."""
    mode = str(model["services"][app].get("network_mode", ""))
    target = mode.removeprefix("service:")
    svc = model["services"].get(target) if mode.startswith("service:") else None
    return svc if svc is not None and role_of(svc) == wk.ROLE_NETNS else None


__all__ = ["NETNS_KEYS", "case_dir", "case_files", "case_names", "injected", "loaded"]
