"""The proxy process: owns every listener, HTTP server and background task, and their shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from composemesh.ca.spiffe import spiffe_id
from composemesh.errors import MeshError
from composemesh.model.limits import ProxyLimits, limits_from_env
from composemesh.model.snapshot import ProxyIdentity, Snapshot
from composemesh.model.wellknown import (
    DEFAULT_VERSION,
    EGRESS_PORT,
    ENV_GATEWAY,
    GATEWAY_EAST_WEST,
    GATEWAY_EGRESS,
    GATEWAY_INGRESS,
    INGRESS_CERT_DIR,
    INGRESS_HTTP_PORT,
    INGRESS_HTTPS_PORT,
    PILOT_URL,
    PORT_ADMIN,
    PORT_DNS,
    PORT_EAST_WEST,
    PORT_HEALTH,
    PORT_INBOUND,
    PORT_OUTBOUND,
    PORT_PROMETHEUS,
)
from composemesh.proxy.access_log import AccessLog, nonblocking_fd
from composemesh.proxy.admin import (
    AdminContext,
    build_admin_app,
    build_health_app,
    build_prometheus_app,
)
from composemesh.proxy.dns import start_dns
from composemesh.proxy.east_west import EastWestGateway, start_east_west
from composemesh.proxy.egress import EgressGateway, start_egress
from composemesh.proxy.http import HttpPath
from composemesh.proxy.identity import WorkloadCertificate, WorkloadIdentity, trust_bundle_applier
from composemesh.proxy.inbound import InboundForwarder
from composemesh.proxy.ingress import start_ingress
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.original_dst import original_dst
from composemesh.proxy.pilot_client import ConfigStore, PilotClient
from composemesh.proxy.router import (
    InboundConfig,
    InboundRouter,
    Router,
    Routers,
    RouterSwitch,
    egress_table,
    inbound_config,
    ingress_table,
)
from composemesh.proxy.stats import (
    INBOUND,
    OUTBOUND,
    PeerLabels,
    ProxyStats,
    workload_of,
)
from composemesh.proxy.table import EMPTY_TABLE, ServiceProtocols, table_from_snapshot
from composemesh.proxy.tcp import CONNECT_TIMEOUT, Forwarder, Resolver
from composemesh.proxy.telemetry import Observer
from composemesh.proxy.upstream import UpstreamPool

ENV_PILOT_URL = "COMPOSEMESH_PILOT_URL"
ENV_SERVICE = "COMPOSEMESH_SERVICE"
ENV_VERSION = "COMPOSEMESH_VERSION"
ENV_COMPOSE_SERVICE = "COMPOSEMESH_COMPOSE_SERVICE"
ENV_ADMIN_HOST = "COMPOSEMESH_ADMIN_HOST"
DEFAULT_PILOT_URL = PILOT_URL  # the socket volume, mounted read-only
HTTP_SHUTDOWN_TIMEOUT = 1.0  # seconds an admin request may still take when we stop

log = logging.getLogger("composemesh.proxy")
T = TypeVar("T")


class ProxyError(MeshError):
    """The proxy could not start (a port already taken, most often) or keep running."""


@dataclass(frozen=True)
class ProxyConfig:
    """How one proxy runs; ``from_env`` reads what the injector put in its container."""

    pilot_url: str = DEFAULT_PILOT_URL
    service: str = ""  # claimed (informational) until the pilot's snapshot attests it
    version: str = DEFAULT_VERSION
    compose_service: str = ""
    capture_host: str = "0.0.0.0"
    outbound_port: int = PORT_OUTBOUND
    inbound_port: int = PORT_INBOUND
    admin_host: str = "127.0.0.1"  # config dump stays inside the namespace, as Envoy's does
    admin_port: int = PORT_ADMIN
    health_host: str = "0.0.0.0"
    health_port: int = PORT_HEALTH
    prometheus_host: str = "0.0.0.0"
    prometheus_port: int = PORT_PROMETHEUS
    connect_timeout: float = CONNECT_TIMEOUT
    resolver: Resolver = original_dst  # tests stand in for SO_ORIGINAL_DST here
    limits: ProxyLimits = ProxyLimits()  # noqa: RUF009 (frozen)
    gateway: str = ""  # "ingress": the ingress gateway's listeners too; "": a sidecar
    ingress_http_port: int | None = INGRESS_HTTP_PORT
    ingress_https_port: int | None = INGRESS_HTTPS_PORT
    ingress_cert_dir: str = INGRESS_CERT_DIR
    egress_port: int = EGRESS_PORT
    east_west_port: int = PORT_EAST_WEST
    dns_port: int | None = None  # the resolver of imported names (UDP, loopback); None: none

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ProxyConfig:
        return cls(
            pilot_url=environ.get(ENV_PILOT_URL) or DEFAULT_PILOT_URL,
            service=environ.get(ENV_SERVICE, ""),
            version=environ.get(ENV_VERSION) or DEFAULT_VERSION,
            compose_service=environ.get(ENV_COMPOSE_SERVICE, ""),
            admin_host=environ.get(ENV_ADMIN_HOST) or "127.0.0.1",
            limits=limits_from_env(environ),
            gateway=environ.get(ENV_GATEWAY, ""),
            dns_port=PORT_DNS,
        )

    def claimed_identity(self) -> ProxyIdentity:
        """Who the environment says we are; used for metric labels until a snapshot arrives."""
        return ProxyIdentity(node="", project="", compose_service=self.compose_service,
                             service=self.service, version=self.version)


def routing_applier(
    switch: RouterSwitch, http: HttpPath | None = None, rng: random.Random | None = None,
    inbound_http: HttpPath | None = None, tls: MeshTls | None = None,
    observer: Observer | None = None,
) -> Callable[[Snapshot], Callable[[], None]]:
    """Applier: a snapshot's outbound and inbound routers, swapped in as one (``switch``).

    Decoding is the part that can fail (SnapshotError: the NACK reason); both routers are
    built from it whole before anything changes. Without ``http`` the mesh services' HTTP
    ports are carried as TCP; without ``inbound_http``, the app's.
    """

    def prepare(snapshot: Snapshot) -> Callable[[], None]:
        table = table_from_snapshot(snapshot)
        me = workload_of(snapshot.identity)
        if tls is not None and snapshot.settings.trust_domain:  # what its certificate names
            with contextlib.suppress(ValueError):
                me = replace(me, principal=spiffe_id(snapshot.settings.trust_domain,
                                                     snapshot.identity.project,
                                                     snapshot.identity.service))
        config = inbound_config(snapshot, me, table.protocols.get(me.app, ServiceProtocols()))
        router = Router(table, me, rng=rng, http=http.entry if http is not None else None,
                        previous=switch.current.outbound, tls=tls,
                        egress=egress_table(snapshot.settings.egress), networks=config.networks,
                        black_hole=http.black_hole_entry if http is not None else None)
        in_router = InboundRouter(
            config, inbound_http.inbound_entry if inbound_http is not None else None, rng)
        routers = Routers(router, in_router, ingress_table(snapshot.settings.ingress))
        trust_domain = snapshot.settings.trust_domain
        federated = snapshot.settings.federated

        telemetry = snapshot.settings.telemetry

        def commit() -> None:
            if tls is not None:
                tls.name(trust_domain, snapshot.identity.project, federated)
            switch.current = routers
            if observer is not None:
                observer.apply(telemetry)

        return commit

    return prepare


@dataclass
class DataPath:
    """A sidecar's data path, wired in one place: both capture listeners' forwarders, both
    HTTP paths, the mTLS contexts they share, and the applier that swaps a snapshot's
    decisions into all of them at once. ``serve`` runs it; bench/mtls.py runs the same."""

    stats: ProxyStats
    tls: MeshTls
    switch: RouterSwitch
    outbound: Forwarder
    inbound: InboundForwarder
    http: HttpPath
    inbound_http: HttpPath
    apply: Callable[[Snapshot], Callable[[], None]]  # a ConfigStore applier
    observer: Observer | None = None  # access logs and spans, set by each snapshot

    def close(self) -> None:
        """Close both HTTP paths' pooled connections (once the listeners are closed)."""
        self.http.close()
        self.inbound_http.close()


def data_path(me: PeerLabels, ca_offered: Callable[[], bool | None], *,
              resolver: Resolver = original_dst, connect_timeout: float = CONNECT_TIMEOUT,
              rng: random.Random | None = None, tls: MeshTls | None = None,
              limits: ProxyLimits = ProxyLimits(),  # noqa: B008 (frozen)
              observer: Observer | None = None) -> DataPath:
    """A new data path for workload ``me`` (its metric labels until a snapshot names it);
    ``ca_offered`` says whether the pilot issues certificates (see InboundForwarder);
    ``tls``: the mTLS contexts, filled by the identity's rotations (new and empty if None);
    ``limits``: what hostile clients are held to (the app's ``composemesh.proxy.*`` labels);
    ``observer``: access logs and spans (None: neither, and no request id added)."""
    stats, tls = ProxyStats(), tls or MeshTls()
    switch = RouterSwitch()
    outbound = Forwarder(OUTBOUND, stats, switch.choose, resolver=resolver,
                         connect_timeout=connect_timeout, tls=tls, limits=limits,
                         observer=observer)
    inbound = InboundForwarder(stats, switch, tls=tls, ca_offered=ca_offered, resolver=resolver,
                               connect_timeout=connect_timeout, limits=limits,
                               observer=observer)
    http = HttpPath(stats, UpstreamPool(tls=tls, limits=limits), limits=limits, switch=switch,
                    observer=observer)
    inbound_http = HttpPath(stats, limits=limits, switch=switch, direction=INBOUND,
                            observer=observer)
    # until the first snapshot: everything passes through, named as ``me``
    switch.current = Routers(Router(EMPTY_TABLE, me), InboundRouter(
        InboundConfig(me=me, node=""), inbound_http.inbound_entry))
    apply = routing_applier(switch, http, rng, inbound_http=inbound_http, tls=tls,
                            observer=observer)
    return DataPath(stats, tls, switch, outbound, inbound, http, inbound_http, apply, observer)


def tls_rotator(tls: MeshTls, identity: WorkloadIdentity) -> Callable[[WorkloadCertificate], None]:
    """An ``on_rotate`` listener: new TLS contexts from the identity's certificate and bundle.

    Connections already open keep theirs, so a rotation drops none."""

    def rotated(_cert: WorkloadCertificate) -> None:
        current = identity.current()
        if current is None:
            return
        _, key_pem, chain_pem, bundle_pem = current
        tls.use(chain_pem, key_pem, bundle_pem)
        log.info("mTLS contexts rebuilt (%d)", tls.rebuilt)

    return rotated


async def serve(config: ProxyConfig, stop: asyncio.Event | None = None,
                context: list[AdminContext] | None = None) -> None:
    """Run the proxy until ``stop`` is set; then close everything in reverse order of opening.

    ``context``, when given, receives the AdminContext (tests read the live state from it).
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    claimed = config.compose_service or config.service
    identity = WorkloadIdentity(config.pilot_url, service=claimed)
    observer = Observer(AccessLog(nonblocking_fd(1)))  # stdout: one JSON line per request
    path = data_path(workload_of(config.claimed_identity()), lambda: identity.offered,
                     resolver=config.resolver, connect_timeout=config.connect_timeout,
                     limits=config.limits, observer=observer)
    forwarders: dict[str, Forwarder] = {OUTBOUND: path.outbound, INBOUND: path.inbound}
    identity.on_rotate.append(tls_rotator(path.tls, identity))
    store = ConfigStore([path.apply, trust_bundle_applier(identity)])
    pilot = PilotClient(config.pilot_url, store, service=claimed, held=identity.held)
    ctx = AdminContext(
        stats=path.stats, store=store, pilot=pilot, http=path.http,
        identity=identity,
        listeners=dict.fromkeys(forwarders, False),
        info={"pilot_url": config.pilot_url, "claimed": {
            "service": config.service, "version": config.version,
            "compose_service": config.compose_service}},
    )
    if context is not None:
        context.append(ctx)

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(observer.close)  # last: the final lines and spans go out
        stack.callback(path.close)  # once the listeners are closed: no new connections
        ports = {OUTBOUND: config.outbound_port, INBOUND: config.inbound_port}
        for direction, forwarder in forwarders.items():
            server = await _listen(
                loop.create_server(forwarder, config.capture_host, ports[direction],
                                   reuse_address=True, backlog=1024),
                config.capture_host, ports[direction])
            stack.push_async_callback(_close_listener, server, forwarder)
            ctx.listeners[direction] = True
        for app, host, port in (
            (build_admin_app(ctx), config.admin_host, config.admin_port),
            (build_health_app(ctx), config.health_host, config.health_port),
            (build_prometheus_app(ctx), config.prometheus_host, config.prometheus_port),
        ):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=HTTP_SHUTDOWN_TIMEOUT)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await _listen(site.start(), host, port)
        if config.gateway == GATEWAY_EGRESS:
            egress = EgressGateway(path.tls, path.switch)
            stack.callback(egress.close)
            server = await _listen(start_egress(egress, port=config.egress_port),
                                   config.capture_host, config.egress_port)
            stack.push_async_callback(_close_server, server)
        if config.gateway == GATEWAY_EAST_WEST:
            east_west = EastWestGateway(path.switch, path.stats)
            stack.callback(east_west.close)
            server = await _listen(start_east_west(east_west, port=config.east_west_port),
                                   config.capture_host, config.east_west_port)
            stack.push_async_callback(_close_server, server)
        if not config.gateway and config.dns_port is not None:  # a sidecar: imported names
            resolver = await _listen(
                start_dns(lambda: path.switch.current.outbound.table.dns,
                               port=config.dns_port),
                "127.0.0.1", config.dns_port)
            stack.callback(resolver.close)
        if config.gateway == GATEWAY_INGRESS:
            for server in await _listen(
                    start_ingress(path.http, http_port=config.ingress_http_port,
                                  https_port=config.ingress_https_port,
                                  cert_dir=Path(config.ingress_cert_dir)),
                    config.capture_host, config.ingress_https_port or 0):
                stack.push_async_callback(_close_server, server)
        pilot_task = loop.create_task(pilot.run(), name="composemesh-pilot-client")
        stack.push_async_callback(_cancel, pilot_task)
        identity_task = loop.create_task(identity.run(), name="composemesh-identity")
        stack.push_async_callback(_cancel, identity_task)
        log.info("proxy listening: outbound %s, inbound %s, admin %s:%s; pilot %s",
                 config.outbound_port, config.inbound_port, config.admin_host,
                 config.admin_port, config.pilot_url)
        stopping = loop.create_task(stop.wait())
        done, _ = await asyncio.wait({stopping, pilot_task, identity_task},
                                     return_when=asyncio.FIRST_COMPLETED)
        for task, what in ((pilot_task, "pilot client"), (identity_task, "identity")):
            if task in done and not task.cancelled() and task.exception():
                stopping.cancel()
                raise ProxyError(f"{what} stopped: {task.exception()!r}")
        log.info("proxy stopping")


def run_proxy(environ: Mapping[str, str] | None = None) -> int:
    """`composemesh proxy`: serve until SIGTERM/SIGINT; 0 on a clean stop, 1 if it cannot start."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ProxyConfig.from_env(os.environ if environ is None else environ)
        _run(_main(config))
    except MeshError as exc:
        print(f"composemesh proxy: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


async def _main(config: ProxyConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # PID 1: no default actions, so ours
        loop.add_signal_handler(signum, stop.set)
    await serve(config, stop)


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def _listen(opening: Awaitable[T], host: str, port: int) -> T:
    try:
        return await opening
    except OSError as exc:
        raise ProxyError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


async def _close_listener(server: asyncio.Server, forwarder: Forwarder) -> None:
    server.close()  # stop accepting ...
    forwarder.abort_all()  # ... and drop what is in flight
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), HTTP_SHUTDOWN_TIMEOUT)


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), HTTP_SHUTDOWN_TIMEOUT)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
