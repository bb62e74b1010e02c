"""The wheelhouse of the mesh image: binary wheels of composemesh's dependencies for the
base image's Python and platform, downloaded (or built) on the host and cached on disk by
dependency set, so that the image build itself needs no network.

What the base offers is learnt once by running it with no network (:func:`probe_base`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composemesh.engine.progress import Progress
from composemesh.engine.sources import cache_dir
from composemesh.engine.wheel import last_error, run_pip
from composemesh.errors import ImageBuildError
from composemesh.model.wellknown import MESH_IMAGE

__all__ = ["BaseFacts", "ensure_wheelhouse", "probe_base", "wheel_platforms"]


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
        code, tail = run_pip(args, report, "wheelhouse")
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
            code, tail = run_pip(args, report, "wheelhouse")
        if code != 0:
            raise ImageBuildError(
                f"{MESH_IMAGE}: cannot get the dependency wheels for "
                f"cp{facts.python.replace('.', '')} {facts.machine}: {last_error(tail)}"
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
