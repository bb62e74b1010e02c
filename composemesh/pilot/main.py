"""Runs the pilot: the one place that owns its asyncio lifecycle (CA, source watch, API server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
from dataclasses import replace

from aiohttp import web

from composemesh.errors import ConfigError, EngineError, MeshError
from composemesh.model import wellknown as wk
from composemesh.model.egress import EgressSettings
from composemesh.model.ingress import IngressSettings
from composemesh.model.mesh import MeshState
from composemesh.model.settings import MeshSettings, parse_settings
from composemesh.model.wire import ContractError, decode
from composemesh.pilot.ca_service import CAService
from composemesh.pilot.server import Pilot, make_app
from composemesh.pilot.sources.docker.controller import DockerSource
from composemesh.pilot.sources.docker.convert import PROJECT_LABEL
from composemesh.pilot.sources.docker.engine_api import EngineAPI
from composemesh.pilot.store import OverrideStore
from composemesh.pilot.traffic import TrafficMonitor

log = logging.getLogger("composemesh.pilot")


def settings_from_env() -> MeshSettings:
    """The section as the injector copied it, and the ingress as `check` resolved it."""
    raw = os.environ.get("COMPOSEMESH_SETTINGS", "")
    try:
        settings = parse_settings(json.loads(raw) if raw else None)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"COMPOSEMESH_SETTINGS is not JSON: {exc}") from None
    for env, field, kind in ((wk.ENV_INGRESS, "ingress", IngressSettings),
                             (wk.ENV_EGRESS, "egress", EgressSettings)):
        given = os.environ.get(env)
        if given:
            try:
                settings = replace(settings, **{field: decode(given, kind)})  # type: ignore[arg-type]
            except ContractError as exc:
                raise ConfigError(f"{env}: {exc}") from None
    return settings


async def own_project(api: EngineAPI) -> str:
    """The compose project the pilot belongs to: its own container's label, unless set."""
    if os.environ.get("COMPOSEMESH_PROJECT"):
        return os.environ["COMPOSEMESH_PROJECT"]
    me = await api.inspect(socket.gethostname())
    project = (me.get("Config", {}).get("Labels") or {}).get(PROJECT_LABEL)
    if not project:
        raise EngineError("the pilot runs outside a compose project; set COMPOSEMESH_PROJECT")
    return str(project)


ENV_SOCKET = "COMPOSEMESH_PILOT_SOCKET"
SOCKET_MODE = 0o666  # who may connect is bounded by who mounts the volume; each call is attested


async def serve(path: str | None = None) -> None:
    """The API on the Unix socket ``path`` (by default ``/run/composemesh/pilot.sock``), on no
    network port: proxies reach it through the socket volume, the host's user through the
    volume's directory or ``docker exec``."""
    path = path or os.environ.get(ENV_SOCKET) or wk.PILOT_SOCKET
    settings = settings_from_env()
    api = EngineAPI()
    runner: web.AppRunner | None = None
    watch: asyncio.Task[None] | None = None
    scrape: asyncio.Task[None] | None = None
    try:
        project = await own_project(api)
        ca = CAService.load_or_create(settings, project)
        pilot = Pilot(MeshState(project=project, settings=settings), OverrideStore(), ca)
        source = DockerSource(api, project, pilot.update_workloads)
        runner = web.AppRunner(make_app(pilot), access_log=None)
        await runner.setup()
        await web.SockSite(runner, bind_socket(path)).start()
        watch = asyncio.create_task(source.run(), name="docker-watch")
        pilot.traffic = TrafficMonitor(lambda: pilot.state.workloads)
        scrape = asyncio.create_task(pilot.traffic.run(), name="traffic-scrape")
        log.info("pilot of project %s listening on %s (no network port)", project, path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        for task in (scrape, watch):  # in reverse order of start
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if runner:
            await runner.cleanup()
        await api.close()


def bind_socket(path: str) -> socket.socket:
    """A listening Unix socket at ``path``, replacing the socket a previous pilot left there."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"{path} exists and is not a socket; remove it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, SOCKET_MODE)
    sock.listen(256)
    return sock


def run_pilot() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve())
    except MeshError as exc:  # a root that cannot serve, an engine that does not answer
        print(f"composemesh pilot: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)

