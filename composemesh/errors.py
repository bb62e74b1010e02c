"""The exceptions composemesh raises; nothing foreign leaks past the module that met it."""

from __future__ import annotations

from dataclasses import dataclass


class MeshError(Exception):
    """Base of every error composemesh raises on purpose."""

    exit_code = 1


@dataclass(eq=False)
class ConfigError(MeshError):
    """Bad input a user can fix: names the file, the service and the field.

    ``str(err)`` is the one sentence the CLI prints; exit code 2.
    """

    message: str
    file: str | None = None
    service: str | None = None
    field: str | None = None

    exit_code = 2

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.service:
            where.append(f"service {self.service!r}")
        if self.field:
            where.append(self.field)
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def located(self, *, file: str | None = None, service: str | None = None) -> ConfigError:
        """The same error with the file (and service) filled in where still unknown."""
        return ConfigError(
            self.message,
            file=self.file or file,
            service=self.service or service,
            field=self.field,
        )


class ComposeError(MeshError):
    """`docker compose` refused or failed; the message carries what it said."""

    exit_code = 2


class EngineError(MeshError):
    """The Docker engine is missing, unreachable, or failed an operation."""


class ImageBuildError(MeshError):
    """An image could not be built; the message names the image and the reason."""


class NotReadyError(MeshError):
    """The mesh did not become ready in time; the message says which part."""
