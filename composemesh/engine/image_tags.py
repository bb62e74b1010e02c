"""What an image of ours is made of, and the hash of it that its tag carries.

Each image carries the label ``composemesh.source-hash`` (LABEL_SOURCE_HASH): a sha256 over
everything that goes into it (sources, package data, pyproject.toml, the Dockerfile, the
pinned dependency set, the base image id). When the tagged image has the hash of the current
inputs, nothing is built. Everything here is pure apart from reading the input files; the
hash is a function of the inputs' names and contents only, the same in any checkout.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from composemesh.engine.sources import (
    PROJECT_FILES,
    SourceTree,
    dist_info_name,
    installed_dist,
    walk_files,
)
from composemesh.model.wellknown import PROXY_UID

__all__ = [
    "DEMO_DOCKERFILE",
    "HASH_SCHEME",
    "LABEL_SOURCE_HASH",
    "MESH_DOCKERFILE",
    "content_hash",
    "demo_inputs",
    "mesh_inputs",
]

LABEL_SOURCE_HASH = "composemesh.source-hash"
# Bump when the way images are built changes in a way the inputs do not show.
HASH_SCHEME = "1"

DOCKERFILES = Path(__file__).with_name("dockerfiles")
MESH_DOCKERFILE = DOCKERFILES / "mesh.Dockerfile"
DEMO_DOCKERFILE = DOCKERFILES / "demo.Dockerfile"


def content_hash(files: Mapping[str, Path], extra: Mapping[str, str] | None = None) -> str:
    """A sha256 over named files (name, executable bit, bytes) and named strings.

    The names (not the absolute paths) go in, so the same sources in another checkout hash
    the same. A missing file hashes as missing rather than failing.
    """
    digest = hashlib.sha256(f"composemesh-images/{HASH_SCHEME}\n".encode())
    for name in sorted(files):
        path = files[name]
        try:
            data = path.read_bytes()
            mode = "x" if os.access(path, os.X_OK) else "-"
        except FileNotFoundError:
            data, mode = b"", "missing"
        digest.update(f"file {name} {mode} {len(data)}\n".encode())
        digest.update(data)
        digest.update(b"\n")
    for key in sorted(extra or {}):
        value = (extra or {})[key]
        digest.update(f"extra {key} {len(value)}\n".encode())
        digest.update(value.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _source_files(tree: SourceTree) -> dict[str, Path]:
    """composemesh's own files, named relative to the package (``pkg/...``) and the project
    (``project/...``), or the installed distribution's metadata (``dist-info/...``)."""
    pkg = tree.package_dir
    files = {f"pkg/{p.relative_to(pkg).as_posix()}": p for p in walk_files(pkg)}
    if tree.project_root is not None:
        for name in PROJECT_FILES:
            path = tree.project_root / name
            if path.is_file():
                files[f"project/{name}"] = path
    else:
        dist = installed_dist()
        for name in ("METADATA", "entry_points.txt", "WHEEL"):
            path = Path(str(dist.locate_file(f"{dist_info_name(dist)}/{name}")))
            if path.is_file():
                files[f"dist-info/{name}"] = path
    return files


def mesh_inputs(
    tree: SourceTree,
    *,
    base_id: str,
    requirements: Iterable[str],
    lock: Iterable[str],
) -> tuple[dict[str, Path], dict[str, str]]:
    """The files and strings that make the mesh image (its Dockerfile is package data)."""
    files = _source_files(tree)
    files["dockerfile/mesh"] = MESH_DOCKERFILE
    extra = {
        "base": base_id,
        "requirements": "\n".join(requirements),
        "lock": "\n".join(lock),
        "proxy-uid": str(PROXY_UID),
    }
    return files, extra


def demo_inputs(apps_dir: Path, *, base_id: str) -> tuple[dict[str, Path], dict[str, str]]:
    """The files and strings that make the demo image."""
    files = {f"apps/{p.relative_to(apps_dir).as_posix()}": p for p in walk_files(apps_dir)}
    files["dockerfile/demo"] = DEMO_DOCKERFILE
    return files, {"base": base_id}
