"""The inputs of the Prometheus image: Debian's ``prometheus`` package and the dependencies the
base image lacks, downloaded on the host with apt and cached on disk by base image.

No registry is needed: apt on the host (a Debian bookworm host, or one with bookworm's
sources) resolves the package against the base image's own dpkg status, as if it were
installing inside the base, and downloads exactly the ``.deb`` files that install would
fetch. The image build then installs them with dpkg and no network
(``dockerfiles/prometheus.Dockerfile``). The downloaded set is kept under
``cache_dir()/debs/`` keyed by the base image, so a second ``up`` downloads nothing; the
image's content hash covers the files themselves.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from composemesh.engine.process import stream_lines
from composemesh.engine.progress import Progress
from composemesh.engine.sources import cache_dir
from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import PROMETHEUS_IMAGE

__all__ = [
    "PACKAGE",
    "PROMETHEUS_DOCKERFILE",
    "ensure_debs",
    "install_plan",
    "prometheus_inputs",
]

PACKAGE = "prometheus"
PROMETHEUS_DOCKERFILE = Path(__file__).with_name("dockerfiles") / "prometheus.Dockerfile"
MANIFEST = "MANIFEST"  # one `name=version file` line per package of a complete download
# Bump when what is downloaded changes in a way the base id does not show.
DEBS_SCHEME = "1"

# `apt-get -s install` says `Inst <name> [<old>] (<version> <archives> [<arch>])` per package.
_INST = re.compile(r"^Inst (\S+) (?:\[[^\]]*\] )?\((\S+) ")
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
# Run as root, apt downloads as the `_apt` user unless told otherwise; the cache dir is ours.
_APT_OPTIONS = ("-q", "-o", "APT::Sandbox::User=root", "-o", "Debug::NoLocking=1")


def install_plan(simulation: Iterable[str]) -> list[tuple[str, str]]:
    """(package, version) of every ``Inst`` line of an ``apt-get -s install``, in order. Pure."""
    plan = []
    for line in simulation:
        match = _INST.match(line.strip())
        if match:
            plan.append((match.group(1), match.group(2)))
    return plan


def prometheus_inputs(debs: Path, *, base_id: str) -> tuple[dict[str, Path], dict[str, str]]:
    """The files and strings that make the Prometheus image: every ``.deb`` of ``debs`` (by
    name and content), the Dockerfile, the base image."""
    files = {f"debs/{p.name}": p for p in sorted(debs.glob("*.deb"))}
    files["dockerfile/prometheus"] = PROMETHEUS_DOCKERFILE
    return files, {"base": base_id, "debs-scheme": DEBS_SCHEME}


def ensure_debs(client: Any, base: str, base_id: str, report: Progress) -> Path:
    """The directory of the ``.deb`` files the Prometheus image installs over ``base``:
    from the cache when a complete download for this base is there, else resolved and
    downloaded now with the host's apt. ImageBuildError in one sentence when apt cannot."""
    root = cache_dir() / "debs"
    target = root / f"{PACKAGE}-{base_id.replace(':', '-')[:71]}"
    if _complete(target):
        report("debs", f"{PROMETHEUS_IMAGE}: Debian packages cached ({target})")
        return target
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debs-", dir=root))
    try:
        status = work / "status"
        status.write_bytes(_base_status(client, base))
        plan = _resolve(status, report)
        download = work / "debs"
        download.mkdir()
        report("debs", f"{PROMETHEUS_IMAGE}: downloading {', '.join(n for n, _ in plan)}")
        _apt(["apt-get", *_APT_OPTIONS, "download", *(f"{n}={v}" for n, v in plan)],
             report, cwd=download)
        files = {p.name for p in download.glob("*.deb")}
        lines = []
        for name, version in plan:
            found = _deb_file(files, name, version)
            if found is None:
                raise _cannot(f"apt-get download left no .deb of {name} {version}")
            lines.append(f"{name}={version} {found}")
        (download / MANIFEST).write_text("\n".join(lines) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(download, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _complete(directory: Path) -> bool:
    """True when ``directory`` holds a finished download: its manifest and every file in it."""
    try:
        lines = (directory / MANIFEST).read_text().split("\n")
    except OSError:
        return False
    names = [line.split(" ", 1)[1] for line in lines if " " in line]
    return bool(names) and all((directory / name).is_file() for name in names)


def _deb_file(files: set[str], name: str, version: str) -> str | None:
    """The file apt-get download wrote for ``name`` ``version`` (an epoch's colon is %3a)."""
    quoted = version.replace(":", "%3a")
    for candidate in (quoted, version.split(":", 1)[-1]):
        prefix = f"{name}_{candidate}_"
        for file in sorted(files):
            if file.startswith(prefix) and file.endswith(".deb"):
                return file
    return None


def _base_status(client: Any, base: str) -> bytes:
    """The base image's ``/var/lib/dpkg/status``, read by running it with no network."""
    import docker.errors

    try:
        out = client.containers.run(base, entrypoint=["cat"], command=["/var/lib/dpkg/status"],
                                    network_mode="none", remove=True, stdout=True, stderr=False,
                                    user="0")
    except docker.errors.DockerException as err:
        reason = getattr(err, "explanation", None) or err
        raise ImageBuildError(
            f"{PROMETHEUS_IMAGE}: cannot read the dpkg status of the base image {base} "
            f"(it must be Debian bookworm): {' '.join(str(reason).split())}"
        ) from err
    return out if isinstance(out, bytes) else str(out).encode()


def _resolve(status: Path, report: Progress) -> list[tuple[str, str]]:
    """What installing the package into the base would fetch, as apt decides it."""
    report("debs", f"{PROMETHEUS_IMAGE}: resolving Debian's {PACKAGE} package with apt")
    lines = _apt(["apt-get", *_APT_OPTIONS, "-o", f"Dir::State::status={status}", "-s",
                  "install", "--no-install-recommends", PACKAGE], report)
    plan = install_plan(lines)
    if not any(name == PACKAGE for name, _ in plan):
        raise _cannot(f"apt would not install {PACKAGE} ({_last(lines)})")
    return plan


def _apt(cmd: list[str], report: Progress, *, cwd: Path | None = None) -> list[str]:
    """Runs an apt command; its lines, or ImageBuildError saying why it failed."""
    if shutil.which(cmd[0]) is None:
        raise _cannot(f"{cmd[0]} is not installed on this host")
    if cwd is not None:  # apt-get download writes into its working directory
        cmd = ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(cwd), *cmd]
    code, lines = stream_lines(cmd, lambda line: report("debs", f"apt: {line}"), env=_APT_ENV)
    if code != 0:
        raise _cannot(_last(lines) or f"{cmd[0]} exited {code}")
    return lines


def _last(lines: list[str]) -> str:
    """The line that says why apt failed (its last ``E:``), else its last line."""
    errors = [line for line in lines if line.startswith("E:")]
    return (errors[-1] if errors else lines[-1] if lines else "").strip()


def _cannot(reason: str) -> ImageBuildError:
    return ImageBuildError(
        f"{PROMETHEUS_IMAGE}: apt on this host cannot get Debian's {PACKAGE} package and its "
        f"dependencies ({reason}); the image is built offline from them, so run "
        f"`apt-get update` with Debian bookworm's sources, or drop "
        f"x-composemesh.monitoring.prometheus"
    )
