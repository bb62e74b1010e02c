"""The base image every composemesh image builds FROM, built offline when no registry answers.

The configured base (``python:3.11-slim-bookworm`` unless ``COMPOSEMESH_BASE_IMAGE`` says
otherwise) is used when the engine has it or can pull it. Where it cannot be pulled (no
registry, an air-gapped host), an equivalent Debian 12 base is built here with debootstrap
from the Debian mirror and imported as ``composemesh-base:bookworm``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from composemesh.engine.process import stream_lines
from composemesh.engine.progress import Progress, no_progress
from composemesh.errors import ImageBuildError

DEFAULT_BASE_IMAGE = "python:3.11-slim-bookworm"
BASE_IMAGE_ENV = "COMPOSEMESH_BASE_IMAGE"
MIRROR_ENV = "COMPOSEMESH_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

FALLBACK_REPOSITORY = "composemesh-base"
FALLBACK_TAG = "bookworm"
FALLBACK_IMAGE = f"{FALLBACK_REPOSITORY}:{FALLBACK_TAG}"
LABEL_BASE = "composemesh.base"
SUITE = "bookworm"

# What the proxy and the apps need: a Python with venv, iptables (nf_tables) for the capture
# rules, CA certificates, and iproute2 for `ip` when debugging a namespace.
PACKAGES = ("python3", "python3-venv", "iptables", "ca-certificates", "iproute2")

# The registry has this long to answer before the pull counts as failed. Once it answers
# (a layer is being fetched) the pull goes on as long as bytes keep coming.
PULL_ANSWER_TIMEOUT = 12.0
PULL_STALL_TIMEOUT = 60.0
_PULL_ANSWERED = ("Pulling fs layer", "Downloading", "Already exists", "Digest", "Status")

# Paths removed from the rootfs before import (relative to it). Copyright files stay.
_PRUNE_GLOBS = (
    "var/lib/apt/lists/*",
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/cache/apt/archives/partial/*",
    "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old",
    "var/log/*.log",
    "var/log/apt/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/groff/*",
    "usr/share/lintian/*",
    "usr/share/linda/*",
)

_DPKG_EXCLUDES = """\
# composemesh-base: keep the image small; later apt installs skip these too.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""

_APT_CLEAN = """\
// composemesh-base: no package cache and no recommends in the image.
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Install-Recommends "false";
Acquire::GzipIndexes "true";
Acquire::CompressionTypes::Order:: "gz";
"""

_IMPORT_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
    f"LABEL {LABEL_BASE}={SUITE}",
)


def configured_base_image(configured: str = DEFAULT_BASE_IMAGE) -> str:
    """The base image asked for: ``COMPOSEMESH_BASE_IMAGE`` when set, else ``configured``."""
    return os.environ.get(BASE_IMAGE_ENV, "").strip() or configured


def ensure_base_image(
    client: Any,
    configured: str = DEFAULT_BASE_IMAGE,
    progress: Progress | None = None,
) -> str:
    """The image reference to build FROM, making sure the engine has it.

    In order: the configured image if the engine has it; our own base if it exists already
    and the default base was asked for (no pull is tried again on every run); a pull of the
    configured image; our own base, built with debootstrap when missing.
    """
    report = progress or no_progress
    wanted = configured_base_image(configured)
    explicit = wanted != DEFAULT_BASE_IMAGE

    if wanted == FALLBACK_IMAGE:
        return _ensure_fallback(client, report)
    if _image_exists(client, wanted):
        report("base", f"using {wanted} (present)")
        return wanted
    if not explicit and _image_exists(client, FALLBACK_IMAGE):
        report("base", f"using {FALLBACK_IMAGE} ({wanted} is not present)")
        return FALLBACK_IMAGE

    report("base", f"pulling {wanted}")
    reason = pull_image(client, wanted, progress=report)
    if reason is None:
        report("base", f"using {wanted} (pulled)")
        return wanted
    report("base", f"cannot pull {wanted}: {reason}; using {FALLBACK_IMAGE} instead")
    return _ensure_fallback(client, report)


def _ensure_fallback(client: Any, report: Progress) -> str:
    if _image_exists(client, FALLBACK_IMAGE):
        report("base", f"using {FALLBACK_IMAGE} (present)")
        return FALLBACK_IMAGE
    build_fallback_base(client, progress=report)
    return FALLBACK_IMAGE


def _image_exists(client: Any, ref: str) -> bool:
    import docker.errors

    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.APIError as err:  # e.g. an invalid reference
        if getattr(err, "status_code", None) in (400, 404):
            return False
        raise
    return True


def _split_ref(ref: str) -> tuple[str, str]:
    if "@" in ref:
        repo, digest = ref.split("@", 1)
        return repo, digest
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


def pull_image(
    client: Any,
    ref: str,
    *,
    progress: Progress | None = None,
    answer_timeout: float = PULL_ANSWER_TIMEOUT,
    stall_timeout: float = PULL_STALL_TIMEOUT,
) -> str | None:
    """Pulls ``ref``; None when it worked, else why not (one line).

    Bounded: the registry has ``answer_timeout`` seconds to start sending the image, after
    which the pull may go on for as long as progress keeps coming (``stall_timeout``).

    The SDK's pull has no timeout of its own, so it runs in a thread that hands its events
    over (:func:`_pull_events`) and this one keeps the time. When the pull is given up, that
    thread closes the stream at its next event, which makes the engine abandon the pull; an
    engine that sends nothing more keeps the thread (a daemon) until it gives up itself.
    """
    report = progress or no_progress
    repo, tag = _split_ref(ref)
    events: queue.Queue[object] = queue.Queue()
    given_up = threading.Event()
    threading.Thread(
        target=_pull_events,
        args=(client, repo, tag, events, given_up),
        name=f"composemesh-pull-{ref}",
        daemon=True,
    ).start()
    try:
        reason = _follow_pull(events, ref, report, answer_timeout, stall_timeout)
    finally:
        given_up.set()
    if reason is not None:
        return reason
    return None if _image_exists(client, ref) else "the engine reported no image"


# What _pull_events hands over besides the engine's events (dicts) and an exception.
_HEADERS = object()  # the engine took the request (its answer's headers came)
_END = object()  # the stream ended


def _pull_events(
    client: Any, repo: str, tag: str, events: queue.Queue[object], given_up: threading.Event
) -> None:
    """Runs the pull (in its own thread) and puts what happens into ``events``."""
    try:
        stream = client.api.pull(repo, tag=tag, stream=True, decode=True)
        events.put(_HEADERS)
        try:
            for event in stream:
                if given_up.is_set():
                    break
                events.put(event)
        finally:
            stream.close()  # the connection goes with it: the engine abandons the pull
    except Exception as err:  # every error goes to the waiting thread, which words it
        events.put(err)
    finally:
        events.put(_END)


def _follow_pull(
    events: queue.Queue[object],
    ref: str,
    report: Progress,
    answer_timeout: float,
    stall_timeout: float,
) -> str | None:
    """Waits on the pull's ``events`` with the answer and stall deadlines; None when the
    stream ended without an error, else why the pull failed."""
    answer_by = time.monotonic() + answer_timeout
    headers = answered = False
    while True:
        wait = stall_timeout if answered else max(0.0, answer_by - time.monotonic())
        try:
            item = events.get(timeout=wait)
        except queue.Empty:
            if answered:
                return f"pull stalled for {stall_timeout:.0f}s (ReadTimeout)"
            if headers:
                return f"registry did not answer within {answer_timeout:.0f}s"
            return f"no answer within {answer_timeout:.0f}s (ReadTimeout)"
        if item is _END:
            return None
        if item is _HEADERS:
            headers = True
            continue
        if isinstance(item, BaseException):
            return _pull_failure(
                item,
                headers=headers,
                answered=answered,
                answer_timeout=answer_timeout,
                stall_timeout=stall_timeout,
            )
        if not isinstance(item, dict):
            continue
        if "error" in item:
            return _one_line(str(item.get("error")))
        status = str(item.get("status", ""))
        if not answered and status.startswith(_PULL_ANSWERED):
            answered = True
        if status and not item.get("progressDetail"):
            report("base", f"pull {ref}: {status}")


def _pull_failure(
    err: BaseException,
    *,
    headers: bool,
    answered: bool,
    answer_timeout: float,
    stall_timeout: float,
) -> str:
    """Why a pull failed, from the exception of the pulling thread. Pure."""
    import docker.errors

    if isinstance(err, docker.errors.APIError):  # the engine refused (an unknown image, ...)
        return _one_line(str(err.explanation or err))
    if not headers:
        return f"no answer within {answer_timeout:.0f}s ({type(err).__name__})"
    if not answered:
        return f"registry did not answer within {answer_timeout:.0f}s"
    return f"pull stalled for {stall_timeout:.0f}s ({type(err).__name__})"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- the debootstrap fallback -------------------------------------------------------------


# debootstrap lives in /usr/sbin, which a non-login shell's PATH may lack.
SBIN_DIRS = ("/usr/sbin", "/sbin")


def find_debootstrap() -> str | None:
    """The debootstrap executable, or None."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    return shutil.which("debootstrap", path=path)


def build_fallback_base(
    client: Any,
    *,
    progress: Progress | None = None,
    mirror: str | None = None,
    tmp_root: str = "/var/tmp",
    tag: str = FALLBACK_IMAGE,
) -> str:
    """Builds ``composemesh-base:bookworm`` (or ``tag``) with debootstrap and imports it.

    Returns the image id. The rootfs is built in a temporary directory under ``tmp_root``
    that is removed whatever happens.
    """
    report = progress or no_progress
    debootstrap = find_debootstrap()
    if debootstrap is None:
        raise ImageBuildError(
            f"{tag}: debootstrap is not installed, and the base image cannot be pulled; "
            "install it (apt-get install debootstrap, or scripts/bootstrap.sh) or make a base "
            f"image available and set {BASE_IMAGE_ENV}"
        )
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"{tag}: building the base image with debootstrap needs root; run composemesh as "
            f"root once, or make a base image available and set {BASE_IMAGE_ENV}"
        )
    mirror = mirror or os.environ.get(MIRROR_ENV, "").strip() or DEFAULT_MIRROR
    started = time.monotonic()
    rootfs = Path(tempfile.mkdtemp(prefix="composemesh-rootfs-", dir=tmp_root))
    try:
        cmd = [
            debootstrap,
            "--variant=minbase",
            "--include=" + ",".join(PACKAGES),
            SUITE,
            str(rootfs),
            mirror,
        ]
        report("base", f"debootstrap {SUITE} from {mirror} (about a minute)")
        _run_streaming(cmd, report, what="debootstrap", tag=tag)
        removed = slim_rootfs(rootfs, mirror=mirror)
        report("base", f"rootfs slimmed: {removed / 1e6:.0f} MB removed")
        report("base", f"importing {tag}")
        image_id = _import_rootfs(client, rootfs, tag)
    finally:
        remove_tree(rootfs)
    size = client.images.get(tag).attrs.get("Size", 0)
    report("base", f"built {tag} in {time.monotonic() - started:.0f}s ({size / 1e6:.0f} MB)")
    return image_id


def _run_streaming(cmd: list[str], report: Progress, *, what: str, tag: str) -> None:
    code, tail = stream_lines(
        cmd,
        lambda line: report("base", f"{what}: {line}"),
        env={"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"},
        keep=10,
    )
    if code == 127 and len(tail) == 1 and tail[0].startswith("cannot run"):
        raise ImageBuildError(f"{tag}: {tail[0]}")
    if code != 0:
        last = next((ln for ln in reversed(tail) if ln.startswith("E:")), tail[-1] if tail else "")
        raise ImageBuildError(f"{tag}: {what} failed (exit {code}): {last or 'no output'}")


def slim_rootfs(rootfs: Path, *, mirror: str = DEFAULT_MIRROR) -> int:
    """Removes caches, docs, man pages, locales and bytecode; returns the bytes removed.

    The standard library keeps its bytecode (see _is_stdlib); copyright files stay.
    """
    removed = 0

    def drop(path: Path) -> None:
        nonlocal removed
        if path.is_symlink() or path.is_file():
            removed += path.lstat().st_size
            path.unlink()
        elif path.is_dir():
            removed += _tree_size(path)
            shutil.rmtree(path)

    for pattern in _PRUNE_GLOBS:
        for path in rootfs.glob(pattern):
            drop(path)
    doc = rootfs / "usr/share/doc"
    if doc.is_dir():
        for path in doc.rglob("*"):
            if path.is_file() and path.name != "copyright":
                drop(path)
    locale = rootfs / "usr/share/locale"
    if locale.is_dir():
        for path in locale.iterdir():
            if path.name != "locale.alias":
                drop(path)
    for cache in sorted(rootfs.glob("usr/**/__pycache__"), reverse=True):
        if cache.is_dir() and not cache.is_symlink() and not _is_stdlib(cache.relative_to(rootfs)):
            drop(cache)
    # Empty doc directories left after the prune.
    if doc.is_dir():
        for path in sorted(doc.rglob("*"), reverse=True):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    # Files the engine provides at run time; the build host's must not leak in.
    for name in ("etc/resolv.conf", "etc/hostname", "etc/machine-id"):
        path = rootfs / name
        if path.is_file() and not path.is_symlink():
            path.write_text("")
    (rootfs / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/dpkg/dpkg.cfg.d/composemesh-slim").write_text(_DPKG_EXCLUDES)
    (rootfs / "etc/apt/apt.conf.d").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/apt/apt.conf.d/docker-clean").write_text(_APT_CLEAN)
    debian = mirror.rstrip("/")
    security = debian.rsplit("/", 1)[0] + "/debian-security" if debian.endswith("/debian") else ""
    sources = [f"deb {debian} {SUITE} main", f"deb {debian} {SUITE}-updates main"]
    if security:
        sources.append(f"deb {security} {SUITE}-security main")
    (rootfs / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    return removed


def _is_stdlib(rel: Path) -> bool:
    """True for a path in the standard library (its bytecode stays, see slim_rootfs).

    Without it every `python3` start recompiles what it imports from the standard library:
    about 0.2 s more per start of a proxy or a demo health check, for about 12 MB saved.
    """
    parts = rel.parts
    return (
        len(parts) > 3
        and parts[:2] == ("usr", "lib")
        and parts[2].startswith("python3.")
        and "dist-packages" not in parts
        and "site-packages" not in parts
    )


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _import_rootfs(client: Any, rootfs: Path, tag: str) -> str:
    import docker.errors

    tar = subprocess.Popen(
        ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", "-", "."],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tar.stdout is not None
    try:
        repository, version = _split_ref(tag)
        result = client.api.import_image(
            src=tar.stdout,
            repository=repository,
            tag=version,
            changes=list(_IMPORT_CHANGES),
            stream_src=True,
        )
    except docker.errors.APIError as err:
        tar.kill()
        tar.wait()
        raise ImageBuildError(f"{tag}: docker import failed: {err}") from err
    finally:
        tar.stdout.close()
    _, err_out = tar.communicate()
    if tar.returncode != 0:
        reason = _one_line(err_out.decode(errors="replace"))
        raise ImageBuildError(f"{tag}: tar of the rootfs failed: {reason}")
    text = result if isinstance(result, str) else str(result)
    if '"error"' in text:
        raise ImageBuildError(f"{tag}: docker import failed: {_one_line(text)}")
    return str(client.images.get(tag).id)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            for line in fh:
                mount_point = line.split()[4].replace("\\040", " ")
                if mount_point == prefix or mount_point.startswith(prefix + "/"):
                    found.append(mount_point)
    except OSError:
        pass
    return found


def remove_tree(path: Path) -> None:
    """Removes a rootfs, first unmounting what a failed debootstrap may have left mounted.

    Refuses to delete through a mount that will not come off (that could be the host's /proc).
    """
    if not path.exists():
        return
    for mount_point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mount_point], check=False, capture_output=True)
    left = _mounts_under(path)
    if left:
        raise ImageBuildError(
            f"{FALLBACK_IMAGE}: cannot remove {path}: still mounted: {', '.join(left)}"
        )
    shutil.rmtree(path, ignore_errors=True)
