"""The pilot's HTTP API: long-poll snapshot push, ACK/NACK intake, status, readiness.

A proxy is known by the address its request comes from, mapped through the Docker
engine's view to the netns holder that owns that address: never by what it claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from composemesh.model.mesh import MeshState, Workload
from composemesh.model.snapshot import SnapshotError, decode_ack, encode_snapshot
from composemesh.pilot.render import render_snapshot

log = logging.getLogger("composemesh.pilot.server")
LONG_POLL_S = 25.0


@dataclass(frozen=True)
class AckRecord:
    version: str
    ok: bool
    reason: str
    at: float


class Pilot:
    """Holds the current mesh state and the proxies' answers; wakes long-polls on change."""

    def __init__(self, state: MeshState) -> None:
        self.state = state
        self.generation = 0
        self.synced = False
        self.acks: dict[str, AckRecord] = {}
        self.last_seen: dict[str, float] = {}
        self._changed = asyncio.Condition()

    async def publish(self, state: MeshState) -> None:
        async with self._changed:
            self.state = state
            self.generation += 1
            self.synced = True
            self._changed.notify_all()

    async def wait_for_change(self, generation: int, timeout: float) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.generation != generation), timeout
                )

    def caller(self, request: web.Request) -> Workload | None:
        return self.state.workload_by_address(request.remote or "")

    def status(self) -> dict[str, object]:
        rows = []
        for w in self.state.workloads:
            snap = render_snapshot(self.state, w)
            ack = self.acks.get(w.node)
            rows.append(
                {
                    "node": w.node,
                    "compose_service": w.compose_service,
                    "service": w.service,
                    "version": w.version,
                    "addresses": list(w.addresses),
                    "running": w.running,
                    "proxy_container": w.proxy_container,
                    "proxy_healthy": w.proxy_healthy,
                    "snapshot_version": snap.version,
                    "acked_version": ack.version if ack and ack.ok else None,
                    "nacked_version": ack.version if ack and not ack.ok else None,
                    "nack_reason": ack.reason if ack and not ack.ok else "",
                    "in_sync": bool(ack and ack.ok and ack.version == snap.version),
                    "last_seen_s": round(time.time() - self.last_seen[w.node], 1)
                    if w.node in self.last_seen
                    else None,
                }
            )
        return {"project": self.state.project, "synced": self.synced, "proxies": rows}


PILOT_KEY = web.AppKey("pilot", Pilot)


async def get_snapshot(request: web.Request) -> web.StreamResponse:
    pilot = request.app[PILOT_KEY]
    have = request.query.get("version", "")
    deadline = time.monotonic() + float(request.query.get("wait", LONG_POLL_S))
    while True:
        generation = pilot.generation
        workload = pilot.caller(request)
        if workload is None and pilot.synced:
            return web.json_response(
                {
                    "error": f"no workload of project {pilot.state.project!r} "
                    f"has address {request.remote}"
                },
                status=403,
            )
        if workload is not None:
            pilot.last_seen[workload.node] = time.time()
            snapshot = render_snapshot(pilot.state, workload)
            if snapshot.version != have:
                return web.Response(body=encode_snapshot(snapshot), content_type="application/json")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return web.Response(status=304)
        await pilot.wait_for_change(generation, remaining)


async def post_ack(request: web.Request) -> web.Response:
    pilot = request.app[PILOT_KEY]
    workload = pilot.caller(request)
    if workload is None:
        return web.json_response({"error": f"unknown caller {request.remote}"}, status=403)
    try:
        ack = decode_ack(await request.read())
    except SnapshotError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if ack.node and ack.node != workload.node:
        log.warning("ack from %s claims node %s; refused", workload.node, ack.node)
        return web.json_response({"error": "node does not match the caller"}, status=403)
    pilot.acks[workload.node] = AckRecord(ack.version, ack.ok, ack.reason, time.time())
    pilot.last_seen[workload.node] = time.time()
    if ack.ok:
        log.info("ACK %s %s", workload.node, ack.version)
    else:
        log.warning("NACK %s %s: %s", workload.node, ack.version, ack.reason)
    return web.json_response({"ok": True})


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[PILOT_KEY].status())


async def get_ready(request: web.Request) -> web.Response:
    ready = request.app[PILOT_KEY].synced
    return web.Response(status=200 if ready else 503, text="ready" if ready else "syncing")


def make_app(pilot: Pilot) -> web.Application:
    app = web.Application()
    app[PILOT_KEY] = pilot
    app.router.add_get("/v1/snapshot", get_snapshot)
    app.router.add_post("/v1/ack", post_ack)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/healthz/ready", get_ready)
    return app
