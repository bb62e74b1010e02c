"""The composemesh wheel that the mesh image installs, and the pip that builds it.

From a source tree the wheel is built by ``pip wheel`` (the project's own build backend, on
a clean copy of the tree). An installed composemesh has no source tree: its wheel is repacked
from the installed files, with a RECORD written here. That is the one thing done by hand:
neither ``pip wheel`` nor ``build`` can make a wheel of an installed distribution, and
``wheel pack`` (which would write the RECORD) is not a dependency of composemesh, while the
format is small (PEP 376/427: ``path,sha256=<urlsafe b64, unpadded>,size`` per file, the
RECORD itself listed with no hash) and is checked by the tests.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name

from composemesh.engine.process import stream_lines
from composemesh.engine.progress import Progress
from composemesh.engine.sources import PROJECT_FILES, SourceTree, dist_info_name, installed_dist
from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import MESH_IMAGE

__all__ = [
    "build_composemesh_wheel",
    "last_error",
    "record_line",
    "repack_distribution",
    "run_pip",
]

# Files of an installed .dist-info that belong to the installation, not to the wheel.
_INSTALL_ONLY = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")


def run_pip(args: list[str], report: Progress, stage: str) -> tuple[int, list[str]]:
    """Runs this interpreter's pip, each output line reported under ``stage``; the exit code
    and the last lines."""
    return stream_lines(
        [sys.executable, "-m", "pip", *args],
        lambda line: report(stage, line),
        env={"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
        keep=20,
    )


def last_error(lines: list[str]) -> str:
    """The line of a tool's output that says what went wrong (else its last line)."""
    for line in reversed(lines):
        if "ERROR" in line or "error" in line.lower():
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def build_composemesh_wheel(
    tree: SourceTree, out_dir: Path, report: Progress, *, scratch: Path | None = None
) -> Path:
    """The composemesh wheel: built from a clean copy of the source tree (a stale build/ of
    the tree cannot leak in), or repacked from the installed distribution."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if tree.project_root is None:
        report("wheel", "repacking the installed composemesh")
        return repack_distribution(installed_dist(), out_dir)
    src = Path(tempfile.mkdtemp(prefix="src-", dir=scratch))
    try:
        shutil.copytree(
            tree.package_dir,
            src / tree.package_dir.name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*"),
        )
        for name in PROJECT_FILES:
            path = tree.project_root / name
            if path.is_file():
                shutil.copy2(path, src / name)
        report("wheel", f"building the composemesh wheel from {tree.project_root}")
        base_args = ["wheel", "--no-deps", "--wheel-dir", str(out_dir), "--progress-bar", "off"]
        code, tail = run_pip([*base_args, str(src)], report, "wheel")
        if code != 0:
            # No index for the build backend? The one installed here may do.
            report("wheel", "retrying without build isolation")
            code, _ = run_pip([*base_args, "--no-build-isolation", str(src)], report, "wheel")
        if code != 0:
            raise ImageBuildError(
                f"{MESH_IMAGE}: cannot build the composemesh wheel from "
                f"{tree.project_root}: {last_error(tail)}"
            )
    finally:
        shutil.rmtree(src, ignore_errors=True)
    found = sorted(out_dir.glob("composemesh-*.whl"))
    if not found:
        raise ImageBuildError(f"{MESH_IMAGE}: pip built no composemesh wheel")
    return found[-1]


def record_line(arcname: str, data: bytes) -> str:
    """A wheel RECORD's line for a file: ``path,sha256=<urlsafe base64, unpadded>,size``."""
    sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={sha},{len(data)}"


def repack_distribution(dist: importlib.metadata.Distribution, out_dir: Path) -> Path:
    """A wheel of an installed distribution, from the files its RECORD lists (bytecode and
    files outside its install directory left out), with a RECORD of its own."""
    info = dist_info_name(dist)
    skip = {f"{info}/{name}" for name in _INSTALL_ONLY}
    project = canonicalize_name(dist.metadata["Name"]).replace("-", "_")
    name = f"{project}-{dist.version}-py3-none-any.whl"
    path = out_dir / name
    record = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as whl:
        for file in sorted(dist.files or (), key=str):
            arc = file.as_posix()
            if arc.startswith("..") or arc in skip or "__pycache__" in file.parts:
                continue
            data = Path(str(dist.locate_file(file))).read_bytes()
            whl.writestr(arc, data)
            record.append(record_line(arc, data))
        record.append(f"{info}/RECORD,,")
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path
