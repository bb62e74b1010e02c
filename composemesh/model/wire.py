"""The one codec of the pilot–proxy contract: typed values to JSON and back, every field checked.

The messages themselves are in ``model.snapshot``; this module knows no message. ``encode``
writes any frozen dataclass of the model (tuples, frozensets and mappings inside) as JSON,
deterministically: the same value, the same bytes, so a content hash of them is a version.
``decode`` reads JSON back as a given type; a field missing, mistyped or out of range raises
ContractError naming its path (``$.settings.routing.reviews.routes[0].destinations[0].weight:
Expected `int`, got `float```), which is what a proxy NACKs with.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from composemesh.errors import MeshError

T = TypeVar("T")


class ContractError(MeshError):
    """A message between pilot and proxy that does not decode as its type; says where."""


_ENCODER = msgspec.json.Encoder(order="deterministic")
_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}
_AT = re.compile(r"^(?P<message>.*) - at `(?P<path>[^`]*)`(?: in `(?P<outer>[^`]*)`)?$", re.S)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def encode(message: object) -> bytes:
    """Any message of the contract (or part of one) as JSON: the same value, the same bytes."""
    return _ENCODER.encode(message)


def decode(data: bytes | str, kind: type[T], error: type[ContractError] = ContractError) -> T:
    """``data`` read as a ``kind``, every field checked; ``error`` naming the field if not."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _DECODERS[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        raise error(_reason(exc, lambda: msgspec.json.decode(data), kind)) from None
    except msgspec.DecodeError as exc:
        raise error(f"$: {exc}") from None


def to_builtins(value: object) -> Any:
    """``value`` as plain JSON values (dicts, lists, strings, numbers), as ``encode`` writes it."""
    return msgspec.json.decode(encode(value))


def convert(value: object, kind: type[T], error: type[ContractError] = ContractError) -> T:
    """Plain JSON values (or values of the contract's types) as a ``kind``: as ``decode`` reads
    their JSON, with the same errors."""
    try:
        return msgspec.convert(value, kind, str_keys=True)
    except msgspec.ValidationError as exc:
        raise error(_reason(exc, lambda: value, kind)) from None


def content_version(value: object) -> str:
    """A short, stable version of any value of the contract: the same content, the same id."""
    return hashlib.sha256(encode(value)).hexdigest()[:12]


def _reason(exc: msgspec.ValidationError, raw: Callable[[], Any], kind: type[Any]) -> str:
    """``exc`` as ``<path>: <message>``. msgspec writes ``[...]`` for a key of a mapping: that
    is put right (``.reviews``) by finding the first key whose entry alone fails too."""
    match = _AT.match(str(exc))
    if match is None:
        return f"$: {exc}"
    message, path = match["message"], match["path"]
    if match["outer"]:  # the key itself is wrong
        message, path = f"{message} (a key)", match["outer"]
    if "[...]" in path:  # else keep msgspec's path
        with contextlib.suppress(msgspec.DecodeError, LookupError, TypeError, ValueError):
            path = _name_keys(path, raw(), kind)
    return f"{path}: {message}"


def _name_keys(path: str, raw: Any, kind: type[Any]) -> str:
    while "[...]" in path:
        head, _, tail = path.partition("[...]")
        steps = _steps(head)
        container = raw
        for step in steps:
            container = container[step]
        if not isinstance(container, dict):
            return path
        for key, value in container.items():
            narrowed = _with(raw, steps, {key: value})
            try:
                msgspec.convert(narrowed, kind, str_keys=True)
            except msgspec.ValidationError:
                path, raw = f"{head}.{key}{tail}", narrowed
                break
        else:
            return path
    return path


def _steps(path: str) -> list[str | int]:
    return [name if name else int(index) for name, index in _STEP.findall(path.removeprefix("$"))]


def _with(raw: Any, steps: list[str | int], value: object) -> Any:
    """A copy of ``raw`` with ``value`` at ``steps`` (only the containers on the way copied)."""
    if not steps:
        return value
    step, rest = steps[0], steps[1:]
    if isinstance(raw, list) and isinstance(step, int):
        return [*raw[:step], _with(raw[step], rest, value), *raw[step + 1:]]
    return {**raw, step: _with(raw[step], rest, value)}
