"""The pilot's HTTP API: long-poll snapshot push, ACK/NACK intake, certificates, status.

A proxy is known by the address its request comes from, mapped through the Docker
engine's view to the netns holder that owns that address: never by what it claims. The
same attestation names the identity a proxy's certificate carries (``POST /v1/certificate``).

When the pilot runs a CA, one app is served twice: plaintext on 15010 (the attested
bootstrap ``POST /v1/certificate``, ``GET /v1/ca``, status, readiness, route changes and
root rotation from the host) and over mutual TLS on 15012, where alone snapshots and ACKs
are served, to a caller whose certificate names the identity attested at its address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from composemesh.ca import IssuanceRefused, RotationError, fingerprint
from composemesh.ca.authority import MAX_CSR_BYTES
from composemesh.ca.tls import peer_spiffe
from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.routing_config import apply_weights
from composemesh.model.settings import MeshSettings
from composemesh.model.snapshot import Snapshot, SnapshotError, decode_ack, encode_snapshot
from composemesh.pilot.build import build_state, default_split, service_versions
from composemesh.pilot.ca_service import ROTATION_STEPS, CAService
from composemesh.pilot.render import render_snapshot
from composemesh.pilot.store import OverrideStore
from composemesh.pilot.traffic import TrafficMonitor

log = logging.getLogger("composemesh.pilot.server")
LONG_POLL_S = 25.0
PLAINTEXT_REFUSED = f"snapshots are served over mutual TLS on port {wk.PORT_PILOT_TLS}"


@dataclass(frozen=True)
class AckRecord:
    version: str
    ok: bool
    reason: str
    at: float


class Pilot:
    """Holds the current mesh state and the proxies' answers; wakes long-polls on change."""

    def __init__(
        self, state: MeshState, store: OverrideStore | None = None, ca: CAService | None = None
    ) -> None:
        self.state = state
        self.store = store
        self.ca = ca  # None: this pilot issues no certificates (tests of routing alone)
        self.traffic: TrafficMonitor | None = None  # request/error rates, when scraping
        self.overrides: dict[str, dict[str, int]] = store.load() if store else {}
        self.generation = 0
        self.synced = False
        self.acks: dict[str, AckRecord] = {}
        self.last_seen: dict[str, float] = {}
        self._changed = asyncio.Condition()

    async def update_workloads(self, workloads: tuple[Workload, ...]) -> None:
        """A new view from the Docker source: rebuild and publish."""
        await self.publish(self._build(workloads, self.state.settings))

    def _build(self, workloads: tuple[Workload, ...], settings: MeshSettings) -> MeshState:
        state = build_state(self.state.project, workloads, settings, self.overrides, self.state)
        for error in state.errors:
            log.error("kept the last good config of %s", error)
        return state

    async def set_weights(self, service: str, weights: dict[str, int]) -> dict[str, object]:
        """`composemesh route`: validate, persist, publish. Raises ConfigError (not applied)."""
        versions = service_versions(self.state.workloads)
        if service not in self.state.routing or service not in versions:
            known = ", ".join(sorted(self.state.routing)) or "none"
            raise ConfigError(f"unknown mesh service {service!r} (known: {known})", field="route")
        old = default_split(self.state.routing[service])
        new_routing = apply_weights(self.state.routing[service], weights, tuple(versions[service]))
        overrides = {**self.overrides, service: dict(weights)}
        if self.store:
            self.store.save(overrides)
        self.overrides = overrides
        await self.publish(self._build(self.state.workloads, self.state.settings))
        return {
            "service": service,
            "old": old,
            "new": default_split(new_routing),
            "generation": self.generation,
        }

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

    def snapshot_for(self, workload: Workload) -> Snapshot:
        """What ``workload``'s proxy is sent: its view of the mesh, the CA's trust bundle and
        which root signs now."""
        if self.ca is None:
            return render_snapshot(self.state, workload)
        return render_snapshot(
            self.state, workload, self.ca.trust_bundle_pem, fingerprint(self.ca.root_cert)
        )

    def identity_of(self, workload: Workload) -> dict[str, object]:
        """The status columns of the certificate last issued to ``workload``'s proxy."""
        record = self.ca.record_for(workload) if self.ca is not None else None
        return {
            "identity": record.spiffe if record else None,
            "cert_not_after": record.not_after if record else None,
            "cert_serial": record.serial if record else None,
            "cert_issuer_fingerprint": (record.issuer_fingerprint or None) if record else None,
        }

    async def rotate_root(self, step: str) -> dict[str, object]:
        """One step of a root rotation, then a push: every snapshot names the new bundle or
        signing root. RotationError (nothing changed) for a step out of order or a user's
        root; OSError if the roots cannot be stored (nothing changed either)."""
        if self.ca is None:
            raise RotationError("this pilot runs no CA")
        self.ca.rotate(step)
        await self.publish(self.state)
        return {**self.ca.info(), "step": step, "generation": self.generation}

    def status(self) -> dict[str, object]:
        rows = []
        for w in self.state.workloads:
            snap = self.snapshot_for(w)
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
                    **self.identity_of(w),
                }
            )
        versions = service_versions(self.state.workloads)
        traffic = self.traffic.current() if self.traffic is not None else {}
        services = {
            name: {
                "split": default_split(routing),
                "overridden": name in self.overrides,
                "traffic": {
                    version: {"rps": round(rate.requests_per_s, 2),
                              "error_ratio": round(rate.error_ratio, 4)}
                    for (svc, version), rate in traffic.items()
                    if svc == name
                },
                "endpoints": {
                    v: sum(
                        1
                        for w in self.state.workloads
                        if w.service == name and w.version == v and w.running
                    )
                    for v in versions.get(name, {})
                },
            }
            for name, routing in sorted(self.state.routing.items())
        }
        return {
            "project": self.state.project,
            "synced": self.synced,
            "proxies": rows,
            "services": services,
            "errors": list(self.state.errors),
            "generation": self.generation,
        }


PILOT_KEY = web.AppKey("pilot", Pilot)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def refuse_plaintext(pilot: Pilot, request: web.Request) -> web.Response | None:
    """403 for a snapshot or ACK asked for without TLS, when the pilot runs a CA."""
    if pilot.ca is None or _ssl_object(request) is not None:
        return None
    log.info("%s %s over plaintext from %s refused", request.method, request.path, request.remote)
    return _error(403, PLAINTEXT_REFUSED)


def refuse_peer(pilot: Pilot, request: web.Request, workload: Workload) -> web.Response | None:
    """403 unless the caller's certificate names the identity attested for ``workload``."""
    if pilot.ca is None:
        return None
    peer = peer_spiffe(_ssl_object(request))
    try:
        expected = pilot.ca.attest(workload).uri
    except IssuanceRefused as exc:
        reason = exc.reason
    else:
        if peer == expected:
            return None
        reason = f"the client certificate names {peer or 'no SPIFFE ID'}, not {expected}"
    log.warning("%s %s from %s (%s) refused: %s",
                request.method, request.path, request.remote, workload.node, reason)
    return _error(403, reason)


def _ssl_object(request: web.Request) -> object | None:
    transport = request.transport
    return transport.get_extra_info("ssl_object") if transport is not None else None


LOOPBACK = frozenset({"127.0.0.1", "::1"})  # a process in the pilot's own namespace


def refuse_unless_host(pilot: Pilot, request: web.Request, what: str) -> web.Response | None:
    """403 unless the caller is the host: routes and the root are steered from the host only.

    The CLI reaches the pilot through its published port, so its connections arrive from
    the gateway of one of the project's networks (Docker's port proxy, or the host on the
    bridge); a process in the pilot's container comes from loopback. A workload of the mesh,
    or any other container on the project's networks, may not steer the mesh.
    """
    caller = pilot.caller(request)
    if caller is not None:
        log.warning("%s from workload %s refused", what, caller.node)
        return _error(403, f"{what}s are not accepted from workloads")
    address = (request.remote or "?").removeprefix("::ffff:")
    if address in LOOPBACK or address in pilot.state.gateways():
        return None
    log.warning("%s from %s refused: not the host", what, address)
    return _error(403, f"{what}s are accepted from the host only, not from {address}")


async def get_snapshot(request: web.Request) -> web.StreamResponse:
    pilot = request.app[PILOT_KEY]
    if (refused := refuse_plaintext(pilot, request)) is not None:
        return refused
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
            if (refused := refuse_peer(pilot, request, workload)) is not None:
                return refused
            pilot.last_seen[workload.node] = time.time()
            applied = request.query.get("applied", "")
            if applied and workload.node not in pilot.acks:  # a pilot that lost its memory
                pilot.acks[workload.node] = AckRecord(applied, True, "", time.time())
            snapshot = pilot.snapshot_for(workload)
            if snapshot.version != have:
                return web.Response(body=encode_snapshot(snapshot), content_type="application/json")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return web.Response(status=304)
        await pilot.wait_for_change(generation, remaining)


async def post_ack(request: web.Request) -> web.Response:
    pilot = request.app[PILOT_KEY]
    if (refused := refuse_plaintext(pilot, request)) is not None:
        return refused
    workload = pilot.caller(request)
    if workload is None:
        return web.json_response({"error": f"unknown caller {request.remote}"}, status=403)
    if (refused := refuse_peer(pilot, request, workload)) is not None:
        return refused
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


async def post_certificate(request: web.Request) -> web.Response:
    """Sign the PEM CSR in the body for the identity attested from the caller's address."""
    pilot = request.app[PILOT_KEY]
    address = request.remote or "?"
    if pilot.ca is None:  # 404: the proxy knows there is no certificate to wait for
        return web.json_response({"error": "this pilot runs no CA"}, status=404)
    workload = pilot.caller(request)
    if workload is None:
        if not pilot.synced:  # it may be a proxy the pilot has not seen yet: ask again soon
            return web.json_response(
                {"error": "the pilot has not synced with the engine yet"}, status=503
            )
        reason = f"no workload of project {pilot.state.project!r} has address {address}"
        log.warning("certificate refused to %s: %s", address, reason)
        return web.json_response({"error": reason}, status=403)
    if request.content_length is not None and request.content_length > MAX_CSR_BYTES:
        reason = f"the CSR is larger than {MAX_CSR_BYTES} bytes"
        log.warning("certificate refused to %s (%s): %s", address, workload.node, reason)
        return web.json_response({"error": reason}, status=403)
    csr = await request.read()  # aiohttp caps a body at 1 MiB; the CA at MAX_CSR_BYTES
    try:
        signed = pilot.ca.issue(csr, workload, address)
    except IssuanceRefused as exc:
        log.warning("certificate refused to %s (%s): %s", address, workload.node, exc.reason)
        return web.json_response({"error": exc.reason}, status=403)
    record = pilot.ca.issued[workload.node]
    log.info("certificate issued to %s (%s): %s serial %s until %s",
             address, workload.node, signed.spiffe.uri, record.serial, record.not_after)
    return web.json_response(
        {
            "cert_pem": signed.cert_pem.decode(),
            "chain_pem": signed.chain_pem.decode(),
            "trust_bundle_pem": pilot.ca.trust_bundle_pem,
            "spiffe": signed.spiffe.uri,
            "not_after": record.not_after,
            "serial": record.serial,
        }
    )


async def get_ca(request: web.Request) -> web.Response:
    """The CA's signing root and trust bundle (public; anyone may ask)."""
    ca = request.app[PILOT_KEY].ca
    if ca is None:
        return web.json_response({"error": "this pilot runs no CA"}, status=404)
    return web.json_response(ca.info())


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(request.app[PILOT_KEY].status())


async def get_ready(request: web.Request) -> web.Response:
    ready = request.app[PILOT_KEY].synced
    return web.Response(status=200 if ready else 503, text="ready" if ready else "syncing")


async def put_route(request: web.Request) -> web.Response:
    pilot = request.app[PILOT_KEY]
    if (refused := refuse_unless_host(pilot, request, "route change")) is not None:
        return refused
    try:
        body = await request.json()
        weights = {str(k): v for k, v in dict(body["weights"]).items()}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in weights.values()):
            raise ConfigError("weights must be integers", field="route")
        result = await pilot.set_weights(request.match_info["service"], weights)
    except ConfigError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except (ValueError, KeyError, TypeError) as exc:
        return web.json_response({"error": f"malformed request: {exc}"}, status=400)
    return web.json_response(result)


async def post_rotate(request: web.Request) -> web.Response:
    """``{"step": "begin" | "switch" | "finish"}``: one step of a root rotation, from the host.

    403 unless from the host, 404 without a CA, 400 for a malformed body or unknown step, 409 for
    a step out of order or the user's own root, 500 if the roots cannot be stored; else the
    new ``GET /v1/ca`` answer with ``step`` and the ``generation`` that carries it.
    """
    pilot = request.app[PILOT_KEY]
    if (refused := refuse_unless_host(pilot, request, "root rotation")) is not None:
        return refused
    if pilot.ca is None:
        return _error(404, "this pilot runs no CA")
    try:
        step = (await request.json())["step"]
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, f'malformed request: {exc}; send {{"step": "begin"}} or the like')
    if step not in ROTATION_STEPS:
        return _error(400, f"unknown rotation step {step!r}; the steps are "
                           f"{', '.join(ROTATION_STEPS)}")
    try:
        result = await pilot.rotate_root(step)
    except RotationError as exc:
        log.warning("root rotation %s refused: %s", step, exc)
        return _error(409, str(exc))
    except OSError as exc:
        log.error("root rotation %s failed: cannot store the roots: %s", step, exc)
        return _error(500, f"cannot store the CA's roots: {exc}")
    return web.json_response(result)


def make_app(pilot: Pilot) -> web.Application:
    app = web.Application()
    app[PILOT_KEY] = pilot
    app.router.add_get("/v1/snapshot", get_snapshot)
    app.router.add_post("/v1/ack", post_ack)
    app.router.add_get("/v1/status", get_status)
    app.router.add_post("/v1/certificate", post_certificate)
    app.router.add_get("/v1/ca", get_ca)
    app.router.add_post("/v1/ca/rotate", post_rotate)
    app.router.add_put("/v1/routes/{service}", put_route)
    app.router.add_get("/healthz/ready", get_ready)
    return app
