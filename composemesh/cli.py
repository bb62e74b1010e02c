"""The `composemesh` command: thin click commands over inject, engine, pilot and proxy."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from composemesh import __version__
from composemesh.errors import ComposeError, EngineError, MeshError, NotReadyError
from composemesh.model import wellknown as wk

if TYPE_CHECKING:
    from composemesh.engine.pilot_api import PilotChannel

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
    """Load, validate and inject: every user error surfaces here, before anything is written."""
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
    result = inject(loaded.model, validated.labels, ca=validated.ca)
    text = dump_yaml(result.model)
    compose_config_check(text, loaded.project_dir)
    return loaded, result, text


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
    _, result, text = _prepare(files, project, env_files)
    _print_warnings(result)
    if output:
        _write_atomic(Path(output), text)
        err.print(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@main.command()
@compose_options
@handle_errors
def check(files: tuple[str, ...], project: str | None, env_files: tuple[str, ...]) -> None:
    """Validate labels and x-composemesh: and show what `up` would add."""
    from composemesh.inject import render_plan

    loaded, result, _ = _prepare(files, project, env_files)
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

    loaded, result, text = _prepare(files, project, env_files)
    _print_warnings(result)
    started = time.monotonic()
    with _progress() as progress:
        _ensure_images(progress, result.model)
        meshed = compose.state_dir(loaded.name) / "compose.yaml"
        _write_atomic(meshed, text)
        proj = _project(loaded.name, Path(loaded.project_dir), meshed)
        before = compose.running_containers(loaded.name)
        _build_user_images(progress, proj, result.model)
        task = progress.add_task("containers: starting", total=None)
        code, lines = compose.run(
            proj,
            ["up", "-d", "--wait", "--remove-orphans"],
            on_line=lambda line: progress.update(
                task, description=f"containers: {escape(line[:90])}"
            ),
        )
        if code != 0:
            reason = compose.failure_reason(lines)
            progress.update(task, description=f"[red]containers: failed: {escape(reason)}")
            progress.stop()
            _show_logs_of_failed(proj, reason)
            if not before:
                err.print("removing what this `up` started ...")
                compose.run(proj, ["down", "--remove-orphans", "--timeout", "3"])
            raise ComposeError(f"docker compose up failed: {reason}")
        progress.update(task, description="containers: running and healthy", total=1, completed=1)
        status = _wait_ready(progress, loaded.name, timeout - (time.monotonic() - started))
    _print_status(status)
    _print_endpoints(loaded.name, result)
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
        loaded, _, text = _prepare(files, project, env_files)
    except ComposeError:
        if files or not project:
            raise
        loaded = None  # -p alone, and no project compose can read here: down by name
    if loaded is not None:
        project = loaded.name
        project_dir = Path(loaded.project_dir)
        meshed = compose.state_dir(project) / "compose.yaml"
        _write_atomic(meshed, text)
    if not project:
        raise ComposeError("no compose file and no -p: which project?")
    proj = _project(project, project_dir, meshed)
    args = ["down", "--remove-orphans"] + (["--volumes"] if volumes else [])
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
    project = project or _project_from_cwd()
    data = _pilot_status(project)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    _print_status(data)


@main.group(invoke_without_command=True)
@click.option("-p", "--project-name", "project", envvar="COMPOSE_PROJECT_NAME", default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the CA and identities as JSON.")
@click.pass_context
@handle_errors
def certs(ctx: click.Context, project: str | None, as_json: bool) -> None:
    """The mesh's root CA and trust bundle, and each proxy's identity and certificate expiry."""
    if ctx.invoked_subcommand is not None:
        return
    project = project or _project_from_cwd()
    ca = _pilot_request(project, "/v1/ca")
    data = _pilot_status(project)
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
    project = project if project and not files else _project_name(files, project, env_files)
    started = time.monotonic()
    info = _pilot_request(project, "/v1/ca")
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
                answer = _pilot_request(project, "/v1/ca/rotate", "POST", {"step": step})
                generation = int(answer.get("generation", 0))
                if step == "begin":
                    old_fp, new_fp = rotation_roots(answer)
            _wait_rotation(progress, project, step, new_fp or "", generation, timeout)
    out.print(f"root CA of {escape(project)} rotated")
    out.print(Text(f"  old root  {old_fp}\n  new root  {new_fp or '?'}"))
    out.print(f"[green]every proxy trusts and holds a certificate of the new root[/] "
              f"in {time.monotonic() - started:.1f}s")


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
    project = project or _project_from_cwd()
    started = time.monotonic()
    result = _pilot_request(project, f"/v1/routes/{service}", "PUT", {"weights": parsed})
    with _progress() as progress:
        status = _wait_in_sync(progress, project, int(result["generation"]), timeout)
    elapsed = time.monotonic() - started
    table = Table(title=f"{service}: split changed")
    for col in ("version", "before", "after"):
        table.add_column(col)
    for version in sorted(set(result["old"]) | set(result["new"])):
        table.add_row(
            version, f"{result['old'].get(version, 0)}", f"{result['new'].get(version, 0)}"
        )
    out.print(table)
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
    import docker

    from composemesh.engine.images import ensure_images, images_needed

    task = progress.add_task("images: checking", total=None)
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # docker's own exception types stop here
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


def _build_user_images(progress: Progress, proj: Any, model: dict[str, Any]) -> None:
    """Build the user's own `build:` images one service at a time, so a failure names it."""
    from composemesh.engine import compose
    from composemesh.errors import ImageBuildError

    to_build = [name for name, svc in model.get("services", {}).items() if svc.get("build")]
    if not to_build:
        return
    task = progress.add_task("images: building", total=len(to_build))
    for name in to_build:
        progress.update(task, description=f"images: building {escape(name)}")

        def show(line: str, n: str = name) -> None:
            progress.update(task, description=escape(f"images: {n}: {line[:80]}"))

        code, lines = compose.run(proj, ["build", name], on_line=show)
        if code != 0:
            progress.update(task, description=f"[red]images: {escape(name)} does not build")
            raise ImageBuildError(
                f"service {name!r}: its image does not build: {compose.failure_reason(lines)}"
            )
        progress.advance(task)
    progress.update(task, description=f"images: built {', '.join(to_build)}")


def _print_warnings(result: Any) -> None:
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)


MESHED_FILE_MODE = 0o600  # the meshed file holds the resolved values of the user's .env


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` at once, readable by its owner only from the first byte:
    compose's resolved model carries every variable's value (the .env's secrets too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MESHED_FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _pilot_channel(project: str) -> PilotChannel:
    """The way to the pilot of ``project``: its Unix socket (see ``engine.pilot_api``)."""
    from composemesh.engine.pilot_api import PilotUnreachable, find_channel

    try:
        return find_channel(project)
    except PilotUnreachable as exc:
        raise EngineError(str(exc)) from None


def _pilot_status(project: str) -> dict[str, Any]:
    return _pilot_request(project, "/v1/status")


def _pilot_request(
    project: str, path: str, method: str = "GET", body: object = None
) -> dict[str, Any]:
    """One call to the pilot's API; a 4xx answer to a sent body is the user's error (exit 2)."""
    from composemesh.engine.pilot_api import PilotUnreachable
    from composemesh.errors import ConfigError

    channel = _pilot_channel(project)
    data = json.dumps(body).encode() if body is not None else None
    try:
        answer = channel.request(method, path, data, timeout=5 if body is None else 10)
        decoded = answer.json()
    except PilotUnreachable as exc:
        raise EngineError(f"the pilot of {project!r} does not answer: {exc}") from None
    except ValueError:
        raise EngineError(f"the pilot of {project!r} answered {answer.status} to {path} "
                          f"with no JSON") from None
    if 200 <= answer.status < 300 and isinstance(decoded, dict):
        return decoded
    message = decoded.get("error", "") if isinstance(decoded, dict) else ""
    message = message or f"HTTP {answer.status}"
    if body is not None and 400 <= answer.status < 500:
        raise ConfigError(message) from None
    raise EngineError(f"the pilot of {project!r} answered {answer.status} to {path}: {message}")


def _wait_in_sync(
    progress: Progress, project: str, generation: int, timeout: float
) -> dict[str, Any]:
    """Until every running proxy has ACKed what the pilot renders as of ``generation``."""
    task = progress.add_task("proxies: waiting for ACKs", total=None)
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = _pilot_status(project)
        proxies = [p for p in last["proxies"] if p["running"]]
        synced = [p for p in proxies if p["in_sync"]]
        progress.update(
            task,
            total=len(proxies),
            completed=len(synced),
            description=f"proxies: {len(synced)}/{len(proxies)} ACKed",
        )
        if last.get("generation", 0) >= generation and len(synced) == len(proxies):
            return last
        time.sleep(0.05)
    lagging = [p["node"] for p in last.get("proxies", []) if not p.get("in_sync")]
    raise NotReadyError(f"not every proxy ACKed within {timeout}s: {', '.join(lagging)}")


ROTATION_STEPS = ("begin", "switch", "finish")
_TAKEN_BY_PHASE = {"steady": 0, "trusting": 1, "switched": 2}  # steps already taken


def rotation_plan(phase: str) -> list[tuple[str, bool]]:
    """The steps of a root rotation from ``phase`` on, each with whether to take it (False:
    the pilot took it already, only wait for the mesh to catch up with it)."""
    taken = _TAKEN_BY_PHASE.get(phase, 0)
    return [(step, i >= taken) for i, step in enumerate(ROTATION_STEPS) if i >= taken - 1]


def rotation_roots(info: dict[str, Any]) -> tuple[str, str | None]:
    """The old and new root fingerprints from a ``GET /v1/ca`` answer (new: None if steady)."""
    trusted = [str(t.get("fingerprint")) for t in info.get("trusted") or []]
    active = str(info.get("fingerprint", "?"))
    phase = info.get("rotation_phase")
    if phase == "trusting" and len(trusted) == 2:
        return active, trusted[1]
    if phase == "switched" and len(trusted) == 2:
        return trusted[0], active
    return active, None


def rotation_progress(
    status: dict[str, Any], step: str, new_root: str, generation: int = 0
) -> tuple[bool, str, list[str]]:
    """Whether every proxy has caught up with ``step`` of a root rotation, the line that says
    how far they are, and the nodes still behind.

    Every step: the proxy ACKed its current snapshot (begin: the bundle of both roots;
    finish: the new root's alone). ``switch`` also: its certificate was issued by
    ``new_root``. A proxy counts if its app or the proxy itself runs.
    """
    proxies = [p for p in status.get("proxies", []) if p.get("running") or p.get("proxy_healthy")]
    published = int(status.get("generation", 0)) >= generation
    synced = {p["node"] for p in proxies if p.get("in_sync") and published}
    renewed = {p["node"] for p in proxies if p.get("cert_issuer_fingerprint") == new_root}
    done = synced & renewed if step == "switch" else synced
    n = len(proxies)
    what = {"begin": "the bundle with both roots", "switch": "the new signing root",
            "finish": "the bundle without the old root"}.get(step, step)
    line = f"{step}: {len(synced)}/{n} proxies ACKed {what}"
    if step == "switch":
        line += f", {len(renewed)}/{n} hold a certificate of the new root"
    lagging = sorted(p["node"] for p in proxies if p["node"] not in done)
    return not lagging, line, lagging


def _wait_rotation(
    progress: Progress, project: str, step: str, new_root: str, generation: int, timeout: float
) -> None:
    """Until every proxy has caught up with ``step``; NotReadyError naming who did not."""
    task = progress.add_task(f"{step}: waiting for the proxies", total=None)
    deadline = time.monotonic() + timeout
    while True:
        done, line, lagging = rotation_progress(
            _pilot_status(project), step, new_root, generation
        )
        progress.update(task, description=escape(line))
        if done:
            progress.update(task, total=1, completed=1)
            return
        if time.monotonic() >= deadline:
            progress.update(task, description=f"[red]{escape(line)}")
            raise NotReadyError(
                f"the root rotation stopped after its {step} step: "
                f"{', '.join(lagging)} did not catch up within {timeout:g}s; the mesh keeps "
                f"working as it is, and `composemesh certs rotate-root` goes on from there"
            )
        time.sleep(0.2)


def _project_name(
    files: Sequence[str], project: str | None, env_files: Sequence[str] = ()
) -> str:
    """The project as compose names it from ``files`` (or the files it finds) and ``-p``."""
    from composemesh.inject import load_project

    return str(load_project(files, project, env_files=env_files).name)


def _wait_ready(progress: Progress, project: str, timeout: float) -> dict[str, Any]:
    task = progress.add_task("proxies: waiting for the pilot", total=None)
    deadline = time.monotonic() + max(timeout, 10)
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            last = _pilot_status(project)
        except EngineError:
            time.sleep(0.5)
            continue
        proxies = [p for p in last.get("proxies", []) if p["running"]]
        ready = [p for p in proxies if p["in_sync"] and p["proxy_healthy"]]
        progress.update(
            task,
            total=len(proxies) or None,
            completed=len(ready),
            description=f"proxies: {len(ready)}/{len(proxies)} ready and in sync",
        )
        if proxies and len(ready) == len(proxies):
            return last
        time.sleep(0.5)
    lagging = [p["node"] for p in last.get("proxies", []) if not p.get("in_sync")]
    raise NotReadyError(
        f"proxies not ready after {timeout:.0f}s: {', '.join(lagging) or 'pilot never answered'}"
    )


def _show_logs_of_failed(proj: Any, reason: str) -> None:
    import re
    import subprocess

    m = re.search(r"container (\S+)", reason)
    if not m:
        return
    logs = subprocess.run(
        ["docker", "logs", "--tail", "15", m.group(1)], capture_output=True, text=True, check=False
    )
    text = (logs.stdout + logs.stderr).strip()
    if text:
        err.print(f"[bold]last lines of {m.group(1)}:[/]")
        err.print(text, markup=False, highlight=False)
    if "unhealthy" in reason:
        health = subprocess.run(
            ["docker", "inspect", "-f", "{{json .State.Health.Log}}", m.group(1)],
            capture_output=True, text=True, check=False,
        )
        try:
            checks = json.loads(health.stdout) or []
        except ValueError:
            checks = []
        if checks:
            last = checks[-1]
            err.print(f"[bold]its last healthcheck[/] (exit {last.get('ExitCode')}):")
            err.print(str(last.get("Output", "")).strip() or "(no output)", markup=False,
                      highlight=False)


def _print_status(data: dict[str, Any]) -> None:
    services = data.get("services") or {}
    if services:
        table = Table(title=f"services of {data.get('project', '?')}")
        for col in ("service", "version", "weight", "endpoints", "req/s", "errors", "split from"):
            table.add_column(col)
        for name, info in services.items():
            versions = sorted(set(info["split"]) | set(info["endpoints"]))
            traffic = info.get("traffic") or {}
            for i, version in enumerate(versions):
                rate = traffic.get(version)
                table.add_row(
                    name if i == 0 else "",
                    version,
                    str(info["split"].get(version, 0)),
                    str(info["endpoints"].get(version, 0)),
                    f"{rate['rps']:.1f}" if rate else "—",
                    f"{100 * rate['error_ratio']:.1f}%" if rate else "—",
                    ("`route`" if info["overridden"] else "labels/config") if i == 0 else "",
                )
        out.print(table)
    table = _proxies_table(f"proxies of {data.get('project', '?')}", data.get("proxies", []), (
        *WHICH_PROXY,
        ("address", lambda p: (p["addresses"] or ["—"])[0]),
        ("proxy", lambda p: "ready" if p["proxy_healthy"]
         else ("starting" if p["running"] else "down")),
        ("config", _config_state),
    ), (
        ("cert expires", lambda p: _expiry(p.get("cert_not_after"), relative_only=True)),
    ))
    out.print(table)
    for error in data.get("errors") or []:
        err.print(f"[yellow]kept last good config:[/] {escape(error)}", soft_wrap=True)


def _config_state(p: dict[str, Any]) -> Text:
    """``in sync`` (ACKed), ``behind``, or the NACK and its reason (versions: ``--json``)."""
    if p.get("nacked_version"):
        return Text(f"NACK: {p.get('nack_reason')}", style="red")
    if p.get("in_sync"):
        return Text("in sync" + ("" if p.get("acked_version") else ", no ACK"))
    return Text("behind", style="yellow")


Column = tuple[str, Callable[[dict[str, Any]], Any]]  # heading, and the cell of a proxy
WHICH_PROXY: tuple[Column, ...] = (
    ("instance", lambda p: p["compose_service"]),
    ("service", lambda p: f"{p['service']} {p['version']}"),
)


def _proxies_table(title: str, proxies: Sequence[dict[str, Any]], before: Sequence[Column],
                   after: Sequence[Column]) -> Table:
    """A row per proxy: the ``before`` columns, its whole SPIFFE ID, the ``after`` columns.

    When the IDs would make the table wider than the console and every one is
    ``spiffe://<td>/ns/<project>/sa/<service>``, that form is said once under the table
    instead of in a column (the service is in a column of its own already).
    """
    from rich.measure import Measurement

    rows = sorted(proxies, key=lambda p: (p["service"], p["version"], p["node"]))

    def build(identity: Sequence[Column], caption: str | None) -> Table:
        table = Table(title=title, caption=caption)
        columns = [*before, *identity, *after]
        for heading, _ in columns:
            table.add_column(heading, overflow="fold")
        for p in rows:
            table.add_row(*(cell(p) for _, cell in columns))
        return table

    full = build((("identity", lambda p: Text(p.get("identity") or "—")),), None)
    if Measurement.get(out, out.options.update_width(10_000), full).maximum <= out.width:
        return full
    prefixes = {(p.get("identity") or "").rsplit("/", 1)[0] + "/" for p in proxies}
    prefix = prefixes.pop() if len(prefixes) == 1 else ""
    if not prefix or any(p.get("identity") != prefix + p["service"] for p in proxies):
        return full  # some proxy's ID says what the service column does not: keep them all
    return build((), f"identity: {prefix}<service>")


def _when(iso: str | None) -> str:
    """``2026-11-26 11:50:02 UTC`` from an ISO time; — for none."""
    if not iso:
        return "—"
    try:
        return f"{datetime.fromisoformat(iso).astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    except ValueError:
        return escape(iso)


def _expiry(not_after: str | None, now: datetime | None = None,
            relative_only: bool = False) -> str:
    """``2026-11-26 11:50:02 UTC (in 23h 59m)`` (or ``in 23h 59m``) from an ISO time; —."""
    if not not_after:
        return "—"
    try:
        when = datetime.fromisoformat(not_after).astimezone(UTC)
    except ValueError:
        return escape(not_after)
    left = int((when - (now or datetime.now(UTC))).total_seconds())
    if left <= 0:
        relative = "[red]expired[/]"
    else:
        days, rest = divmod(left, 86400)
        hours, rest = divmod(rest, 3600)
        minutes, seconds = divmod(rest, 60)
        if days:
            relative = f"in {days}d {hours}h"
        elif hours:
            relative = f"in {hours}h {minutes}m"
        else:
            relative = f"in {minutes}m {seconds}s"
    return relative if relative_only else f"{_when(not_after)} ({relative})"


def _print_certs(ca: dict[str, Any], data: dict[str, Any]) -> None:
    bundle = str(ca.get("trust_bundle_pem") or "")
    roots = bundle.count("-----BEGIN CERTIFICATE-----")
    table = Table(title=f"root CA of {ca.get('project', data.get('project', '?'))}")
    table.add_column("")
    table.add_column("", overflow="fold")
    table.show_header = False
    rows = (
        ("subject", Text(str(ca.get("subject", "?")))),  # Text: no markup, no :emoji:
        ("fingerprint", Text(str(ca.get("fingerprint", "?")))),
        ("not before", _when(ca.get("not_before"))),
        ("not after", _expiry(ca.get("not_after"))),
        ("trust bundle", f"{roots} root{'s' if roots != 1 else ''}, {len(bundle.encode())} bytes"),
        ("trust domain", str(ca.get("trust_domain", "?"))),
        ("rotation", {"trusting": "under way: the new root is trusted, the old one signs",
                      "switched": "under way: the new root signs, the old one is trusted"}.get(
                          str(ca.get("rotation_phase")), "none under way")),
        ("root", {"user": "the user's own", "generated": "generated by the pilot (new)",
                  "stored": "generated by the pilot"}.get(str(ca.get("source")), "?")),
        ("workload certificates", f"live {_duration(ca.get('workload_ttl_s'))}; "
                                  f"{ca.get('signed', 0)} signed since the pilot started"),
    )
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    table = _proxies_table(f"identities of {data.get('project', '?')}",
                           data.get("proxies", []), WHICH_PROXY, (
        ("serial", lambda p: Text(p.get("cert_serial") or "—")),
        ("expires", lambda p: _expiry(p.get("cert_not_after")) if p.get("identity")
         else "[yellow]no certificate[/]"),
    ))
    out.print(table)


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _published_target(port: object) -> int | None:
    """The container port of a published port entry (short or long syntax), else None."""
    if isinstance(port, dict):
        target, published = port.get("target"), port.get("published")
        return int(target) if target and published else None
    spec = str(port).split("/")[0]
    if ":" not in spec:
        return None  # not published on the host
    target = spec.rsplit(":", 1)[1]
    return int(target) if target.isdigit() else None


def _print_endpoints(project: str, result: Any) -> None:
    from composemesh.engine.compose import published_port

    rows = []
    for name, svc in result.model.get("services", {}).items():
        labels = svc.get("labels") or {}
        if isinstance(labels, dict) and labels.get(wk.LABEL_ROLE) == wk.ROLE_PILOT:
            continue
        for port in svc.get("ports") or []:
            target = _published_target(port)
            if target is None:
                continue
            where = published_port(project, name, int(target))
            if where:
                of = labels.get(wk.LABEL_OF, name) if isinstance(labels, dict) else name
                rows.append((of, str(target), f"http://{where}/"))
    if rows:
        table = Table(title="reach it at")
        for col in ("service", "port", "address"):
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        out.print(table)


if __name__ == "__main__":
    main()
