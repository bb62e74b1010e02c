"""Runs the pilot: the one place that owns its asyncio lifecycle (CA, source watch, API server,
monitoring listener)."""

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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from composemesh.errors import ConfigError, EngineError, MeshError
from composemesh.model import wellknown as wk
from composemesh.model.egress import EgressSettings
from composemesh.model.ingress import IngressSettings
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.settings import MeshSettings, parse_settings
from composemesh.model.wire import ContractError, decode
from composemesh.pilot.ca_service import CAService
from composemesh.pilot.metrics import PilotMetrics, counted
from composemesh.pilot.monitoring import make_monitoring_app, start_monitoring
from composemesh.pilot.server import Pilot, make_app
from composemesh.pilot.sources.consul import ConsulSource
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


async def own_networks(api: EngineAPI) -> frozenset[str] | None:
    """The names of the networks the pilot's own container is on; None where the engine
    does not know it (a pilot run outside a container): the proxies are then scraped and
    listed at their first address (``traffic.metrics_address``)."""
    try:
        me = await api.inspect(socket.gethostname())
    except EngineError as exc:
        log.warning("cannot tell which networks the pilot is on: %s", exc)
        return None
    found = ((me.get("NetworkSettings") or {}).get("Networks")) or {}
    return frozenset(str(name) for name in found) if isinstance(found, dict) and found else None


class CountedEngineAPI(EngineAPI):
    """The engine's API, counting each event its stream delivers (``pilot_docker_events``)."""

    def __init__(self, metrics: PilotMetrics, path: str | None = None) -> None:
        super().__init__(path)
        self._metrics = metrics

    def events(self, *, project: str) -> AsyncIterator[dict[str, Any]]:
        return counted(super().events(project=project), self._metrics.docker_events.inc)


async def serve_monitoring(pilot: Pilot, networks: frozenset[str] | None,
                           port: int = wk.PORT_PILOT_MONITORING) -> web.AppRunner | None:
    """The read-only monitoring listener on ``port`` of every interface (IPv4 and IPv6; IPv4
    alone where IPv6 cannot be bound); None (logged) if it cannot bind at all: the pilot serves
    its API and pushes without it."""
    for host, where in ((None, "every interface"), ("0.0.0.0", "every IPv4 interface")):
        app = make_monitoring_app(pilot.metrics, lambda: pilot.state, networks)
        try:
            runner = await start_monitoring(app, host, port)
        except OSError as exc:
            failure = exc
            continue
        log.info("monitoring (/metrics, /sd/prometheus) on port %d of %s", port, where)
        return runner
    log.error("monitoring listener not started: cannot listen on port %d: %s", port, failure)
    return None


def consul_source(settings: MeshSettings, project: str, pilot: Pilot) -> ConsulSource | None:
    """The Consul source when ``x-composemesh.consul`` is set (None otherwise), its views
    going to ``pilot.update_consul``."""
    consul = settings.consul
    if consul is None:
        return None
    return ConsulSource(consul, project=project, trust_domain=settings.trust_domain,
                        on_view=pilot.update_consul)


def feeding(source: ConsulSource | None,
            on_change: Callable[[tuple[Workload, ...]], Awaitable[None]],
            ) -> Callable[[tuple[Workload, ...]], Awaitable[None]]:
    """``on_change`` (the pilot's), telling ``source`` of each delivery of workloads too."""
    if source is None:
        return on_change

    async def both(workloads: tuple[Workload, ...]) -> None:
        source.workloads_changed(workloads)
        await on_change(workloads)

    return both


ENV_SOCKET = "COMPOSEMESH_PILOT_SOCKET"
SOCKET_MODE = 0o666  # who may connect is bounded by who mounts the volume; each call is attested


async def serve(path: str | None = None) -> None:
    """The API on the Unix socket ``path`` (by default ``/run/composemesh/pilot.sock``), on no
    network port: proxies reach it through the socket volume, the host's user through the
    volume's directory or ``docker exec``."""
    path = path or os.environ.get(ENV_SOCKET) or wk.PILOT_SOCKET
    settings = settings_from_env()
    metrics = PilotMetrics()
    api = CountedEngineAPI(metrics)
    runner: web.AppRunner | None = None
    monitoring: web.AppRunner | None = None
    watch: asyncio.Task[None] | None = None
    scrape: asyncio.Task[None] | None = None
    consul: asyncio.Task[None] | None = None
    try:
        project = await own_project(api)
        ca = CAService.load_or_create(settings, project)
        local = frozenset(n for n in os.environ.get(wk.ENV_LOCAL_NAMES, "").split(",") if n)
        pilot = Pilot(MeshState(project=project, settings=settings, local_names=local),
                      OverrideStore(), ca,
                      metrics=metrics)
        networks = await own_networks(api)
        exporter = consul_source(settings, project, pilot)
        source = DockerSource(api, project, feeding(exporter, pilot.update_workloads))
        runner = web.AppRunner(make_app(pilot), access_log=None)
        await runner.setup()
        await web.SockSite(runner, bind_socket(path)).start()
        log.info("pilot of project %s: its API on %s (no network port)", project, path)
        monitoring = await serve_monitoring(pilot, networks)
        watch = asyncio.create_task(source.run(), name="docker-watch")
        if exporter is not None:
            consul = asyncio.create_task(exporter.run(), name="consul-source")
        pilot.traffic = TrafficMonitor(lambda: pilot.state.workloads, networks=networks)
        scrape = asyncio.create_task(pilot.traffic.run(), name="traffic-scrape")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        # in reverse order of start; Consul first: its registrations go before anything else
        for task in (consul, scrape, watch):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if monitoring:
            await monitoring.cleanup()
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

