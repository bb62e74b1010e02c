"""The proxy's HTTP faces: admin (15000), health (15021) and Prometheus (15090), and the probe."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import hdrs, web

from composemesh import __version__
from composemesh.model.snapshot import encode_snapshot
from composemesh.proxy.http import HttpPath
from composemesh.proxy.identity import WorkloadIdentity
from composemesh.proxy.pilot_client import ConfigStore, PilotClient
from composemesh.proxy.stats import ProxyStats, render

LIVE = "LIVE"  # Envoy's word for a ready server
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # without OpenMetrics


@dataclass
class AdminContext:
    """What the HTTP faces read: counters, config, listener state, and fixed facts."""

    stats: ProxyStats
    store: ConfigStore
    pilot: PilotClient | None = None
    http: HttpPath | None = None  # the outbound HTTP path: its routing table and pool
    listeners: dict[str, bool] = field(default_factory=dict)  # direction -> bound
    info: dict[str, Any] = field(default_factory=dict)  # claims from the environment, pilot URL
    started_at: float = field(default_factory=time.time)
    identity: WorkloadIdentity | None = None  # the workload certificate and its renewal

    def readiness(self) -> tuple[bool, str]:
        """Ready once both capture listeners are bound, a first snapshot is applied and the
        proxy holds a workload certificate that has not expired (if its pilot issues them)."""
        if not self.listeners or not all(self.listeners.values()):
            return False, "capture listeners are not bound yet"
        if self.store.snapshot is None:
            return False, "no snapshot applied from the pilot yet"
        if self.identity is not None:
            ok, reason = self.identity.readiness()
            if not ok:
                return False, reason
        return True, LIVE

    def certs(self) -> dict[str, Any]:
        """`/certs`: the workload certificate held (public parts only: never the key)."""
        if self.identity is None:
            return {"identity": None, "reason": "this proxy keeps no workload certificate"}
        return self.identity.describe()

    def ack_state(self) -> str:
        """One of: none, pending (the answer is not delivered yet), ACK, NACK."""
        answer = self.store.last_answer
        if answer is None:
            return "none"
        if self.pilot is not None and self.pilot.pending is answer:
            return "pending"
        return "ACK" if answer.ok else "NACK"

    def config_dump(self) -> dict[str, Any]:
        snapshot = self.store.snapshot
        answer = self.store.last_answer
        pilot = self.pilot
        return {
            "version": snapshot.version if snapshot else None,
            "snapshot": json.loads(encode_snapshot(snapshot)) if snapshot else None,
            "applied_at": self.store.applied_at,
            "ack_state": self.ack_state(),
            "last_answer": asdict(answer) if answer else None,
            "seen_version": self.store.seen_version,
            "routing_table": self.http.router.table.to_json() if self.http else None,
            "upstream_pool": None if self.http is None else {
                "opened": self.http.pool.opened,
                "reused": self.http.pool.reused,
                "idle": self.http.pool.idle_count(),
                "open": len(self.http.pool.connections),
            },
            "pilot": None if pilot is None else {
                "url": pilot.url,
                "last_contact": pilot.last_contact,
                "failures": pilot.failures,
                "last_error": pilot.last_error,
            },
            "identity": self.certs(),
        }

    def server_info(self) -> dict[str, Any]:
        ready, reason = self.readiness()
        snapshot = self.store.snapshot
        return {
            "state": LIVE if ready else "INITIALIZING",
            "reason": reason,
            "composemesh_version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "identity": asdict(snapshot.identity) if snapshot else None,
            "listeners": dict(self.listeners),
            **self.info,
        }


def build_admin_app(ctx: AdminContext) -> web.Application:
    """Port 15000: /ready, /stats, /config_dump, /certs, /server_info, /stats/prometheus."""

    async def ready(request: web.Request) -> web.Response:
        return _ready_response(ctx, LIVE)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({**ctx.stats.totals(), "http": ctx.stats.http_totals(),
                                  "http_inbound": ctx.stats.http_inbound_totals()})

    async def config_dump(request: web.Request) -> web.Response:
        return web.json_response(ctx.config_dump())

    async def server_info(request: web.Request) -> web.Response:
        return web.json_response(ctx.server_info())

    async def certs(request: web.Request) -> web.Response:
        return web.json_response(ctx.certs())

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/stats", stats)
    app.router.add_get("/config_dump", config_dump)
    app.router.add_get("/server_info", server_info)
    app.router.add_get("/certs", certs)
    app.router.add_get("/stats/prometheus", _prometheus_handler(ctx))
    return app


def build_health_app(ctx: AdminContext) -> web.Application:
    """Port 15021: /healthz/ready, 200 when ready, else 503 with the reason."""

    async def healthz_ready(request: web.Request) -> web.Response:
        return _ready_response(ctx, "")

    app = web.Application()
    app.router.add_get("/healthz/ready", healthz_ready)
    return app


def build_prometheus_app(ctx: AdminContext) -> web.Application:
    """Port 15090: /stats/prometheus."""
    app = web.Application()
    app.router.add_get("/stats/prometheus", _prometheus_handler(ctx))
    return app


def _ready_response(ctx: AdminContext, ok_text: str) -> web.Response:
    ready, reason = ctx.readiness()
    if ready:
        return web.Response(text=ok_text + "\n" if ok_text else "")
    return web.Response(status=503, text=f"not ready: {reason}\n")


def _prometheus_handler(ctx: AdminContext) -> Any:
    """/stats/prometheus: OpenMetrics if the scraper accepts it (Prometheus does), else text
    0.0.4. prometheus_client's encoders are pure Python and take a while with many series,
    so the exposition is written in a thread: the data path's event loop keeps running
    (sharing the GIL) instead of stopping for the whole scrape."""

    async def prometheus(request: web.Request) -> web.Response:
        body, content_type = await asyncio.to_thread(
            render, ctx.stats, request.headers.get(hdrs.ACCEPT))
        return web.Response(body=body, headers={"Content-Type": content_type})

    return prometheus
