"""Where composemesh's code is (a source tree or an installed distribution), and the host
directory where the image builds keep what they reuse (wheelhouse, base probes, build lock).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import MESH_IMAGE

__all__ = [
    "PROJECT_FILES",
    "SourceTree",
    "cache_dir",
    "dist_info_name",
    "installed_dist",
    "locate_sources",
    "walk_files",
]

# Files of a source tree, besides the package, that go into the composemesh wheel.
PROJECT_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
_SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/composemesh`` (``~/.cache/composemesh``), created on demand."""
    root = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    path = Path(root) / "composemesh"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: a private directory under /tmp will do
        path = Path(tempfile.gettempdir()) / f"composemesh-cache-{os.getuid()}"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class SourceTree:
    """Where composemesh's code is: a source tree (pyproject.toml beside the package) or an
    installed distribution (from a wheel), whose files are then repacked into a wheel."""

    package_dir: Path
    project_root: Path | None  # None when installed from a wheel

    @property
    def apps_dir(self) -> Path | None:
        """examples/apps/ of the source tree (the demo image's content)."""
        return None if self.project_root is None else self.project_root / "examples" / "apps"


def locate_sources() -> SourceTree:
    """The composemesh that is running: its package dir and, if any, its source tree."""
    import composemesh

    package_dir = Path(composemesh.__file__).resolve().parent
    root = package_dir.parent
    if (root / "pyproject.toml").is_file():
        return SourceTree(package_dir=package_dir, project_root=root)
    return SourceTree(package_dir=package_dir, project_root=None)


def walk_files(top: Path) -> Iterator[Path]:
    """Every regular file under ``top``, without bytecode, caches and hidden files, in a
    stable order (directories and names sorted)."""
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
                continue
            path = Path(root) / name
            if path.is_file():
                yield path


def installed_dist() -> importlib.metadata.Distribution:
    """The installed composemesh distribution; ImageBuildError when there is none."""
    try:
        return importlib.metadata.distribution("composemesh")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImageBuildError(
            f"{MESH_IMAGE}: composemesh is neither a source tree (no pyproject.toml beside the "
            "package) nor an installed distribution; install it with pip"
        ) from err


def dist_info_name(dist: importlib.metadata.Distribution) -> str:
    """The ``<name>-<version>.dist-info`` directory of an installed distribution."""
    for file in dist.files or ():
        if file.parts and file.parts[0].endswith(".dist-info"):
            return file.parts[0]
    raise ImageBuildError(f"{MESH_IMAGE}: the installed composemesh has no .dist-info")
