"""The mesh, demo and Prometheus images: built offline, skipped when nothing changed.

``ensure_images(client, images=...)`` makes sure the engine has ``MESH_IMAGE`` (pilot, proxy
and gateway; the role is the command) and, where a service runs it (``images_needed``),
``DEMO_IMAGE`` (the stdlib-only demo apps of examples/apps/, only in a source tree).
and, where the monitoring add-on runs it, ``PROMETHEUS_IMAGE`` (Debian's ``prometheus``
package). All build FROM the base that :func:`ensure_base_image` provides, with no network in
the container build: the mesh image installs composemesh and its dependencies from a
wheelhouse that the host prepared (binary wheels for the image's Python and platform), the
Prometheus image the ``.deb`` files that the host's apt downloaded (``prometheus_image``).

Each image carries the label ``composemesh.source-hash``: a hash over everything that goes
into it (see :mod:`composemesh.engine.image_tags`). When the tagged image has the hash of the
current inputs, nothing runs.

This module orchestrates and runs the ``docker build``; the mechanisms have their own
modules: where the code is (``sources``), what is hashed (``image_tags``), the dependency set
(``requirements``), the dependency wheels (``wheelhouse``), the composemesh wheel (``wheel``),
what is kept and swept of old builds (``image_cache``). Their public names are re-exported
here, as before the split.

Progress is reported as ``progress(stage, detail)``, stages:

- ``base``: choosing, pulling or building the base image
- ``cached``: an image is up to date (detail starts with its tag)
- ``wheelhouse``: downloading the dependency wheels (cached on disk by dependency set)
- ``wheel``: building the composemesh wheel
- ``debs``: resolving and downloading the Prometheus image's Debian packages (cached on disk)
- ``build``: a line of the docker build log (detail starts with the tag)
- ``built``: an image was built (tag, id, size, seconds)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composemesh import __version__
from composemesh.engine.base_image import ensure_base_image
from composemesh.engine.image_cache import (
    BUILD_CACHE_IMAGE,
    LABEL_BUILD_CACHE,
    LABEL_IMAGE,
    keep_build_cache,
    sweep_replaced,
)
from composemesh.engine.image_tags import (
    DEMO_DOCKERFILE,
    HASH_SCHEME,
    LABEL_SOURCE_HASH,
    MESH_DOCKERFILE,
    content_hash,
    demo_inputs,
    mesh_inputs,
)
from composemesh.engine.progress import Progress, no_progress
from composemesh.engine.prometheus_image import (
    PROMETHEUS_DOCKERFILE,
    ensure_debs,
    prometheus_inputs,
)
from composemesh.engine.requirements import (
    dependency_lock,
    normalized_requirement,
    runtime_requirements,
)
from composemesh.engine.sources import PROJECT_FILES, SourceTree, cache_dir, locate_sources
from composemesh.engine.wheel import build_composemesh_wheel, last_error
from composemesh.engine.wheelhouse import (
    BaseFacts,
    ensure_wheelhouse,
    probe_base,
    wheel_platforms,
)
from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import DEMO_IMAGE, MESH_IMAGE, PROMETHEUS_IMAGE, PROXY_UID

__all__ = [
    "BUILD_CACHE_IMAGE",
    "HASH_SCHEME",
    "LABEL_BUILD_CACHE",
    "LABEL_IMAGE",
    "LABEL_SOURCE_HASH",
    "BaseFacts",
    "SourceTree",
    "build_composemesh_wheel",
    "cache_dir",
    "content_hash",
    "demo_inputs",
    "dependency_lock",
    "ensure_images",
    "ensure_wheelhouse",
    "images_needed",
    "locate_sources",
    "mesh_inputs",
    "normalized_requirement",
    "probe_base",
    "prometheus_inputs",
    "runtime_requirements",
    "wheel_platforms",
]

LABEL_BASE_IMAGE = "composemesh.base-image"
# The old private name, still read by tests/engine/test_images_e2e.py.
_PROJECT_FILES = PROJECT_FILES


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
    except (docker.errors.APIError, OSError) as err:
        # docker.errors does not wrap the transport's errors (refused, reset, timed out):
        # they are requests' exceptions, which are OSErrors.
        error = str(err)
    if error is not None:
        raise ImageBuildError(f"{tag}: docker build failed{_build_failure(error, tail)}")
    current = _current(client, tag)
    if current is None:
        raise ImageBuildError(f"{tag}: docker build ended without an image ({last_error(tail)})")
    return image_id or current[0]


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
    proxies, holders and gateways run it), DEMO_IMAGE and PROMETHEUS_IMAGE (the monitoring
    add-on's Prometheus service) only when a service names them. Pure."""
    services = model.get("services") or {}

    def used(tag: str) -> bool:
        return any(
            isinstance(svc, Mapping)
            and isinstance(svc.get("image"), str)
            and _same_image(svc["image"], tag)
            for svc in services.values()
        )

    return (MESH_IMAGE, *(tag for tag in (DEMO_IMAGE, PROMETHEUS_IMAGE) if used(tag)))


def ensure_images(
    client: Any,
    *,
    images: Iterable[str] = (MESH_IMAGE, DEMO_IMAGE),
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, str]:
    """Makes sure the engine has ``images`` (MESH_IMAGE and DEMO_IMAGE unless told others,
    see :func:`images_needed`; PROMETHEUS_IMAGE only when asked for) for the current sources.

    Returns ``{tag: image id}``. Builds only what changed (``force`` rebuilds them, without
    the engine's layer cache); with nothing changed it only hashes and inspects. Raises
    ImageBuildError naming the image and the reason.
    """
    wanted = set(images)
    unknown = wanted - {MESH_IMAGE, DEMO_IMAGE, PROMETHEUS_IMAGE}
    if unknown:
        raise ValueError(f"not an image of composemesh: {', '.join(sorted(unknown))}")
    report = progress or no_progress
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
    if DEMO_IMAGE in wanted:
        apps = tree.apps_dir
        if apps is None or not (apps / "demo.py").is_file():
            raise ImageBuildError(
                f"{DEMO_IMAGE}: a service runs the demo image, but the demo apps "
                "(examples/apps/demo.py) are not here: they come with the composemesh source "
                "tree, not with an installed wheel"
            )
        files, extra = demo_inputs(apps, base_id=base_id)
        demo = _Plan(DEMO_IMAGE, "demo", DEMO_DOCKERFILE, files, extra)
        result[DEMO_IMAGE] = _ensure_one(client, demo, base, base_id, force, report, apps=apps)
    if PROMETHEUS_IMAGE in wanted:
        debs = ensure_debs(client, base, base_id, report)
        files, extra = prometheus_inputs(debs, base_id=base_id)
        prometheus = _Plan(PROMETHEUS_IMAGE, "prometheus", PROMETHEUS_DOCKERFILE, files, extra)
        result[PROMETHEUS_IMAGE] = _ensure_one(
            client, prometheus, base, base_id, force, report, debs=debs
        )
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
    debs: Path | None = None,
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
            elif plan.kind == "prometheus":
                assert debs is not None
                (context / "debs").mkdir()
                for deb in debs.glob("*.deb"):
                    _link_or_copy(deb, context / "debs" / deb.name)
                buildargs = {}
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
                # the Prometheus image's dpkg never needs a network
                network=plan.kind != "prometheus" and not facts.self_contained,
                nocache=force,
                report=report,
                buildargs=buildargs,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        sweep_replaced(client)
        if plan.kind == "mesh":
            keep_build_cache(client)
        size = client.images.get(plan.tag).attrs.get("Size", 0)
        report(
            "built",
            f"{plan.tag} {image_id[7:19]} ({size / 1e6:.0f} MB) in "
            f"{time.monotonic() - started:.0f}s",
        )
        return image_id
