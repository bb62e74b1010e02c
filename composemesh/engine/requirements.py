"""composemesh's dependency set: its runtime requirements in one spelling, and the versions
installed here that the mesh image pins. Requirements are read with ``packaging`` (PEP 508).
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from collections.abc import Iterable

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from composemesh.engine.sources import SourceTree, installed_dist

__all__ = ["dependency_lock", "is_extra_only", "normalized_requirement", "runtime_requirements"]

# A quoted string of a marker as packaging writes it: "..." unless the value holds a double
# quote, then '...'. Scanned left to right, so a quote inside the other kind is no boundary.
_QUOTED = re.compile(r"""'[^']*'|"[^"]*\"""")


def _parse(requirement: str) -> Requirement | None:
    try:
        return Requirement(requirement)
    except InvalidRequirement:
        return None


def _marker_text(marker: Marker) -> str:
    """packaging's spelling of a marker (tokens one space apart, redundant parentheses gone)
    with single-quoted strings, as pyproject.toml writes them; a value that holds a single
    quote keeps its double quotes."""

    def single(found: re.Match[str]) -> str:
        text = found.group(0)
        return text if "'" in text[1:-1] else f"'{text[1:-1]}'"

    return _QUOTED.sub(single, str(marker))


def is_extra_only(requirement: str) -> bool:
    """True when a requirement applies only with an extra (its marker names ``extra``)."""
    req = _parse(requirement)
    if req is None or req.marker is None:
        return False
    return "extra" in re.findall(r"[A-Za-z_.]+", _QUOTED.sub("", str(req.marker)))


def normalized_requirement(requirement: str) -> str:
    """One spelling of a PEP 508 requirement, whether it comes from pyproject.toml or from
    a wheel's metadata (which quotes markers with double quotes and sorts specifiers): the
    name in its canonical form, extras and specifiers sorted, the marker as packaging writes
    it but with single-quoted strings. Only the spelling changes; pip reads it the same. A
    requirement that does not parse is left as written.

    The wheelhouse and the mesh image's hash key on the requirements, so a composemesh
    installed from a wheel finds what the same version from its source tree cached.
    """
    req = _parse(requirement)
    if req is None:
        return requirement.strip()
    out: str = canonicalize_name(req.name)
    if req.extras:
        out += f"[{','.join(sorted(req.extras))}]"
    out += f" @ {req.url}" if req.url else str(req.specifier)  # str() sorts the specifiers
    if req.marker is not None:
        out += "; " + _marker_text(req.marker)
    return out


def runtime_requirements(tree: SourceTree) -> list[str]:
    """composemesh's runtime requirements (no extras), from pyproject.toml when there is one,
    else from the installed metadata; the same requirement reads the same from either."""
    if tree.project_root is not None:
        data = tomllib.loads((tree.project_root / "pyproject.toml").read_text(encoding="utf-8"))
        reqs = list(data.get("project", {}).get("dependencies", []))
    else:
        reqs = list(installed_dist().requires or [])
    return sorted(normalized_requirement(r) for r in reqs if r.strip() and not is_extra_only(r))


def dependency_lock(requirements: Iterable[str]) -> list[str]:
    """``name==version`` for the requirements and everything they need, as installed here.

    The image gets exactly the versions this composemesh runs with on the host. Markers are
    not evaluated: a pin for a package the target does not need is a harmless constraint.
    A requirement that is not installed here stays unpinned (pip picks a version); one that
    does not parse is skipped.
    """
    pins: dict[str, str] = {}
    todo = list(requirements)
    while todo:
        text = todo.pop()
        req = _parse(text)
        if req is None or is_extra_only(text):
            continue
        name = canonicalize_name(req.name)
        if name in pins or name == "composemesh":
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins[name] = dist.version
        todo.extend(dist.requires or [])
    return [f"{name}=={pins[name]}" for name in sorted(pins)]
