"""Checks a loaded compose model's mesh configuration and says exactly what is wrong and where.

Pure: the file to blame comes from a ``locate`` callback (LoadedProject.locate), so the same
checks run on a dict in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from composemesh.errors import ConfigError
from composemesh.inject.compose_file import LoadedProject
from composemesh.inject.rewrite import collisions
from composemesh.model.labels import MeshLabels, normalize_labels, parse_labels
from composemesh.model.settings import SECTION, MeshSettings, parse_settings

# locate(service, field) -> the file to name in an error; service None: a top-level key.
Locate = Callable[[str | None, str | None], str | None]


@dataclass(frozen=True)
class ValidatedProject:
    """The mesh configuration of a compose model, checked: per-service labels and settings."""

    model: dict[str, Any]
    labels: Mapping[str, MeshLabels]  # every compose service, meshed or not
    settings: MeshSettings


def validate_project(loaded: LoadedProject) -> ValidatedProject:
    """Validate what `docker compose config` made of the user's files."""
    return validate_model(loaded.model, locate=loaded.locate)


def validate_model(model: Mapping[str, Any], *, locate: Locate | None = None) -> ValidatedProject:
    """Validate ``x-composemesh:``, every service's labels and the names the injector needs.

    Raises the first ConfigError found, with its file (from ``locate``), service and field.
    """

    def where(service: str | None, field: str | None) -> str | None:
        return locate(service, field) if locate else None

    try:
        settings = parse_settings(model.get(SECTION))
    except ConfigError as exc:
        raise exc.located(file=where(None, SECTION)) from None

    services = model.get("services") or {}
    if not isinstance(services, Mapping):
        raise ConfigError(
            "must be a mapping of service names to services",
            file=where(None, "services"),
            field="services",
        )
    labels: dict[str, MeshLabels] = {}
    for name, svc in services.items():
        if not isinstance(svc, Mapping):
            raise ConfigError("must be a mapping", file=where(name, None), service=name)
        try:
            raw = normalize_labels(svc.get("labels"), service=name)
            labels[name] = parse_labels(raw, compose_service=name)
        except ConfigError as exc:
            raise exc.located(file=where(name, "labels"), service=name) from None

    clash = collisions(model, labels)
    if clash:
        name, what = clash[0]
        raise ConfigError(
            f"the name is taken: the injector adds {name!r} as the {what}; rename this "
            f"service (or leave its owner out of the mesh with composemesh.enable=false)",
            file=where(name, None),
            service=name,
        )
    return ValidatedProject(model=dict(model), labels=labels, settings=settings)
