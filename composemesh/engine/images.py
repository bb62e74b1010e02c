"""The mesh and demo images: built offline from a wheelhouse, skipped when nothing changed.

``ensure_images(client, images=...)`` makes sure the engine has ``MESH_IMAGE`` (pilot, proxy
and gateway; the role is the command) and, where a service runs it (``images_needed``),
``DEMO_IMAGE`` (the stdlib-only demo apps of examples/apps/, only in a source tree).
Both build FROM the base that :func:`ensure_base_image` provides, with no network in the
container build: the mesh image installs composemesh and its dependencies from a wheelhouse
that the host prepared (binary wheels for the image's Python and platform).

Each image carries the label ``composemesh.source-hash``: a hash over everything that goes
into it (sources, package data, pyproject.toml, the Dockerfile, the pinned dependency set,
the base image id). When the tagged image has the hash of the current inputs, nothing runs.

Progress is reported as ``progress(stage, detail)``, stages:

- ``base``: choosing, pulling or building the base image
- ``cached``: an image is up to date (detail starts with its tag)
- ``wheelhouse``: downloading the dependency wheels (cached on disk by dependency set)
- ``wheel``: building the composemesh wheel
- ``build``: a line of the docker build log (detail starts with the tag)
- ``built``: an image was built (tag, id, size, seconds)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composemesh import __version__
from composemesh.engine.base_image import Progress, _noop, ensure_base_image
from composemesh.engine.process import stream_lines
from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import DEMO_IMAGE, MESH_IMAGE, PROXY_UID

__all__ = [
    "LABEL_SOURCE_HASH",
    "BaseFacts",
    "SourceTree",
    "cache_dir",
    "content_hash",
    "demo_inputs",
    "dependency_lock",
    "ensure_images",
    "images_needed",
    "locate_sources",
    "mesh_inputs",
    "normalized_requirement",
    "runtime_requirements",
    "wheel_platforms",
]

LABEL_SOURCE_HASH = "composemesh.source-hash"
LABEL_IMAGE = "composemesh.image"
LABEL_BASE_IMAGE = "composemesh.base-image"
LABEL_BUILD_CACHE = "composemesh.build-cache"
BUILD_CACHE_IMAGE = "composemesh-build-cache:deps"
_DEPS_STEP = "/wheels/deps/requirements.txt"
# Bump when the way images are built changes in a way the inputs do not show.
HASH_SCHEME = "1"

DOCKERFILES = Path(__file__).with_name("dockerfiles")
MESH_DOCKERFILE = DOCKERFILES / "mesh.Dockerfile"
DEMO_DOCKERFILE = DOCKERFILES / "demo.Dockerfile"

# Files of a source tree, besides the package, that go into the composemesh wheel.
_PROJECT_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
_SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


# --- where things are -----------------------------------------------------------------------


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


def _walk_files(top: Path) -> Iterator[Path]:
    """Every regular file under ``top``, without bytecode, caches and hidden files."""
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES):
                continue
            path = Path(root) / name
            if path.is_file():
                yield path


# --- content hashing (pure) -----------------------------------------------------------------


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
    pkg = tree.package_dir
    files = {f"pkg/{p.relative_to(pkg).as_posix()}": p for p in _walk_files(pkg)}
    if tree.project_root is not None:
        for name in _PROJECT_FILES:
            path = tree.project_root / name
            if path.is_file():
                files[f"project/{name}"] = path
    else:
        dist = _installed_dist()
        for name in ("METADATA", "entry_points.txt", "WHEEL"):
            path = Path(str(dist.locate_file(f"{_dist_info_name(dist)}/{name}")))
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
    files = {f"apps/{p.relative_to(apps_dir).as_posix()}": p for p in _walk_files(apps_dir)}
    files["dockerfile/demo"] = DEMO_DOCKERFILE
    return files, {"base": base_id}


# --- the dependency set ---------------------------------------------------------------------

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str | None:
    match = _NAME_RE.match(requirement)
    return _canonical(match.group(1)) if match else None


def _is_extra_only(requirement: str) -> bool:
    marker = requirement.partition(";")[2]
    return re.search(r"\bextra\b", marker) is not None


def _installed_dist() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("composemesh")
    except importlib.metadata.PackageNotFoundError as err:
        raise ImageBuildError(
            f"{MESH_IMAGE}: composemesh is neither a source tree (no pyproject.toml beside the "
            "package) nor an installed distribution; install it with pip"
        ) from err


def _dist_info_name(dist: importlib.metadata.Distribution) -> str:
    for file in dist.files or ():
        if file.parts and file.parts[0].endswith(".dist-info"):
            return file.parts[0]
    raise ImageBuildError(f"{MESH_IMAGE}: the installed composemesh has no .dist-info")


def runtime_requirements(tree: SourceTree) -> list[str]:
    """composemesh's runtime requirements (no extras), from pyproject.toml when there is one,
    else from the installed metadata; the same requirement reads the same from either."""
    if tree.project_root is not None:
        data = tomllib.loads((tree.project_root / "pyproject.toml").read_text(encoding="utf-8"))
        reqs = list(data.get("project", {}).get("dependencies", []))
    else:
        reqs = list(_installed_dist().requires or [])
    return sorted(
        normalized_requirement(r) for r in reqs if r.strip() and not _is_extra_only(r)
    )


_MARKER_TOKEN = re.compile(
    r"""\s*(?:(?P<str>'[^']*'|"[^"]*")|(?P<op>===|==|!=|<=|>=|~=|<|>|\(|\))|(?P<word>[^\s()'"<>=!~]+))"""
)


def normalized_requirement(requirement: str) -> str:
    """One spelling of a PEP 508 requirement, whether it comes from pyproject.toml or from
    a wheel's metadata (which quotes markers with double quotes and sorts specifiers): the
    name in its canonical form, extras and specifiers sorted, the marker's tokens one space
    apart with single-quoted strings. Only the spelling changes; pip reads it the same.

    The wheelhouse and the mesh image's hash key on the requirements, so a composemesh
    installed from a wheel finds what the same version from its source tree cached.
    """
    spec, _, marker = requirement.partition(";")
    spec = spec.strip()
    if "@" in spec:  # a direct reference: nothing to sort
        head, _, url = spec.partition("@")
        out = f"{head.strip()} @ {url.strip()}"
    else:
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*(.*)$", spec)
        if match is None:
            return requirement.strip()
        name, extras, versions = match.groups()
        out = _canonical(name)
        names = sorted(e.strip() for e in (extras or "").split(",") if e.strip())
        if names:
            out += f"[{','.join(names)}]"
        versions = versions.strip()
        if versions.startswith("(") and versions.endswith(")"):
            versions = versions[1:-1]
        parts = sorted("".join(v.split()) for v in versions.split(",") if v.strip())
        out += ",".join(parts)
    marker = marker.strip()
    if marker:
        tokens = []
        pos = 0
        while pos < len(marker):
            if marker[pos:].strip() == "":
                break
            found = _MARKER_TOKEN.match(marker, pos)
            if found is None or found.end() == pos:
                return requirement.strip()  # not a marker we can read: left as written
            text = found.group("str")
            if text is not None:
                tokens.append(text if "'" in text[1:-1] else f"'{text[1:-1]}'")
            else:
                tokens.append(found.group("op") or found.group("word"))
            pos = found.end()
        out += "; " + " ".join(tokens).replace("( ", "(").replace(" )", ")")
    return out


def dependency_lock(requirements: Iterable[str]) -> list[str]:
    """``name==version`` for the requirements and everything they need, as installed here.

    The image gets exactly the versions this composemesh runs with on the host. Markers are
    not evaluated: a pin for a package the target does not need is a harmless constraint.
    A requirement that is not installed here stays unpinned (pip picks a version).
    """
    pins: dict[str, str] = {}
    todo = [r for r in requirements]
    while todo:
        req = todo.pop()
        if _is_extra_only(req):
            continue
        name = _requirement_name(req)
        if not name or name in pins or name == "composemesh":
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins[name] = dist.version
        todo.extend(dist.requires or [])
    return [f"{name}=={pins[name]}" for name in sorted(pins)]


# --- what the base image is -----------------------------------------------------------------


@dataclass(frozen=True)
class BaseFacts:
    """What a base image offers, as seen from inside it (with no network)."""

    python: str  # "3.11"
    machine: str  # "x86_64", "aarch64"
    libc: str  # "glibc"
    libc_version: tuple[int, int]
    commands: frozenset[str] = field(default_factory=frozenset)

    @property
    def self_contained(self) -> bool:
        """True when the mesh image builds FROM it with no network."""
        return {"iptables", "useradd", "groupadd"} <= self.commands

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")


_PROBE = r"""
for c in iptables useradd groupadd apt-get; do
  if command -v "$c" >/dev/null 2>&1; then echo "has=$c"; fi
done
py=$(command -v python3 || true)
if [ -z "$py" ]; then echo "nopython"; exit 0; fi
"$py" -c 'import json, platform, sys
print("facts=" + json.dumps({"python": "%d.%d" % sys.version_info[:2],
    "machine": platform.machine(), "libc": platform.libc_ver()}))'
"""


def probe_base(client: Any, base: str, base_id: str) -> BaseFacts:
    """Runs the base once (no network) to learn its Python, platform and commands; cached."""
    cache = cache_dir() / "probes" / f"{base_id.replace(':', '-')}.json"
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            return BaseFacts(
                python=data["python"],
                machine=data["machine"],
                libc=data["libc"],
                libc_version=tuple(data["libc_version"]),  # type: ignore[arg-type]
                commands=frozenset(data["commands"]),
            )
        except (ValueError, KeyError, TypeError):
            pass
    import docker.errors

    try:
        out = client.containers.run(
            base,
            entrypoint=["/bin/sh", "-c"],
            command=[_PROBE],
            network_mode="none",
            remove=True,
            stdout=True,
            stderr=True,
            user="0",
        )
    except docker.errors.DockerException as err:
        reason = getattr(err, "explanation", None) or err
        raise ImageBuildError(f"cannot run the base image {base}: {reason}") from err
    text = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
    commands = {ln[4:].strip() for ln in text.splitlines() if ln.startswith("has=")}
    facts_line = next((ln for ln in text.splitlines() if ln.startswith("facts=")), None)
    if facts_line is None:
        raise ImageBuildError(f"the base image {base} has no python3; composemesh needs one")
    raw = json.loads(facts_line[len("facts=") :])
    libc_name, libc_ver = raw["libc"][0], raw["libc"][1]
    if libc_name != "glibc":
        raise ImageBuildError(
            f"the base image {base} has no glibc ({libc_name or 'unknown libc'}); composemesh "
            "needs a glibc-based (manylinux) base such as Debian"
        )
    major, minor = (int(x) for x in libc_ver.split(".")[:2])
    facts = BaseFacts(
        python=raw["python"],
        machine=raw["machine"],
        libc=libc_name,
        libc_version=(major, minor),
        commands=frozenset(commands),
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(
        json.dumps(
            {
                "python": facts.python,
                "machine": facts.machine,
                "libc": facts.libc,
                "libc_version": list(facts.libc_version),
                "commands": sorted(facts.commands),
            }
        )
    )
    return facts


def wheel_platforms(machine: str, libc_version: tuple[int, int]) -> list[str]:
    """The manylinux platform tags a glibc ``libc_version`` on ``machine`` can run, newest first."""
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    major, minor = libc_version
    if major != 2:
        raise ImageBuildError(f"unexpected glibc version {major}.{minor} in the base image")
    oldest = 5 if arch in ("x86_64", "i686") else 17
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, oldest - 1, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for m, name in legacy.items() if oldest <= m <= minor]
    return tags


# --- the wheelhouse -------------------------------------------------------------------------


def _pip(args: list[str], report: Progress, stage: str) -> tuple[int, list[str]]:
    return stream_lines(
        [sys.executable, "-m", "pip", *args],
        lambda line: report(stage, line),
        env={"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"},
        keep=20,
    )


def _last_error(lines: list[str]) -> str:
    for line in reversed(lines):
        if "ERROR" in line or "error" in line.lower():
            return line.strip()
    return lines[-1].strip() if lines else "no output"


def _host_matches(facts: BaseFacts) -> bool:
    """True when wheels built by this interpreter run in the image."""
    if sys.platform != "linux" or platform.machine() != facts.machine:
        return False
    if f"{sys.version_info[0]}.{sys.version_info[1]}" != facts.python:
        return False
    name, version = platform.libc_ver()
    if name != "glibc":
        return False
    try:
        host = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return host <= facts.libc_version


def ensure_wheelhouse(
    requirements: list[str], lock: list[str], facts: BaseFacts, report: Progress
) -> Path:
    """A directory of binary wheels of the dependencies for the image; cached on disk by
    dependency set and target, so a change of composemesh's own sources reuses it."""
    platforms = wheel_platforms(facts.machine, facts.libc_version)
    key = hashlib.sha256(
        json.dumps(
            {"req": requirements, "lock": lock, "py": facts.python, "platforms": platforms}
        ).encode()
    ).hexdigest()[:20]
    root = cache_dir() / "wheelhouse"
    target = root / f"deps-{key}"
    if (target / ".complete").is_file():
        report("wheelhouse", f"dependency wheels cached ({target})")
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="deps-tmp-", dir=root))
    try:
        (work / "requirements.txt").write_text("\n".join(requirements) + "\n")
        (work / "constraints.txt").write_text("\n".join(lock) + "\n")
        wheels = work / "wheels"
        wheels.mkdir()
        report(
            "wheelhouse",
            f"downloading {len(lock) or len(requirements)} dependency wheels for "
            f"cp{facts.python.replace('.', '')} {platforms[0]}",
        )
        args = [
            "download",
            "--only-binary=:all:",
            "--dest", str(wheels),
            "--python-version", facts.python,
            "--implementation", "cp",
            "--abi", facts.abi,
            *(a for p in platforms for a in ("--platform", p)),
            "--progress-bar", "off",
            "-r", str(work / "requirements.txt"),
            "-c", str(work / "constraints.txt"),
        ]  # fmt: skip
        code, tail = _pip(args, report, "wheelhouse")
        if code != 0 and _host_matches(facts):
            report("wheelhouse", "no binary wheels for all of them; building with pip wheel")
            shutil.rmtree(wheels)
            wheels.mkdir()
            args = [
                "wheel",
                "--wheel-dir", str(wheels),
                "--prefer-binary",
                "--progress-bar", "off",
                "-r", str(work / "requirements.txt"),
                "-c", str(work / "constraints.txt"),
            ]  # fmt: skip
            code, tail = _pip(args, report, "wheelhouse")
        if code != 0:
            raise ImageBuildError(
                f"{MESH_IMAGE}: cannot get the dependency wheels for "
                f"cp{facts.python.replace('.', '')} {facts.machine}: {_last_error(tail)}"
            )
        (wheels / ".complete").write_text("\n".join(lock) + "\n")
        if target.exists():  # another process won the race
            shutil.rmtree(target, ignore_errors=True)
        os.replace(wheels, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Older dependency sets are of no further use.
    for old in root.glob("deps-*"):
        if old != target and old.is_dir() and not old.name.startswith("deps-tmp-"):
            shutil.rmtree(old, ignore_errors=True)
    return target


def build_composemesh_wheel(
    tree: SourceTree, out_dir: Path, report: Progress, *, scratch: Path | None = None
) -> Path:
    """The composemesh wheel: built from a clean copy of the source tree (a stale build/ of
    the tree cannot leak in), or repacked from the installed distribution."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if tree.project_root is None:
        report("wheel", "repacking the installed composemesh")
        return _repack_installed(out_dir)
    src = Path(tempfile.mkdtemp(prefix="src-", dir=scratch))
    try:
        shutil.copytree(
            tree.package_dir,
            src / tree.package_dir.name,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*"),
        )
        for name in _PROJECT_FILES:
            path = tree.project_root / name
            if path.is_file():
                shutil.copy2(path, src / name)
        report("wheel", f"building the composemesh wheel from {tree.project_root}")
        base_args = ["wheel", "--no-deps", "--wheel-dir", str(out_dir), "--progress-bar", "off"]
        code, tail = _pip([*base_args, str(src)], report, "wheel")
        if code != 0:
            # No index for the build backend? The one installed here may do.
            report("wheel", "retrying without build isolation")
            code, _ = _pip([*base_args, "--no-build-isolation", str(src)], report, "wheel")
        if code != 0:
            raise ImageBuildError(
                f"{MESH_IMAGE}: cannot build the composemesh wheel from "
                f"{tree.project_root}: {_last_error(tail)}"
            )
    finally:
        shutil.rmtree(src, ignore_errors=True)
    found = sorted(out_dir.glob("composemesh-*.whl"))
    if not found:
        raise ImageBuildError(f"{MESH_IMAGE}: pip built no composemesh wheel")
    return found[-1]


def _repack_installed(out_dir: Path) -> Path:
    """A wheel of the installed composemesh, from the files its RECORD lists."""
    import base64
    import zipfile

    dist = _installed_dist()
    info = _dist_info_name(dist)
    skip = {f"{info}/RECORD", f"{info}/INSTALLER", f"{info}/REQUESTED", f"{info}/direct_url.json"}
    name = f"composemesh-{dist.version}-py3-none-any.whl"
    path = out_dir / name
    record = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as whl:
        for file in sorted(dist.files or (), key=str):
            arc = file.as_posix()
            if arc.startswith("..") or arc in skip or "__pycache__" in file.parts:
                continue
            data = Path(str(dist.locate_file(file))).read_bytes()
            whl.writestr(arc, data)
            sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{arc},sha256={sha},{len(data)}")
        record.append(f"{info}/RECORD,,")
        whl.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


# --- building -------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One image build at a time on this host (two `composemesh up` at once)."""
    with open(cache_dir() / "build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _current(client: Any, tag: str) -> tuple[str, str] | None:
    """(id, source hash) of the tagged image, or None when the engine lacks it."""
    import docker.errors

    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    labels = image.attrs.get("Config", {}).get("Labels") or {}
    return str(image.id), str(labels.get(LABEL_SOURCE_HASH, ""))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _docker_build(
    client: Any,
    *,
    tag: str,
    context: Path,
    dockerfile: Path,
    base: str,
    labels: dict[str, str],
    network: bool,
    nocache: bool,
    report: Progress,
    buildargs: Mapping[str, str] | None = None,
) -> str:
    import docker.errors
    import requests

    shutil.copy2(dockerfile, context / "Dockerfile")
    tail: list[str] = []
    image_id = None
    error = None
    try:
        stream = client.api.build(
            path=str(context),
            tag=tag,
            buildargs={"BASE": base, **(buildargs or {})},
            labels=labels,
            rm=True,
            forcerm=True,
            pull=False,
            nocache=nocache,
            network_mode=None if network else "none",
            decode=True,
        )
        for event in stream:
            if "stream" in event:
                for line in _ANSI.sub("", str(event["stream"])).splitlines():
                    line = line.strip()
                    if not line:
                        continue
                    tail = [*tail[-19:], line]
                    report("build", f"{tag}: {line}")
            elif "error" in event:
                error = str(event.get("error")).strip()
                report("build", f"{tag}: {error}")
            elif "aux" in event and isinstance(event["aux"], dict) and "ID" in event["aux"]:
                image_id = str(event["aux"]["ID"])
    except (docker.errors.APIError, requests.exceptions.RequestException) as err:
        error = str(err)
    if error is not None:
        raise ImageBuildError(f"{tag}: docker build failed{_build_failure(error, tail)}")
    current = _current(client, tag)
    if current is None:
        raise ImageBuildError(f"{tag}: docker build ended without an image ({_last_error(tail)})")
    return image_id or current[0]


def _keep_build_cache(client: Any) -> None:
    """Tags the dependency layer of the mesh image's venv stage and removes the rest.

    The classic builder leaves each earlier stage of a multi-stage build as an untagged image.
    Its dependency layer is worth keeping (the next build after a source change reuses it):
    it is tagged BUILD_CACHE_IMAGE. Every other untagged image of that stage (this build's
    stage tip, dependency layers of older dependency sets) is removed.
    """
    import docker.errors

    label = f"{LABEL_BUILD_CACHE}=venv"
    with contextlib.suppress(docker.errors.DockerException):
        stale = client.images.list(filters={"dangling": True, "label": label})
        stale.sort(key=lambda image: str(image.attrs.get("Created", "")), reverse=True)
        if stale:  # the newest is this build's stage tip
            for layer in stale[0].history():
                layer_id = str(layer.get("Id", ""))
                if _DEPS_STEP in str(layer.get("CreatedBy", "")) and layer_id.startswith("sha256:"):
                    client.images.get(layer_id).tag(BUILD_CACHE_IMAGE)
                    break
        for image in stale:
            _remove_untagged(client, image.id, prune=True)


def _remove_untagged(client: Any, image_id: str, *, prune: bool) -> None:
    """Removes an image that has no tag and no container; its untagged parents too if
    ``prune``. Anything still in use stays (the engine refuses, and that is fine)."""
    import docker.errors

    with contextlib.suppress(docker.errors.DockerException):
        image = client.images.get(image_id)
        if not image.tags:
            client.images.remove(image.id, noprune=not prune)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_FAILED = re.compile(r"^The command .* returned a non-zero code: (\d+)$", re.DOTALL)
_STEP = re.compile(r"^Step (\d+/\d+) : ")


def _build_failure(error: str, tail: list[str]) -> str:
    """' at step N/M (exit C): <what the step printed last>' from the build log: the failed
    command itself (the whole RUN line) says nothing a user can act on."""
    error = " ".join(error.split())
    step = next((m.group(1) for ln in reversed(tail) if (m := _STEP.match(ln))), None)
    where = f" at step {step}" if step else ""
    output = []
    for line in reversed(tail):
        if _STEP.match(line):
            break
        if not line.startswith(("--->", "Removing intermediate container")):
            output.append(line)
    said = next((ln for ln in output if ln.startswith("composemesh:")), None)
    said = said or next((ln for ln in output if "error" in ln.lower()), None)
    said = said or (output[0] if output else None)
    match = _RUN_FAILED.match(error)
    if match:
        return f"{where} (exit {match.group(1)}): {said or 'no output'}"
    return f"{where}: {error}" + (f" ({said})" if said and said not in error else "")


def _sweep_replaced(client: Any) -> None:
    """Removes mesh and demo images that a rebuild replaced (untagged, labelled by us) once
    no container uses them any more; those still in use stay until a later build."""
    import docker.errors

    with contextlib.suppress(docker.errors.DockerException):
        for image in client.images.list(filters={"dangling": True, "label": LABEL_IMAGE}):
            _remove_untagged(client, image.id, prune=True)


@dataclass
class _Plan:
    tag: str
    kind: str
    dockerfile: Path
    files: dict[str, Path]
    extra: dict[str, str]
    hash: str = ""

    def __post_init__(self) -> None:
        self.hash = content_hash(self.files, self.extra)


def _labels(plan: _Plan, base: str) -> dict[str, str]:
    return {
        LABEL_SOURCE_HASH: plan.hash,
        LABEL_IMAGE: plan.kind,
        LABEL_BASE_IMAGE: base,
        "org.opencontainers.image.title": plan.tag.split(":")[0],
        "org.opencontainers.image.version": __version__,
    }


_DEFAULT_REGISTRY_PREFIXES = ("docker.io/library/", "index.docker.io/library/", "library/")


def _same_image(reference: str, tag: str) -> bool:
    """True when a compose ``image:`` names ``tag`` (Docker Hub's implicit prefixes aside)."""
    reference = reference.strip()
    for prefix in _DEFAULT_REGISTRY_PREFIXES:
        if reference.startswith(prefix):
            reference = reference[len(prefix) :]
            break
    return reference == tag


def images_needed(model: Mapping[str, Any]) -> tuple[str, ...]:
    """The images of ours that a (meshed) compose model runs: MESH_IMAGE always (pilot,
    proxies, holders and gateways run it), DEMO_IMAGE only when a service names it. Pure."""
    services = model.get("services") or {}
    uses_demo = any(
        isinstance(svc, Mapping)
        and isinstance(svc.get("image"), str)
        and _same_image(svc["image"], DEMO_IMAGE)
        for svc in services.values()
    )
    return (MESH_IMAGE, DEMO_IMAGE) if uses_demo else (MESH_IMAGE,)


def ensure_images(
    client: Any,
    *,
    images: Iterable[str] = (MESH_IMAGE, DEMO_IMAGE),
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, str]:
    """Makes sure the engine has ``images`` (MESH_IMAGE and DEMO_IMAGE unless told fewer,
    see :func:`images_needed`) for the current sources.

    Returns ``{tag: image id}``. Builds only what changed (``force`` rebuilds them, without
    the engine's layer cache); with nothing changed it only hashes and inspects. Raises
    ImageBuildError naming the image and the reason.
    """
    wanted = set(images)
    unknown = wanted - {MESH_IMAGE, DEMO_IMAGE}
    if unknown:
        raise ValueError(f"not an image of composemesh: {', '.join(sorted(unknown))}")
    report = progress or _noop
    base = ensure_base_image(client, progress=report)
    base_id = str(client.images.get(base).id)
    tree = locate_sources()
    requirements = runtime_requirements(tree)
    lock = dependency_lock(requirements)
    result: dict[str, str] = {}

    if MESH_IMAGE in wanted:
        files, extra = mesh_inputs(tree, base_id=base_id, requirements=requirements, lock=lock)
        mesh = _Plan(MESH_IMAGE, "mesh", MESH_DOCKERFILE, files, extra)
        result[MESH_IMAGE] = _ensure_one(
            client, mesh, base, base_id, force, report,
            tree=tree, requirements=requirements, lock=lock,
        )  # fmt: skip
    if DEMO_IMAGE not in wanted:
        return result

    apps = tree.apps_dir
    if apps is None or not (apps / "demo.py").is_file():
        raise ImageBuildError(
            f"{DEMO_IMAGE}: a service runs the demo image, but the demo apps "
            "(examples/apps/demo.py) are not here: they come with the composemesh source tree, "
            "not with an installed wheel"
        )
    files, extra = demo_inputs(apps, base_id=base_id)
    demo = _Plan(DEMO_IMAGE, "demo", DEMO_DOCKERFILE, files, extra)
    result[DEMO_IMAGE] = _ensure_one(client, demo, base, base_id, force, report, apps=apps)
    return result


def _ensure_one(
    client: Any,
    plan: _Plan,
    base: str,
    base_id: str,
    force: bool,
    report: Progress,
    *,
    tree: SourceTree | None = None,
    requirements: list[str] | None = None,
    lock: list[str] | None = None,
    apps: Path | None = None,
) -> str:
    current = _current(client, plan.tag)
    if not force and current is not None and current[1] == plan.hash:
        report("cached", f"{plan.tag} is up to date ({current[0][7:19]})")
        return current[0]
    with _build_lock():
        current = _current(client, plan.tag)
        if not force and current is not None and current[1] == plan.hash:  # built meanwhile
            report("cached", f"{plan.tag} is up to date ({current[0][7:19]})")
            return current[0]
        started = time.monotonic()
        facts = probe_base(client, base, base_id)
        work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir()))
        try:
            context = work / "context"
            context.mkdir()
            if plan.kind == "mesh":
                assert tree is not None and requirements is not None and lock is not None
                deps = ensure_wheelhouse(requirements, lock, facts, report)
                (context / "deps").mkdir()
                for whl in deps.glob("*.whl"):
                    _link_or_copy(whl, context / "deps" / whl.name)
                (context / "deps" / "requirements.txt").write_text("\n".join(requirements) + "\n")
                build_composemesh_wheel(tree, context / "app", report, scratch=work)
                buildargs = {"PROXY_UID": str(PROXY_UID)}
            else:
                assert apps is not None
                shutil.copytree(
                    apps,
                    context / "apps",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*"),
                )
                buildargs = {}
            image_id = _docker_build(
                client,
                tag=plan.tag,
                context=context,
                dockerfile=plan.dockerfile,
                base=base,
                labels=_labels(plan, base),
                network=not facts.self_contained,
                nocache=force,
                report=report,
                buildargs=buildargs,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _sweep_replaced(client)
        if plan.kind == "mesh":
            _keep_build_cache(client)
        size = client.images.get(plan.tag).attrs.get("Size", 0)
        report(
            "built",
            f"{plan.tag} {image_id[7:19]} ({size / 1e6:.0f} MB) in "
            f"{time.monotonic() - started:.0f}s",
        )
        return image_id
