"""Reads compose files through `docker compose config` and writes compose YAML back out.

This is the I/O edge of the injector: YAML errors, `docker compose`'s refusals and a missing
`docker` binary are mapped here to ConfigError / ComposeError; nothing past it sees them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from composemesh.errors import ComposeError, ConfigError

COMPOSE_TIMEOUT = 120  # seconds; `docker compose config` needs no engine and is quick


@dataclass(frozen=True)
class LoadedProject:
    """A compose project as `docker compose config` sees it: interpolated and resolved."""

    files: tuple[str, ...]  # the files compose read (as the user named them, or found)
    name: str  # the project name compose settled on
    model: dict[str, Any]  # compose's canonical model: variables resolved, paths absolute
    raw: tuple[dict[str, Any], ...]  # each file as written, to locate errors
    warnings: tuple[str, ...] = field(default=())  # what compose warned about on the way
    project_dir: str = ""  # compose's project directory (the first file's)

    def file_of(self, service: str, field: str | None = None) -> str:
        """The file that defines ``service``: the last one mentioning it, preferably its field."""
        mentions = [
            (path, doc["services"][service])
            for path, doc in zip(self.files, self.raw, strict=True)
            if isinstance(doc.get("services"), Mapping) and service in doc["services"]
        ]
        if field is not None:
            for path, svc in reversed(mentions):
                if isinstance(svc, Mapping) and field in svc:
                    return path
        return mentions[-1][0] if mentions else self.files[0]

    def file_of_key(self, key: str) -> str:
        """The last file with the top-level ``key`` (e.g. ``x-composemesh``)."""
        for path, doc in zip(reversed(self.files), reversed(self.raw), strict=True):
            if key in doc:
                return path
        return self.files[0]

    def locate(self, service: str | None, field: str | None) -> str:
        """The file to blame for ``field`` of ``service`` (or the top-level key ``field``)."""
        if service is None:
            return self.file_of_key(field) if field else self.files[0]
        return self.file_of(service, field)


def load_project(
    files: Sequence[str] = (),
    project_name: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    env_files: Sequence[str] = (),
    workdir: str | os.PathLike[str] | None = None,
) -> LoadedProject:
    """Let `docker compose config` find, merge, interpolate and normalise the project.

    With no ``files``, compose finds them itself from ``workdir`` (default: the current
    directory) exactly as `docker compose up` would: ``COMPOSE_FILE``, else ``compose.yaml``
    (or its older names) with its ``.override`` file. ``env_files`` are compose's
    ``--env-file``; ``env`` is added to this process's environment for compose
    (``COMPOSE_PROJECT_NAME`` and the like).

    The model is the one compose runs: every ``${VAR}`` resolved (from ``.env``, the env
    files and the environment), every relative path made absolute against the project
    directory, ``$`` written ``$$``. So the meshed file means the same wherever it is
    written or read, and what a variable turns into (a bind mount, an absolute path, a build
    argument taken from the environment) is compose's decision, never a guess made on the
    variable's name. Every profile's services are kept (with their ``profiles:``), so that
    ``COMPOSE_PROFILES`` picks among them at `up` as it does without the mesh.

    Raises ConfigError for a file that is missing or not a YAML mapping, and ComposeError
    when compose refuses the project or is not installed; a refusal that names a service
    names the same one on every run.
    """
    cwd = Path(workdir if workdir is not None else os.getcwd()).resolve()
    given = tuple(str(f) for f in files)
    for path in given:
        _read_yaml(path, cwd)  # a missing or broken file: our own words, line and column
    args: list[str] = []
    for path in given:
        args += ["-f", str((cwd / path).resolve())]
    for env_file in env_files:
        args += ["--env-file", str((cwd / env_file).resolve())]
    if project_name:
        args += ["-p", project_name]
    names = given or ("the compose project in " + str(cwd),)
    # `--profile '*'`: every service, whatever COMPOSE_PROFILES says now; each keeps its
    # `profiles:`, so compose still picks the active ones at `up`.
    config = [*args, "--profile", "*", "config", "--format", "json"]
    try:
        proc = _run_compose(config, names, cwd=cwd, env=env)
    except ComposeError as exc:
        raise _first_refusal(exc, args, names, cwd, env) from None
    try:
        model = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise ComposeError(
            f"{', '.join(names)}: docker compose config printed no JSON ({exc})"
        ) from None
    if not isinstance(model, dict):
        raise ComposeError(f"{', '.join(names)}: docker compose config printed no mapping")
    paths = given or _found_files(args, cwd, env)
    raw = tuple(_read_yaml(path, cwd) for path in paths)
    name = str(model.get("name") or project_name or "")
    _drop_compose_defaults(model)
    _drop_derived_names(model, raw, name)
    _resolve_mesh_paths(model, paths, raw, cwd)
    project_dir = str((cwd / paths[0]).resolve().parent) if paths else str(cwd)
    warnings = tuple(dict.fromkeys(_clean_lines(proc.stderr, paths)))
    return LoadedProject(
        files=paths, name=name, model=model, raw=raw, warnings=warnings, project_dir=project_dir
    )


def compose_environment(loaded: LoadedProject) -> dict[str, str]:
    """The environment compose resolves a variable passed by name from at `up` (``environment:
    [NAME]``): this process's, then the project directory's ``.env`` (never ``--env-file``:
    `up` runs the meshed file without it). This process's environment alone when compose
    cannot say."""
    args: list[str] = []
    for path in loaded.files:
        args += ["-f", str(Path(path).resolve())]
    if loaded.project_dir:
        args += ["--project-directory", loaded.project_dir]
    try:
        proc = _run_compose([*args, "config", "--no-consistency", "--environment"],
                            loaded.files, cwd=Path(loaded.project_dir or os.getcwd()), env=None)
    except ComposeError:
        return dict(os.environ)
    found = dict(os.environ)
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key and key not in os.environ:
            found[key] = value
    return found


def compose_config_check(
    yaml_text: str, workdir: str | os.PathLike[str], *, env: Mapping[str, str] | None = None
) -> None:
    """Raise ComposeError with compose's own words if it refuses ``yaml_text``.

    The text is read from stdin in ``workdir`` (relative paths resolve there) and
    interpolated with this environment (plus ``env``), as `docker compose up` would: only
    then does compose check references such as undefined networks.
    """
    args = ["-f", "-", "config", "-q"]
    _run_compose(args, ("the generated compose file",), cwd=Path(workdir), env=env, stdin=yaml_text)


def dump_yaml(model: Mapping[str, Any]) -> str:
    """Deterministic block-style YAML with no anchors, in the order of ``model``'s keys."""
    return yaml.dump(
        model,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=4096,
    )


# --------------------------------------------------------------------------- reading


def _read_yaml(path: str, cwd: Path) -> dict[str, Any]:
    try:
        text = (cwd / path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot be read: {reason}", file=path) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "unreadable"
        raise ConfigError(f"{where}not valid YAML: {problem}", file=path) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=path) from None
    if not isinstance(doc, dict):
        found = "nothing" if doc is None else f"a {type(doc).__name__}"
        raise ConfigError(
            f"the top level must be a mapping (with a services: key), found {found}", file=path
        )
    return doc


# Compose's own names for the files it looks for, in its order (compose-go's
# DefaultFileNames and DefaultOverrideFileNames); only used to name files in messages.
_DEFAULT_FILES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
_OVERRIDE_FILES = (
    "compose.override.yml",
    "compose.override.yaml",
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
)


def _found_files(args: Sequence[str], cwd: Path, env: Mapping[str, str] | None) -> tuple[str, ...]:
    """The files compose read when it was given none: the model is compose's already; this
    only names them in messages. ``COMPOSE_FILE`` is taken as compose resolved it (from the
    environment, ``.env`` or ``--env-file``); without it, the first directory from ``cwd`` up
    with one of compose's default names, and its override file."""
    try:
        proc = _run_compose(
            [*args, "config", "--no-consistency", "--environment"], (), cwd=cwd, env=env
        )
        seen = dict(line.partition("=")[::2] for line in proc.stdout.splitlines())
    except ComposeError:
        seen = {}
    here = Path.cwd().resolve()

    def named(path: Path) -> str:  # as the user would write it: relative where they are
        return os.path.relpath(path, here) if path.parent == here else str(path)

    listed = seen.get("COMPOSE_FILE", "")
    if listed:
        sep = seen.get("COMPOSE_PATH_SEPARATOR") or os.pathsep
        return tuple(named((cwd / f).resolve()) for f in listed.split(sep) if f)
    for folder in (cwd, *cwd.parents):
        base = next((n for n in _DEFAULT_FILES if (folder / n).is_file()), None)
        if base is None:
            continue
        override = next((n for n in _OVERRIDE_FILES if (folder / n).is_file()), None)
        return tuple(named(folder / n) for n in (base, override) if n)
    raise ComposeError(
        f"no compose file given and none of {', '.join(_DEFAULT_FILES)} in {cwd} or above"
    )


def _first_refusal(
    exc: ComposeError,
    args: Sequence[str],
    names: Sequence[str],
    cwd: Path,
    env: Mapping[str, str] | None,
) -> ComposeError:
    """The same refusal every run: compose checks references in map order, so which service
    an error names changes from run to run. When it names one, each service is checked on
    its own (the others stubbed), in name order, and the first one refused is reported in
    compose's words."""
    if not _NAMES_A_SERVICE.search(str(exc)):
        return exc
    try:
        proc = _run_compose(
            [*args, "--profile", "*", "config", "--format", "json", "--no-consistency"],
            names, cwd=cwd, env=env,
        )
        model = json.loads(proc.stdout)
        services = dict(model.get("services") or {})
    except (ComposeError, json.JSONDecodeError, AttributeError):
        return exc
    project = ["-p", str(model.get("name") or "composemesh-check")]
    for name in sorted(services):
        alone = {
            **model,
            "services": {n: (svc if n == name else {"image": "stub"}) for n, svc in
                         services.items()},
        }
        try:
            _run_compose([*project, "-f", "-", "config", "-q"], names, cwd=cwd, env=env,
                         stdin=json.dumps(alone))
        except ComposeError as refusal:
            return refusal
    return exc


_NAMES_A_SERVICE = re.compile(r'service "[^"]+"')


def _resolve_mesh_paths(
    model: dict[str, Any], paths: Sequence[str], raw: Sequence[Mapping[str, Any]], cwd: Path
) -> None:
    """``x-composemesh.consul.token_file`` made absolute against the directory of the last
    file with ``x-composemesh`` (where `check` reads it from), as compose makes its own
    paths absolute: the meshed file names the same file wherever it is written or read."""
    section = model.get("x-composemesh")
    consul = section.get("consul") if isinstance(section, dict) else None
    token_file = consul.get("token_file") if isinstance(consul, dict) else None
    if not isinstance(consul, dict) or not isinstance(token_file, str) or not token_file.strip():
        return
    path = Path(token_file.strip()).expanduser()
    if path.is_absolute():
        return
    owner = next((f for f, doc in zip(reversed(paths), reversed(raw), strict=True)
                  if "x-composemesh" in doc), paths[0] if paths else None)
    base = (cwd / owner).resolve().parent if owner else cwd
    consul["token_file"] = str(base / path)


def _drop_compose_defaults(model: dict[str, Any]) -> None:
    """Forget the empty keys compose prints on its own (``command: null``, ``ipam: {}``, ...)."""
    for svc in (model.get("services") or {}).values():
        if isinstance(svc, dict):
            for key in ("command", "entrypoint"):
                if key in svc and svc[key] is None:
                    del svc[key]
            deploy = svc.get("deploy")
            if isinstance(deploy, dict):
                for key in ("resources", "placement"):
                    if deploy.get(key) == {}:
                        del deploy[key]
    for spec in (model.get("networks") or {}).values():
        if isinstance(spec, dict) and spec.get("ipam") == {}:
            del spec["ipam"]


def _drop_derived_names(
    model: dict[str, Any], raw: Sequence[Mapping[str, Any]], project: str
) -> None:
    """Forget the ``name: <project>_<key>`` compose gives networks, volumes, secrets and
    configs by itself.

    Kept, they would pin the generated file to this project name; dropped, compose derives
    the same names again at `up`. A ``default`` network nobody declared goes entirely.
    """
    for section in ("networks", "volumes", "secrets", "configs"):
        entries = model.get(section)
        if not isinstance(entries, dict):
            continue
        declared: list[Mapping[str, Any]] = [
            doc[section] for doc in raw if isinstance(doc.get(section), Mapping)
        ]
        for key in list(entries):
            spec = entries[key]
            user_specs = [d[key] for d in declared if key in d]
            user_named = any(isinstance(s, Mapping) and "name" in s for s in user_specs)
            if not isinstance(spec, dict) or user_named or spec.get("name") != f"{project}_{key}":
                continue
            del spec["name"]
            if not spec and not user_specs:
                del entries[key]
            elif not spec:
                entries[key] = None
        if not entries:
            del model[section]


# --------------------------------------------------------------------------- running compose


def _run_compose(
    args: Sequence[str],
    names: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(
            ["docker", "compose", *args],
            cwd=cwd,
            env=full_env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise ComposeError(
            "docker compose is not installed: the docker command was not found on PATH"
        ) from None
    except subprocess.TimeoutExpired:
        raise ComposeError(
            f"{', '.join(names)}: docker compose config did not answer in {COMPOSE_TIMEOUT}s"
        ) from None
    if proc.returncode != 0:
        if "is not a docker command" in proc.stderr or "unknown command" in proc.stderr:
            raise ComposeError(
                "docker compose is not installed: the docker CLI has no compose plugin"
            )
        lines = _clean_lines(proc.stderr, names) or [f"exit status {proc.returncode}"]
        errors = [ln for ln in lines if not ln.startswith("warning: ")] or lines
        raise ComposeError(f"{', '.join(names)}: {'; '.join(errors)}")
    return proc


_LOGFMT = re.compile(r'^time="[^"]*"\s+level=(\w+)\s+msg="(.*)"$')


def _clean_lines(stderr: str, names: Sequence[str]) -> list[str]:
    """Compose's stderr as plain one-line messages, with absolute paths as the user wrote them."""
    out = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _LOGFMT.match(line)
        if m:
            level, msg = m.groups()
            msg = msg.replace('\\"', '"')
            line = f"warning: {msg}" if level == "warning" else msg
        for name in names:
            resolved = str(Path(name).resolve())
            if resolved != name:
                line = line.replace(resolved, name)
            if len(names) == 1:  # the caller names the file already
                line = line.removeprefix(f"validating {name}: ")
        out.append(line)
    return out


# --------------------------------------------------------------------------- writing

# Plain scalars that YAML 1.2 (compose's parser) reads as numbers but PyYAML's 1.1 resolver
# would leave unquoted; such strings are written in double quotes.
_YAML12_NUMBER = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$|^0o[0-7]+$")


class _Dumper(yaml.SafeDumper):
    """SafeDumper without anchors, with indented lists and compose-safe strings."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    if _YAML12_NUMBER.match(data):
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style='"')
    return dumper.represent_str(data)


_Dumper.add_representer(str, _represent_str)
