"""The `composemesh` command: thin click commands over inject, engine, pilot and proxy."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from composemesh import __version__, cli_render
from composemesh.atomic_file import write_atomic
from composemesh.errors import ComposeError, EngineError, MeshError
from composemesh.model import wellknown as wk

if TYPE_CHECKING:
    from composemesh.engine.pilot_api import PilotClient

F = TypeVar("F", bound=Callable[..., Any])
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def handle_errors(fn: F) -> F:
    """Every error a user can cause ends as one sentence on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MeshError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def compose_options(fn: F) -> F:
    """-f, -p and --env-file, as docker compose has them; with no -f, compose finds the files
    (COMPOSE_FILE, else compose.yaml and compose.override.yaml, ...) as it does for `up`."""
    fn = click.option(
        "--env-file",
        "env_files",
        multiple=True,
        type=click.Path(dir_okay=False),
        help="An environment file for compose's variables (repeat: later ones win).",
    )(fn)
    fn = click.option(
        "-p",
        "--project-name",
        "project",
        default=None,
        envvar="COMPOSE_PROJECT_NAME",
        help="Project name (as docker compose: -p, COMPOSE_PROJECT_NAME, `name:`, directory).",
    )(fn)
    fn = click.option(
        "-f",
        "--file",
        "files",
        multiple=True,
        type=click.Path(dir_okay=False),
        help="Compose file; repeat to merge, as with docker compose.",
    )(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="composemesh")
def main() -> None:
    """A service mesh for Docker Compose: sidecars, mTLS, routing, metrics; no code changes."""


# --------------------------------------------------------------------------- user commands


def _prepare(files: Sequence[str], project: str | None, env_files: Sequence[str] = ()) -> Any:
    """Load, validate and inject: every user error surfaces here, before anything is written.
    Returns the project, the injection, the meshed text and the mesh settings."""
    from composemesh.ca import check_user_root
    from composemesh.inject import (
        compose_config_check,
        dump_yaml,
        inject,
        load_project,
        validate_project,
    )

    loaded = load_project(files, project, env_files=env_files)
    validated = validate_project(loaded)
    if validated.ca is not None:
        check_user_root(validated.ca)  # the user's own root: readable, a CA, in date, key fits
    result = inject(loaded.model, validated.labels, ca=validated.ca,
                    gateways=validated.gateways)
    text = dump_yaml(result.model)
    compose_config_check(text, loaded.project_dir)
    return loaded, result, text, validated.settings


@main.command("inject")
@compose_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here, not stdout.")
@handle_errors
def inject_cmd(
    files: tuple[str, ...], project: str | None, env_files: tuple[str, ...], output: str | None
) -> None:
    """Write the meshed compose file (idempotent: a meshed file comes back unchanged).

    It is compose's resolved model, as `docker compose config` prints it: variables in,
    paths absolute, so it means the same wherever it is written or read."""
    _, result, text, _ = _prepare(files, project, env_files)
    _print_warnings(result)
    if output:
        write_atomic(Path(output), text, MESHED_FILE_MODE)
        err.print(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@main.command()
@compose_options
@handle_errors
def check(files: tuple[str, ...], project: str | None, env_files: tuple[str, ...]) -> None:
    """Validate labels and x-composemesh: and show what `up` would add."""
    from composemesh.inject import render_plan

    loaded, result, _, _ = _prepare(files, project, env_files)
    out.print(render_plan(result))
    _print_warnings(result)
    out.print(f"[green]ok[/]: {', '.join(loaded.files)} (project {loaded.name})")


@main.command()
@compose_options
@click.option("--timeout", default=300, show_default=True, help="Seconds to wait for readiness.")
@handle_errors
def up(files: tuple[str, ...], project: str | None, env_files: tuple[str, ...],
       timeout: int) -> None:
    """Inject, build images offline if needed, start, and wait until every proxy is ready."""
    from composemesh.engine import compose

    loaded, result, text, settings = _prepare(files, project, env_files)
    _print_warnings(result)
    _look_at_consul(settings.consul, loaded)
    started = time.monotonic()
    with _progress() as progress:
        _ensure_images(progress, result.model)
        grafana_off = _grafana_left_out(progress, result)
        meshed = compose.state_dir(loaded.name) / "compose.yaml"
        write_atomic(meshed, text, MESHED_FILE_MODE)
        proj = _project(loaded.name, Path(loaded.project_dir), meshed)
        before = compose.running_containers(loaded.name)
        _build_user_images(progress, proj, result.model)
        task = progress.add_task("containers: starting", total=None)
        code, lines = compose.run(
            proj,
            [*_profiles(result, grafana_off), "up", "-d", "--wait", "--remove-orphans"],
            on_line=lambda line: progress.update(
                task, description=f"containers: {escape(line[:90])}"
            ),
        )
        if code != 0:
            reason = compose.failure_reason(lines)
            progress.update(task, description=f"[red]containers: failed: {escape(reason)}")
            progress.stop()
            _show_logs_of_failed(reason)
            if not before:
                err.print("removing what this `up` started ...")
                compose.run(proj, [*ALL_PROFILES, "down", "--remove-orphans", "--timeout", "3"])
            raise ComposeError(f"docker compose up failed: {reason}")
        progress.update(task, description="containers: running and healthy", total=1, completed=1)
        status = _wait_ready(progress, _pilot(loaded.name),
                             timeout - (time.monotonic() - started))
    _print_status(status)
    _print_endpoints(loaded.name, result)
    if result.ingress is not None:
        out.print(cli_render.ingress_table(result.ingress))
    _print_monitoring(result, grafana_off)
    out.print(f"[green]mesh {loaded.name} ready[/] in {time.monotonic() - started:.1f}s")


@main.command()
@compose_options
@click.option("-v", "--volumes", is_flag=True, help="Also remove volumes (the CA's too).")
@handle_errors
def down(files: tuple[str, ...], project: str | None, env_files: tuple[str, ...],
         volumes: bool) -> None:
    """Stop and remove everything `up` made."""
    from composemesh.engine import compose

    meshed = None
    project_dir = Path.cwd()
    try:
        loaded, _, text, _ = _prepare(files, project, env_files)
    except ComposeError:
        if files or not project:
            raise
        loaded = None  # -p alone, and no project compose can read here: down by name
    if loaded is not None:
        project = loaded.name
        project_dir = Path(loaded.project_dir)
        meshed = compose.state_dir(project) / "compose.yaml"
        write_atomic(meshed, text, MESHED_FILE_MODE)
    if not project:
        raise ComposeError("no compose file and no -p: which project?")
    proj = _project(project, project_dir, meshed)
    # every profile: Grafana's (GRAFANA_PROFILE) goes too when `up` started it
    args = [*(ALL_PROFILES if meshed else []), "down", "--remove-orphans"] + (
        ["--volumes"] if volumes else [])
    with _progress() as progress:
        task = progress.add_task("stopping", total=None)
        code, lines = compose.run(
            proj, args, on_line=lambda line: progress.update(task, description=escape(line[:90]))
        )
    if code != 0:
        raise ComposeError(f"docker compose down failed: {compose.failure_reason(lines)}")
    left = compose.running_containers(project)
    if left:
        raise EngineError(f"containers of {project} still there after down: {', '.join(left)}")
    out.print(f"[green]mesh {project} removed[/]")


@main.command()
@click.option("-p", "--project-name", "project", envvar="COMPOSE_PROJECT_NAME", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the pilot's status as JSON.")
@handle_errors
def status(project: str | None, as_json: bool) -> None:
    """Per service and version: instances, proxy ready, config in sync, certificate expiry."""
    data = _pilot(project or _project_from_cwd()).status()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    _print_status(data)


@main.command()
@click.option("-p", "--project-name", "project", envvar="COMPOSE_PROJECT_NAME", default=None)
@click.option("-n", "--interval", type=float, default=2.0, show_default=True,
              help="Seconds between updates.")
@click.option("--once", is_flag=True, help="Print one table (two scrapes apart) and exit.")
@handle_errors
def top(project: str | None, interval: float, once: bool) -> None:
    """Live traffic from the proxies' metrics: per service and version the request rate,
    success rate, p50 and p99, and per caller."""
    from composemesh.cli_top import run_top

    run_top(project or _project_from_cwd(), interval=interval, once=once)


@main.command()
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), required=True,
              help="The directory to write the dashboards' Grafana JSON into.")
@handle_errors
def dashboards(output: str) -> None:
    """Write the traffic and control-plane dashboards as Grafana JSON, for your own Grafana."""
    from composemesh.dashboards import write_dashboards

    for path in write_dashboards(Path(output)):
        err.print(f"wrote {path}")


@main.group(invoke_without_command=True)
@click.option("-p", "--project-name", "project", envvar="COMPOSE_PROJECT_NAME", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the CA and identities as JSON.")
@click.pass_context
@handle_errors
def certs(ctx: click.Context, project: str | None, as_json: bool) -> None:
    """The mesh's root CA and trust bundle, and each proxy's identity and certificate expiry."""
    if ctx.invoked_subcommand is not None:
        return
    pilot = _pilot(project or _project_from_cwd())
    ca = pilot.ca()
    data = pilot.status()
    if as_json:
        ca = {k: v for k, v in ca.items() if k != "trust_bundle_pem"}
        click.echo(json.dumps({"ca": ca, "proxies": data.get("proxies", [])}, indent=2))
        return
    _print_certs(ca, data)


@certs.command("rotate-root")
@compose_options
@click.option("--timeout", default=120, show_default=True,
              help="Seconds each step may take to reach every proxy.")
@handle_errors
def rotate_root(files: tuple[str, ...], project: str | None, env_files: tuple[str, ...],
                timeout: int) -> None:
    """Replace the mesh's root CA live: trust the new root everywhere, sign with it, renew
    every certificate, then drop the old root. Run it again to go on after a timeout."""
    from composemesh.engine.rotation import rotation_plan, rotation_roots

    project = project if project and not files else _project_name(files, project, env_files)
    started = time.monotonic()
    pilot = _pilot(project)
    info = pilot.ca()
    if info.get("source") == "user":
        raise MeshError(
            "the mesh's root is your own (x-composemesh.mtls.root); replace its files and "
            "recreate the pilot to change it"
        )
    old_fp, new_fp = rotation_roots(info)
    with _progress() as progress:
        for step, take in rotation_plan(str(info.get("rotation_phase", "steady"))):
            generation = 0
            if take:
                answer = pilot.request("/v1/ca/rotate", "POST", {"step": step})
                generation = int(answer.get("generation", 0))
                if step == "begin":
                    old_fp, new_fp = rotation_roots(answer)
            _wait_rotation(progress, pilot, step, new_fp or "", generation, timeout)
    out.print(f"root CA of {escape(project)} rotated")
    out.print(Text(f"  old root  {old_fp}\n  new root  {new_fp or '?'}"))
    out.print(f"[green]every proxy trusts and holds a certificate of the new root[/] "
              f"in {time.monotonic() - started:.1f}s")


ROOT_PEM, ROOT_KEY_PEM = "root.pem", "root-key.pem"  # as the CA stores them, and mtls.root


def _certs_project(files: Sequence[str], project: str | None,
                   env_files: Sequence[str]) -> str:
    """The project of a `certs` subcommand: its own -p, else the group's (`certs -p P ...`),
    else as compose names it from the files."""
    ctx = click.get_current_context()
    project = project or (ctx.parent.params.get("project") if ctx.parent else None)
    return project if project and not files else _project_name(files, project, env_files)


@certs.command("export")
@compose_options
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True,
              help="Replace DIR/root.pem and DIR/root-key.pem if they are there.")
@handle_errors
def certs_export(files: tuple[str, ...], project: str | None, env_files: tuple[str, ...],
                 directory: str, force: bool) -> None:
    """Write the mesh's signing root to DIR, for other hosts to share it: DIR/root.pem (its
    certificate, 0644) and DIR/root-key.pem (its private key, 0600; never readable by others,
    not even for an instant). Existing files are left alone unless --force.

    Then, on each other Docker host, before its project's first `up`:
    `composemesh certs import DIR -f <compose file>` (or name the files in
    x-composemesh.mtls.root), so that sidecars on every host trust each other's certificates.

    RISK: root-key.pem is the whole mesh's trust. Whoever holds it can mint a certificate for
    any service of every mesh that trusts this root. Move it only over a channel you trust,
    keep it off shared disks and backups, and delete it once imported. Refused while a root
    rotation is under way, and for your own root (x-composemesh.mtls.root: copy those files)."""
    import os

    from composemesh.ca import fingerprint, load_user_root
    from composemesh.ca.pki import RootError
    from composemesh.errors import ConfigError

    project = _certs_project(files, project, env_files)
    folder = Path(directory)
    targets = (folder / ROOT_PEM, folder / ROOT_KEY_PEM)
    pilot = _pilot(project)
    info = pilot.ca()
    _exportable(info)
    there = [str(p) for p in targets if os.path.lexists(p)]
    if there and not force:
        raise MeshError(f"{' and '.join(there)} already there; pass --force to replace "
                        f"{'them' if len(there) > 1 else 'it'}")
    try:
        answer = pilot.request("/v1/ca/export", "POST", {})
    except ConfigError as exc:  # refused by the pilot (a rotation begun since, ...)
        raise MeshError(str(exc)) from None
    cert_pem, key_pem = str(answer.get("cert_pem", "")), str(answer.get("key_pem", ""))
    try:
        cert, _ = load_user_root(cert_pem.encode(), key_pem.encode())
    except RootError as exc:
        raise EngineError(f"the pilot of {project!r} exported a root that cannot sign: "
                          f"{exc.reason}") from None
    root = fingerprint(cert)
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)  # the umask may have taken bits away (0o277: unwritable)
    _write_new(targets[1], key_pem.encode(), 0o600, force)  # the key first: never a cert alone
    _write_new(targets[0], cert_pem.encode(), 0o644, force)
    out.print(f"wrote {escape(str(targets[0]))} (the root's certificate, 0644)", soft_wrap=True)
    out.print(f"wrote {escape(str(targets[1]))} (its private key, 0600)", soft_wrap=True)
    out.print(Text(f"  root of {project}  {root}"))
    err.print("[yellow]warning:[/] root-key.pem is the whole mesh's trust: move it only over a "
              "channel you trust and delete it once imported", soft_wrap=True)
    out.print(f"next, on each other host: composemesh certs import {escape(str(folder))} "
              "-f <compose file> (before its first `up`), or name both files in "
              "x-composemesh.mtls.root", soft_wrap=True)


def _exportable(info: dict[str, Any]) -> None:
    """MeshError with the one sentence when the root of ``info`` (GET /v1/ca) is not to be
    exported: the user's own, or a rotation under way."""
    if info.get("source") == "user":
        raise MeshError("the root is your own files (x-composemesh.mtls.root): copy them")
    phase = str(info.get("rotation_phase", "steady"))
    if phase != "steady":
        raise MeshError(f"a root rotation is under way (phase {phase}): finish "
                        "`composemesh certs rotate-root` first")


def _write_new(path: Path, data: bytes, mode: int, replace: bool) -> None:
    """``path`` made with ``data`` and ``mode`` from its first byte (a sibling made with
    O_EXCL, synced, then linked in: an existing ``path`` stays unless ``replace``)."""
    import contextlib
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600, O_EXCL
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if ``path`` exists, whatever it is
            except FileExistsError:
                raise MeshError(f"{path} already there; pass --force to replace it") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@certs.command("import")
@compose_options
@click.argument("directory", metavar="DIR",
                type=click.Path(file_okay=False, exists=True))
@handle_errors
def certs_import(files: tuple[str, ...], project: str | None, env_files: tuple[str, ...],
                 directory: str) -> None:
    """Make the project start with the root in DIR (root.pem and root-key.pem, as `certs
    export` wrote them on another host), so that its sidecars and those of the other host
    trust each other: the files go into the project's CA volume, created as `up` would, and
    at `up` its pilot loads them as its stored root.

    For a project not up yet, or down without -v. Refused while its pilot runs (`composemesh
    down` first, or `composemesh certs rotate-root` to change a root live), and when its
    volume holds another root (`composemesh down -v` drops it, and every identity it
    signed); importing the same root again changes nothing. The pair is checked first: a CA
    certificate, in date, the key its own.

    RISK: the key is the whole mesh's trust; the volume keeps it 0600, readable by the pilot
    only. Delete DIR/root-key.pem once imported."""
    from composemesh.ca import fingerprint
    from composemesh.engine import ca_volume

    folder = Path(directory)
    cert_pem, key_pem, cert = _read_root_pair(folder)
    root = fingerprint(cert)
    project = _import_project(files, project, env_files, cert)
    with _progress() as progress:
        _mesh_image_present(progress)
        task = progress.add_task(f"CA volume of {escape(project)}: writing the root", total=None)
        try:
            done = ca_volume.import_root(project, cert_pem, key_pem)
        except ca_volume.VolumeRefused as exc:
            progress.update(task, description=f"[red]CA volume of {escape(project)}: refused",
                            total=1, completed=1)
            raise MeshError(str(exc)) from None
        progress.update(task, description=f"CA volume {escape(done.volume)}: {done.result}",
                        total=1, completed=1)
    if done.result == "same":
        out.print(f"the CA volume {escape(done.volume)} of {escape(project)} holds this root "
                  "already: nothing to do", soft_wrap=True)
    else:
        out.print(f"imported the root into the CA volume {escape(done.volume)} of "
                  f"{escape(project)}", soft_wrap=True)
    out.print(Text(f"  root  {root}"))
    out.print(f"next: composemesh up -p {escape(project)} ... (its pilot signs with this root); "
              f"then delete {escape(str(folder / ROOT_KEY_PEM))}", soft_wrap=True)


def _read_root_pair(folder: Path) -> tuple[str, str, Any]:
    """DIR's root.pem and root-key.pem, checked as a user's root is (they parse, a CA, in
    date, the key its own): their PEM and the certificate; MeshError naming the file."""
    from composemesh.ca import load_user_root
    from composemesh.ca.pki import RootError

    paths = {"cert": folder / ROOT_PEM, "key": folder / ROOT_KEY_PEM}
    data: dict[str, bytes] = {}
    for part, path in paths.items():
        try:
            data[part] = path.read_bytes()
        except OSError as exc:
            raise MeshError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        cert, _ = load_user_root(data["cert"], data["key"])
    except RootError as exc:
        raise MeshError(f"{paths[exc.part]}: {exc.reason}") from None
    mode = paths["key"].stat().st_mode & 0o777
    if mode & 0o077:
        err.print(f"[yellow]warning:[/] {escape(str(paths['key']))} is readable by others "
                  f"(mode {mode:o}): it is the whole mesh's trust", soft_wrap=True)
    try:
        return data["cert"].decode("ascii"), data["key"].decode("ascii"), cert
    except UnicodeDecodeError:
        raise MeshError(f"{folder}: root.pem and root-key.pem must be PEM text") from None


def _import_project(files: Sequence[str], project: str | None, env_files: Sequence[str],
                    cert: Any) -> str:
    """The project to import into; with its compose files at hand, refused when it brings
    its own root (that one would sign, not the import), warned when its trust domain is not
    the root's."""
    from composemesh.ca.spiffe import trust_domain_uri
    from composemesh.inject import load_project, validate_project

    ctx = click.get_current_context()
    project = project or (ctx.parent.params.get("project") if ctx.parent else None)
    if project and not files:
        return project
    loaded = load_project(files, project, env_files=env_files)
    validated = validate_project(loaded)
    if validated.ca is not None and validated.ca.user_root:
        raise MeshError(f"project {loaded.name} brings its own root (x-composemesh.mtls.root), "
                        "which its pilot uses instead: name the imported files there, or "
                        "remove mtls.root and import")
    domain = validated.settings.trust_domain
    if trust_domain_uri(domain) not in _uris_of(cert):
        err.print(f"[yellow]warning:[/] the root was made for another trust domain than "
                  f"{escape(domain)} ({', '.join(_uris_of(cert)) or 'none named'}): "
                  "identities across hosts match only within one trust domain",
                  soft_wrap=True)
    return str(loaded.name)


def _uris_of(cert: Any) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _mesh_image_present(progress: Progress) -> None:
    """The mesh image, whose short-lived container writes into the volume: built offline
    as `up` does when the engine lacks it (never pulled)."""
    from composemesh.engine import docker_host
    from composemesh.engine.images import ensure_images

    try:
        client = docker_host.pinged_client(timeout=600)
    except docker_host.DockerUnavailable as exc:
        raise EngineError(
            f"the Docker engine does not answer ({exc}); start it or run scripts/bootstrap.sh"
        ) from None
    if _has_image(client, wk.MESH_IMAGE):
        return
    task = progress.add_task(f"images: building {wk.MESH_IMAGE}", total=None)
    ensure_images(client, images=[wk.MESH_IMAGE], progress=lambda stage, detail: progress.update(
        task, description=escape(f"images: {stage}: {detail}"[:100])))
    progress.update(task, description=f"images: {wk.MESH_IMAGE} ready", total=1, completed=1)


@main.command()
@click.argument("service")
@click.argument("weights", nargs=-1, required=True)
@click.option("-p", "--project-name", "project", envvar="COMPOSE_PROJECT_NAME", default=None)
@click.option("--timeout", default=60, show_default=True, help="Seconds to wait for the ACKs.")
@handle_errors
def route(service: str, weights: tuple[str, ...], project: str | None, timeout: int) -> None:
    """Change SERVICE's split live, e.g. `route reviews v1=80 v2=20`; waits for every ACK."""
    from composemesh.model.routing_config import parse_weights_args

    parsed = parse_weights_args(weights)
    pilot = _pilot(project or _project_from_cwd())
    started = time.monotonic()
    result = pilot.request(f"/v1/routes/{service}", "PUT", {"weights": parsed})
    with _progress() as progress:
        status = _wait_in_sync(progress, pilot, int(result["generation"]), timeout)
    elapsed = time.monotonic() - started
    out.print(cli_render.route_table(service, result))
    acked = sum(1 for p in status["proxies"] if p["running"])
    out.print(f"[green]{acked} proxies ACKed[/] in {elapsed:.2f}s")


# --------------------------------------------------------------------------- role commands


@main.command(hidden=False)
def netns() -> None:
    """[in the mesh image] Hold an app's network namespace: install capture rules, then wait."""
    from composemesh.proxy.netns import run_netns_holder

    sys.exit(run_netns_holder())


@main.command()
def proxy() -> None:
    """[in the mesh image] Run the sidecar proxy."""
    from composemesh.proxy.server import run_proxy

    sys.exit(run_proxy())


@main.command()
def pilot() -> None:
    """[in the mesh image] Run the control plane."""
    from composemesh.pilot.main import run_pilot

    run_pilot()


@main.command("proxy-ready")
def proxy_ready() -> None:
    """[in the mesh image] Exit 0 when the proxy beside it is ready (container healthcheck)."""
    from composemesh import healthcheck

    sys.exit(healthcheck.main([str(wk.PORT_HEALTH)]))


@main.command("pilot-ready")
def pilot_ready() -> None:
    """[in the mesh image] Exit 0 when the pilot has synced with the engine (healthcheck)."""
    from composemesh import healthcheck

    sys.exit(healthcheck.main([f"unix:{wk.PILOT_SOCKET}"]))


# --------------------------------------------------------------------------- helpers


def _project(name: str, project_dir: Path, meshed: Path | None = None) -> Any:
    from composemesh.engine.compose import ComposeProject

    return ComposeProject(name=name, meshed_file=meshed, project_dir=project_dir)


def _project_from_cwd() -> str:
    return _project_name((), None)


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )


def _ensure_images(progress: Progress, model: dict[str, Any]) -> None:
    """The images of ours that the meshed ``model`` runs: the mesh image, the demo image only
    where a service uses it (an installed composemesh has no demo apps to build it from)."""
    from composemesh.engine import docker_host
    from composemesh.engine.images import ensure_images, images_needed

    task = progress.add_task("images: checking", total=None)
    try:
        client = docker_host.pinged_client(timeout=600)
    except docker_host.DockerUnavailable as exc:
        raise EngineError(
            f"the Docker engine does not answer ({exc}); start it or run scripts/bootstrap.sh"
        ) from None

    def report(stage: str, detail: str) -> None:
        progress.update(task, description=escape(f"images: {stage}: {detail}"[:100]))

    needed = images_needed(model)
    ensure_images(client, images=needed, progress=report)
    progress.update(
        task, description=escape(f"images: ready: {', '.join(needed)}"), total=1, completed=1
    )


ALL_PROFILES = ("--profile", "*")


def _grafana_left_out(progress: Progress, result: Any) -> str | None:
    """Why the add-on's Grafana stays out (its image is neither in the engine nor to be
    pulled: it cannot be built offline), or None: it starts, or none was asked for."""
    from composemesh.engine import docker_host
    from composemesh.engine.base_image import pull_image

    monitoring = result.monitoring
    if monitoring is None or monitoring.grafana is None:
        return None
    image = monitoring.grafana.image
    task = progress.add_task(f"grafana: looking for {escape(image)}", total=None)
    client = docker_host.pinged_client(timeout=600)
    if _has_image(client, image):
        progress.update(task, description=f"grafana: {escape(image)} present", total=1,
                        completed=1)
        return None
    progress.update(task, description=f"grafana: pulling {escape(image)}")
    reason = pull_image(client, image, answer_timeout=GRAFANA_PULL_TIMEOUT)
    if reason is None:
        progress.update(task, description=f"grafana: {escape(image)} pulled", total=1,
                        completed=1)
        return None
    progress.update(task, description=f"[yellow]grafana: {escape(image)} cannot be pulled",
                    total=1, completed=1)
    why = "no registry answers" if _unreachable(reason) else reason
    err.print(f"[yellow]warning:[/] Grafana's image {escape(image)} is not in the engine and "
              f"cannot be pulled ({escape(why)}); it cannot be built offline, so Grafana is "
              "left out. Prometheus runs; `composemesh dashboards -o DIR` writes the "
              "dashboards for a Grafana of your own.", soft_wrap=True)
    return f"its image {image} is not in the engine and cannot be pulled"


GRAFANA_PULL_TIMEOUT = 15.0  # seconds for a registry to answer the pull of Grafana's image
_UNREACHABLE = ("no such host", "timeout", "no answer", "did not answer", "connection refused",
                "network is unreachable", "dial tcp")


def _unreachable(reason: str) -> bool:
    """True when a pull failed for want of a registry (rather than, say, an unknown tag)."""
    return any(word in reason.lower() for word in _UNREACHABLE)


def _has_image(client: Any, image: str) -> bool:
    import docker.errors

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def _profiles(result: Any, grafana_off: str | None) -> list[str]:
    """``--profile`` arguments for `up`: those of COMPOSE_PROFILES (a ``--profile`` replaces
    it) and Grafana's when it starts."""
    import os

    monitoring = result.monitoring
    if monitoring is None or monitoring.grafana is None or grafana_off is not None:
        return []
    wanted = [p.strip() for p in os.environ.get("COMPOSE_PROFILES", "").split(",") if p.strip()]
    args: list[str] = []
    for profile in dict.fromkeys([*wanted, wk.GRAFANA_PROFILE]):
        args += ["--profile", profile]
    return args


def _print_monitoring(result: Any, grafana_off: str | None) -> None:
    """Where the host reaches the monitoring add-on."""
    monitoring = result.monitoring
    if monitoring is None or monitoring.prometheus is None:
        return
    prom = monitoring.prometheus
    out.print(f"Prometheus: {_url(prom.bind, prom.port)}", soft_wrap=True)
    graf = monitoring.grafana
    if graf is None:
        return
    where = _url(graf.bind, graf.port) if grafana_off is None else f"not started ({grafana_off})"
    out.print(f"Grafana:    {escape(where)}", soft_wrap=True)


def _url(bind: str, port: int) -> str:
    host = f"[{bind}]" if ":" in bind else bind
    return f"http://{host}:{port}"


def _build_user_images(progress: Progress, proj: Any, model: dict[str, Any]) -> None:
    """Build the user's own `build:` images one service at a time, so a failure names it."""
    from composemesh.engine import compose
    from composemesh.errors import ImageBuildError

    to_build = compose.services_to_build(model)
    if not to_build:
        return
    task = progress.add_task("images: building", total=len(to_build))
    for name in to_build:
        progress.update(task, description=f"images: building {escape(name)}")

        def show(line: str, n: str = name) -> None:
            progress.update(task, description=escape(f"images: {n}: {line[:80]}"))

        try:
            compose.build_service(proj, name, on_line=show)
        except ImageBuildError:
            progress.update(task, description=f"[red]images: {escape(name)} does not build")
            raise
        progress.advance(task)
    progress.update(task, description=f"images: built {', '.join(to_build)}")


def _look_at_consul(settings: Any, loaded: Any) -> None:
    """`up` with ``x-composemesh.consul``: a token Consul refuses is an error before anything
    starts; a Consul that does not answer is one warning (the mesh starts and catches up)."""
    if settings is None:
        return
    from composemesh.engine.consul_check import consul_preflight

    origin = str(loaded.files[0]) if getattr(loaded, "files", None) else ""
    warning = consul_preflight(settings, origin=origin)
    if warning is not None:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def _print_warnings(result: Any) -> None:
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


MESHED_FILE_MODE = 0o600  # the meshed file holds the resolved values of the user's .env


def _pilot(project: str) -> PilotClient:
    """The client of ``project``'s pilot API for this command (see ``engine.pilot_api``)."""
    from composemesh.engine.pilot_api import PilotClient

    return PilotClient(project)


def _project_name(
    files: Sequence[str], project: str | None, env_files: Sequence[str] = ()
) -> str:
    """The project as compose names it from ``files`` (or the files it finds) and ``-p``."""
    from composemesh.inject import load_project

    return str(load_project(files, project, env_files=env_files).name)


def _wait_in_sync(progress: Progress, pilot: PilotClient, generation: int,
                  timeout: float) -> dict[str, Any]:
    """Until every running proxy has ACKed what the pilot renders as of ``generation``."""
    from composemesh.engine.proxy_sync import Count, wait_acked

    task = progress.add_task("proxies: waiting for ACKs", total=None)

    def show(n: Count) -> None:
        progress.update(task, total=n.total, completed=n.of,
                        description=f"proxies: {n.of}/{n.total} ACKed")

    return wait_acked(pilot.status, generation, timeout, show)


def _wait_rotation(progress: Progress, pilot: PilotClient, step: str, new_root: str,
                   generation: int, timeout: float) -> None:
    """Until every proxy has caught up with ``step``; NotReadyError naming who did not."""
    from composemesh.engine.proxy_sync import wait_rotation_step

    task = progress.add_task(f"{step}: waiting for the proxies", total=None)
    wait_rotation_step(
        pilot.status, step, new_root, generation, timeout,
        on_line=lambda line: progress.update(task, description=escape(line)),
        on_late=lambda line: progress.update(task, description=f"[red]{escape(line)}"))
    progress.update(task, total=1, completed=1)


def _wait_ready(progress: Progress, pilot: PilotClient, timeout: float) -> dict[str, Any]:
    from composemesh.engine.proxy_sync import Count, wait_ready

    task = progress.add_task("proxies: waiting for the pilot", total=None)

    def show(n: Count) -> None:
        progress.update(task, total=n.total or None, completed=n.of,
                        description=f"proxies: {n.of}/{n.total} ready and in sync")

    return wait_ready(pilot.status, timeout, show)


def _show_logs_of_failed(reason: str) -> None:
    """The last lines of the container compose names in ``reason``, and its last
    healthcheck if it is unhealthy."""
    from composemesh.engine import docker_host
    from composemesh.engine.compose import failed_container

    name = failed_container(reason)
    if name is None:
        return
    text = docker_host.logs_tail(name, 15)
    if text:
        err.print(f"[bold]last lines of {name}:[/]")
        err.print(text, markup=False, highlight=False)
    checks = docker_host.health_log(name) if "unhealthy" in reason else []
    if checks:
        last = checks[-1]
        err.print(f"[bold]its last healthcheck[/] (exit {last.get('ExitCode')}):")
        err.print(str(last.get("Output", "")).strip() or "(no output)", markup=False,
                  highlight=False)


def _print_status(data: dict[str, Any]) -> None:
    for table in cli_render.status_tables(data, out):
        out.print(table)
    for error in data.get("errors") or []:
        err.print(f"[yellow]kept last good config:[/] {escape(error)}", soft_wrap=True)


def _print_certs(ca: dict[str, Any], data: dict[str, Any]) -> None:
    for table in cli_render.certs_tables(ca, data, out):
        out.print(table)


def _print_endpoints(project: str, result: Any) -> None:
    """Where the host reaches each port the meshed model publishes."""
    from composemesh.engine.compose import published_addresses

    monitoring = (wk.PROMETHEUS_SERVICE, wk.GRAFANA_SERVICE)  # said by _print_monitoring
    table = cli_render.endpoints_table([
        (port.service, str(port.target), f"http://{where}/")
        for port, where in published_addresses(project, result.model)
        if port.compose_service not in monitoring])
    if table is not None:
        out.print(table)


if __name__ == "__main__":
    main()
