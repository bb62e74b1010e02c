"""A project's CA volume, for `composemesh certs import`: a root written where the pilot's CA
finds it as its stored root, before the pilot's first start.

The injector mounts the project's state volume ``<project>_composemesh-pilot-state``
(``inject.templates.PILOT_VOLUME``) at ``/var/lib/composemesh`` in the pilot; the CA keeps its
root there under ``ca/`` (``pilot.ca_service``: ``root.pem`` 0644, ``root-key.pem`` 0600, in
a 0700 directory; ``roots.json`` once a rotation has run). With no ``mtls.root`` of the user's,
``CAService.load_or_create`` loads what it finds there as the ``stored`` root and creates a
new one only when there is none.

``import_root`` (the host side) refuses while the project's pilot runs (it holds the root it
loaded: `composemesh down` first, or `certs rotate-root`), creates the volume when there is
none yet with the labels `docker compose` gives its own volumes (so that `up` takes it as the
project's and `down -v` removes it), and writes the files through a short-lived container of
the mesh image: no network, every capability dropped but the few that writing files as their
owner takes, a read-only root filesystem, the PEMs on its stdin (never in its command line,
environment or logs). That container runs this very file (``python3 -c``, so the
image's own composemesh, whatever its version, plays no part) as ``place_root``: it refuses
a volume that holds another root (`composemesh down -v` drops it, with every identity it
signed), does nothing when it holds the same one, and else writes the key, then the
certificate, each from its first byte with its final mode and owner, renamed into place.

This file imports the standard library only at its top: it is also the container's program.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import sys
from dataclasses import dataclass
from typing import Any

STATE_DIR = "/var/lib/composemesh"  # where the injector mounts the state volume in the pilot
CA_DIR = "ca"  # pilot.ca_service.CA_DIR, and the file names below are its own
ROOT_CERT = "root.pem"
ROOT_KEY = "root-key.pem"
ROOTS = "roots.json"
DIR_MODE = 0o700
KEY_MODE = 0o600
PUBLIC_MODE = 0o644
RUN_TIMEOUT_S = 120.0
# what writing the files as the owner of the volume's root directory takes, nothing more
WRITER_CAPS = ("CHOWN", "DAC_OVERRIDE", "FOWNER")
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_VOLUME = "com.docker.compose.volume"
COMPOSE_VERSION = "com.docker.compose.version"


# --------------------------------------------------------------------------- in the container


def _der(pem: str) -> bytes:
    """The DER of the first certificate of ``pem`` (ValueError if there is none)."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = pem.index(begin)
    stop = pem.index(end, start) + len(end)
    return ssl.PEM_cert_to_DER_cert(pem[start:stop])


def held_root(ca_dir: str) -> tuple[str | None, bool]:
    """The certificate (PEM) of the root that signs in ``ca_dir`` (None: no root there), and
    whether no rotation is under way. A manifest (``roots.json``) that cannot be read, or a
    root it names that is not there, counts as a root of an unreadable certificate ("")."""
    manifest = os.path.join(ca_dir, ROOTS)
    stem, steady = "root", True
    if os.path.exists(manifest):
        try:
            with open(manifest) as f:
                data = json.load(f)
            stem, phase = str(data["active"]), str(data["phase"])
        except (OSError, ValueError, TypeError, KeyError):
            return "", False
        if not stem or "/" in stem or stem.startswith("."):
            return "", False
        steady = phase == "steady" and not data.get("incoming")
    cert_path = os.path.join(ca_dir, f"{stem}.pem")
    if not os.path.exists(cert_path):
        return (None, True) if not os.path.exists(manifest) else ("", False)
    try:
        with open(cert_path) as f:
            return f.read(), steady
    except OSError:
        return "", False


def _write(path: str, data: bytes, mode: int, owner: tuple[int, int]) -> None:
    """``path`` replaced at once by ``data``: a sibling file made with ``mode`` (never more
    open than that, even for an instant), owned by ``owner``, synced, renamed over."""
    tmp = f"{path}.import.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away
        _chown(fd, owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _chown(fd: int, owner: tuple[int, int]) -> None:
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != owner:
        os.fchown(fd, *owner)


def place_root(state_dir: str, cert_pem: str, key_pem: str) -> dict[str, Any]:
    """Put the root ``cert_pem``/``key_pem`` in ``state_dir``/ca unless another is there.

    ``{"result": "written"}``, ``{"result": "same"}`` (that root is there already: nothing
    written but a missing key), or ``{"result": "different", "cert_pem": <the one there>}``
    (nothing written). Files and directory get the owner of ``state_dir`` (the volume's
    root, the pilot's), the key 0600, the certificate 0644, the directory 0700.
    """
    ca_dir = os.path.join(state_dir, CA_DIR)
    new = _der(cert_pem)
    held, steady = held_root(ca_dir) if os.path.isdir(ca_dir) else (None, True)
    if held is not None:
        try:
            same = _der(held) == new
        except ValueError:
            same = False
        if not (same and steady):
            return {"result": "different", "cert_pem": held}
    top = os.stat(state_dir)
    owner = (top.st_uid, top.st_gid)
    if not os.path.isdir(ca_dir):
        os.mkdir(ca_dir, DIR_MODE)
    dir_fd = os.open(ca_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(dir_fd, DIR_MODE)
        _chown(dir_fd, owner)
    finally:
        os.close(dir_fd)
    key_path = os.path.join(ca_dir, ROOT_KEY)
    if held is not None:
        manifest = os.path.exists(os.path.join(ca_dir, ROOTS))
        if not manifest and not os.path.exists(key_path):  # its key lost: put it back
            _write(key_path, key_pem.encode(), KEY_MODE, owner)
        return {"result": "same"}
    _write(key_path, key_pem.encode(), KEY_MODE, owner)  # a certificate never stands alone
    _write(os.path.join(ca_dir, ROOT_CERT), cert_pem.encode(), PUBLIC_MODE, owner)
    return {"result": "written"}


def main() -> int:
    """The container's program: ``{"cert_pem", "key_pem"}`` on stdin, the answer of
    ``place_root`` as one JSON line on stdout; exit 1 with the reason on stderr."""
    try:
        given = json.loads(sys.stdin.read())
        answer = place_root(STATE_DIR, str(given["cert_pem"]), str(given["key_pem"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


# --------------------------------------------------------------------------- on the host


class VolumeRefused(Exception):  # noqa: N818 (a refusal, said as such)
    """The import is refused; the message is the one sentence saying why and what to do."""


@dataclass(frozen=True)
class Imported:
    """What ``import_root`` did: ``written`` or ``same``, in ``volume`` (``created`` now)."""

    result: str
    volume: str
    created: bool


def volume_name(project: str) -> str:
    """The name `docker compose` gives the project's state volume, which holds the CA's."""
    from composemesh.inject.templates import PILOT_VOLUME

    return f"{project}_{PILOT_VOLUME}"


def _docker(*args: str, stdin: str | None = None,
            timeout: float = 60.0) -> tuple[int, str, str]:
    import subprocess

    from composemesh.engine.compose import require_compose

    require_compose()
    proc = subprocess.run(["docker", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, check=False)
    return proc.returncode, proc.stdout, proc.stderr.strip()


def pilot_running(project: str) -> bool:
    """Whether a pilot container of ``project`` runs (it holds the root it loaded)."""
    from composemesh.engine import docker_host
    from composemesh.model.wellknown import LABEL_ROLE, ROLE_PILOT

    return bool(docker_host.project_containers(project, labels={LABEL_ROLE: ROLE_PILOT}))


def compose_labels(project: str) -> dict[str, str]:
    """The labels `docker compose` puts on the project's state volume when it creates it
    (its ``config-hash`` left out: compose compares it only where it is present)."""
    from composemesh.inject.templates import PILOT_VOLUME

    labels = {COMPOSE_PROJECT: project, COMPOSE_VOLUME: PILOT_VOLUME}
    with contextlib.suppress(OSError, TimeoutError):
        code, out, _ = _docker("compose", "version", "--short", timeout=20)
        if code == 0 and out.strip():
            labels[COMPOSE_VERSION] = out.strip().lstrip("v")
    return labels


def ensure_volume(project: str) -> tuple[str, bool]:
    """The project's state volume, created (as compose would) when missing; and whether it
    was created now. VolumeRefused when the engine will not say or make it."""
    name = volume_name(project)
    code, _, said = _docker("volume", "inspect", name)
    if code == 0:
        return name, False
    if "no such volume" not in said.lower():
        raise VolumeRefused(f"the Docker engine cannot inspect volume {name}: {said}")
    labels = [arg for k, v in compose_labels(project).items() for arg in ("--label", f"{k}={v}")]
    code, _, said = _docker("volume", "create", "--driver", "local", *labels, name)
    if code != 0:
        raise VolumeRefused(f"the Docker engine cannot create volume {name}: {said}")
    return name, True


def writer_command(volume: str, image: str, container: str) -> list[str]:
    """The `docker run` arguments of the container that writes the root into ``volume``."""
    caps = [arg for cap in WRITER_CAPS for arg in ("--cap-add", cap)]
    return ["run", "--rm", "-i", "--name", container, "--pull", "never",
            "--network", "none", "--user", "0:0", "--cap-drop", "ALL", *caps,
            "--security-opt", "no-new-privileges", "--read-only", "--log-driver", "none",
            "--mount", f"type=volume,source={volume},target={STATE_DIR}",
            "--entrypoint", "python3", image, "-c", _own_source()]


def _own_source() -> str:
    with open(__file__, encoding="utf-8") as f:
        return f.read()


def run_writer(volume: str, cert_pem: str, key_pem: str, image: str,
               timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """``place_root`` run in a short-lived container of ``image`` on ``volume``; its answer.
    VolumeRefused when the container cannot run or fails; it is removed either way."""
    import subprocess
    import uuid

    container = f"composemesh-ca-import-{uuid.uuid4().hex[:10]}"
    body = json.dumps({"cert_pem": cert_pem, "key_pem": key_pem})
    try:
        code, out, said = _docker(*writer_command(volume, image, container), stdin=body,
                                  timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VolumeRefused(f"the container writing the root into {volume} did not end "
                            f"within {timeout:g}s") from None
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["docker", "rm", "-f", container], capture_output=True,
                           timeout=30, check=False)
    line = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        answer = json.loads(line) if code == 0 else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "result" not in answer:
        raise VolumeRefused(f"the root could not be written into volume {volume}: "
                            f"{said or line or f'exit {code}'}")
    return answer


def import_root(project: str, cert_pem: str, key_pem: str, image: str | None = None,
                timeout: float = RUN_TIMEOUT_S) -> Imported:
    """Make ``project`` start with the root ``cert_pem``/``key_pem`` (checked by the caller:
    a CA, in date, the key its own) as its CA's stored root. VolumeRefused saying why not:
    its pilot runs, its volume holds another root, the engine cannot do it."""
    from composemesh.model.wellknown import MESH_IMAGE

    if pilot_running(project):
        raise VolumeRefused(
            f"the pilot of {project} is running with the root it loaded: run `composemesh "
            "down` first (without -v, which would drop the identities), or change the root "
            "live with `composemesh certs rotate-root`")
    volume, created = ensure_volume(project)
    answer = run_writer(volume, cert_pem, key_pem, image or MESH_IMAGE, timeout)
    if answer["result"] == "different":
        raise VolumeRefused(
            f"the CA volume {volume} of {project} already holds another root"
            f"{_fingerprint_said(str(answer.get('cert_pem', '')))}: `composemesh down -v` "
            "drops it, and with it every identity it signed; then import again")
    return Imported(str(answer["result"]), volume, created)


def _fingerprint_said(cert_pem: str) -> str:
    from composemesh.ca import cert_from_pem, fingerprint

    try:
        return f" ({fingerprint(cert_from_pem(cert_pem))})"
    except ValueError:
        return " (its files unreadable)"


if __name__ == "__main__":
    sys.exit(main())
