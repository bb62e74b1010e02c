"""The pilot's HTTP API: long-poll snapshot push, ACK/NACK intake, certificates, status.

It is served on the pilot's Unix socket only (``pilot.main``), never on a network. Every
request's caller is attested by the kernel and the engine (``pilot.attest``), never by its
address or by what it claims, and each endpoint names who may call it:

- a proxy, for its own workload: ``GET /v1/snapshot``, ``POST /v1/ack``,
  ``POST /v1/certificate`` (the CSR is signed for that workload's mesh service only);
- the host's user (or the pilot's own container, through ``docker exec``): ``GET /v1/status``,
  ``PUT /v1/routes/<service>``, ``POST /v1/ca/rotate``, ``POST /v1/ca/export`` (the root's
  key: `composemesh certs export`);
- any attested caller: ``GET /v1/ca`` (public: the roots and the trust bundle);
- anyone who can open the socket: ``GET /healthz/ready``.

Refusals are 403 with the reason (503 for a container the pilot may not have seen yet), logged
with who asked.

The pilot's metrics (``pilot.metrics``) are counted here, where snapshots go out, answers come
in and certificates are signed or refused; they are served by ``pilot.monitoring``, on its own
listener, never by this API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from composemesh.ca import IssuanceRefused, RotationError, fingerprint
from composemesh.ca.authority import MAX_CSR_BYTES
from composemesh.errors import ConfigError
from composemesh.model import wellknown as wk
from composemesh.model.consul import ConsulView
from composemesh.model.mesh import MeshState, Workload
from composemesh.model.routing_config import apply_weights
from composemesh.model.settings import MeshSettings
from composemesh.model.snapshot import (
    ACK_PATH,
    CERTIFICATE_PATH,
    SNAPSHOT_PATH,
    Ack,
    CertificateResponse,
    ErrorResponse,
    Snapshot,
)
from composemesh.model.wire import ContractError, decode, encode
from composemesh.pilot.attest import Caller, KernelAttestor, Unknown
from composemesh.pilot.build import build_state, default_split, mesh_versions, service_versions
from composemesh.pilot.ca_service import ROTATION_STEPS, CAService, ExportRefused
from composemesh.pilot.federation import consul_status
from composemesh.pilot.metrics import (
    Convergence,
    PilotMetrics,
    connected_proxies,
    refusal_outcome,
)
from composemesh.pilot.push_context import PushContext
from composemesh.pilot.store import OverrideStore
from composemesh.pilot.traffic import TrafficMonitor

log = logging.getLogger("composemesh.pilot.server")
LONG_POLL_S = 25.0
LONG_POLL_MAX_S = 60.0  # the most ``wait`` a poll may ask for
UNKNOWN_GRACE_S = 5.0  # a container not known yet: how long a poll waits for the engine's news


@dataclass(frozen=True)
class HeldCertificate:
    """What a proxy says it holds now (it says so with each poll, as the attested proxy)."""

    serial: str
    not_after: str


# Who sent a request, given the state the pilot holds: the kernel's word by default; tests of
# the API alone give their own (see KernelAttestor for the real one).
Attestor = Callable[[web.Request, MeshState], "Caller | Unknown"]


@dataclass(frozen=True)
class AckRecord:
    version: str
    ok: bool
    reason: str
    at: float


class Pilot:
    """Holds the current mesh state and the proxies' answers; wakes long-polls on change."""

    def __init__(
        self, state: MeshState, store: OverrideStore | None = None, ca: CAService | None = None,
        attestor: Attestor | None = None, metrics: PilotMetrics | None = None,
    ) -> None:
        self.state = state
        self.store = store
        self.ca = ca  # None: this pilot issues no certificates (tests of routing alone)
        self.attestor: Attestor = attestor or KernelAttestor()
        self.traffic: TrafficMonitor | None = None  # request/error rates, when scraping
        self.overrides: dict[str, dict[str, int]] = store.load() if store else {}
        self.generation = 0
        self.synced = False
        self.acks: dict[str, AckRecord] = {}
        self.last_seen: dict[str, float] = {}
        self.held: dict[str, HeldCertificate] = {}  # by node
        self._changed = asyncio.Condition()
        self._push: PushContext | None = None
        # what ``pilot_xds`` counts (``metrics.connected_proxies``): open polls by node, and
        # when (monotonic) each node's last poll ended or its last ACK came
        self.open_polls: dict[str, int] = {}
        self.last_contact: dict[str, float] = {}
        self.published_at = time.monotonic()  # when the current state was published
        self.convergence = Convergence()
        self.metrics = metrics or PilotMetrics()
        self.metrics.bind(lambda: self.state, self.connected)

    def connected(self) -> int:
        """How many proxies are connected now (``metrics.connected_proxies``)."""
        return connected_proxies(self.open_polls, self.last_contact, time.monotonic())

    def poll_opened(self, node: str) -> None:
        self.open_polls[node] = self.open_polls.get(node, 0) + 1

    def poll_closed(self, node: str) -> None:
        left = self.open_polls.get(node, 0) - 1
        if left > 0:
            self.open_polls[node] = left
        else:
            self.open_polls.pop(node, None)
        self.last_contact[node] = time.monotonic()

    def snapshot_current(self, workload: Workload, version: str) -> None:
        """``version`` is what ``workload``'s proxy is sent now: current for it since the
        push in which the pilot first rendered it for that proxy (a proxy that is polling,
        as every connected one is, renders it in the push that made it current)."""
        self.convergence.current(workload.node, version, self.published_at)

    def answered(self, node: str, version: str, ok: bool) -> None:
        """A proxy's ACK or NACK of ``version``, counted; an ACK of the version current for
        it is observed as its convergence time."""
        now = time.monotonic()
        self.last_contact[node] = now
        converged = self.convergence.acked(node, version, now) if ok else None
        self.metrics.answered(ok, converged)

    async def update_workloads(self, workloads: tuple[Workload, ...]) -> None:
        """A new view from the Docker source: rebuild and publish."""
        await self.publish(self._build(workloads, self.state.settings))

    async def update_consul(self, view: ConsulView) -> None:
        """A new view from the Consul source (exports, imported instances): rebuild, publish."""
        await self.publish(self._build(self.state.workloads, self.state.settings, view))

    def _build(self, workloads: tuple[Workload, ...], settings: MeshSettings,
               consul: ConsulView | None = None) -> MeshState:
        """The state anew; the Consul view is ``consul`` if given, else the current one."""
        state = build_state(self.state.project, workloads, settings, self.overrides, self.state,
                            consul=consul or self.state.consul)
        for error in state.errors:
            log.error("kept the last good config of %s", error)
        return state

    async def set_weights(self, service: str, weights: dict[str, int]) -> dict[str, object]:
        """`composemesh route`: validate, persist, publish. Raises ConfigError (not applied)."""
        versions = mesh_versions(self.state)
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
            self.published_at = time.monotonic()
            nodes = {w.node for w in state.workloads}
            self.convergence.forget(nodes)
            for node in [n for n in self.last_contact if n not in nodes]:
                del self.last_contact[node]
            self._changed.notify_all()

    async def wait_for_change(self, generation: int, timeout: float) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.generation != generation), timeout
                )

    def attest(self, request: web.Request) -> Caller | Unknown:
        """Who is calling, as the kernel and the engine say (``attest.classify``)."""
        return self.attestor(request, self.state)

    def push_context(self) -> PushContext:
        """The current push: this state indexed once, with the CA's trust bundle and the
        root that signs now; a new state or a rotation step makes a new one."""
        bundle, root = ("", "") if self.ca is None else (
            self.ca.trust_bundle_pem, fingerprint(self.ca.root_cert))
        push = self._push
        if push is None or not push.serves(self.state, bundle, root):
            push = self._push = PushContext.build(self.state, bundle, root)
        return push

    def snapshot_for(self, workload: Workload) -> Snapshot:
        """What ``workload``'s proxy is sent: its view of the mesh, the CA's trust bundle and
        which root signs now (rendered once per push)."""
        return self.push_context().snapshot(workload)

    def identity_of(self, workload: Workload) -> dict[str, object]:
        """The status columns of the certificate ``workload``'s proxy holds: as it said with
        its last poll, completed from the CA's record of that serial; before it said, the
        last one issued to its container."""
        if self.ca is None:
            return dict.fromkeys(("identity", "cert_not_after", "cert_serial",
                                  "cert_issuer_fingerprint"))
        held = self.held.get(workload.node)
        record = self.ca.record_for(workload, held.serial if held else None)
        if record is None and held is not None:
            return {"identity": self.ca.attest(workload).uri, "cert_not_after": held.not_after,
                    "cert_serial": held.serial, "cert_issuer_fingerprint": None}
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
        push = self.push_context()
        for w in self.state.workloads:
            snap = push.snapshot(w)
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
        sent = self.traffic.sent() if self.traffic is not None else {}
        ingress, egress = self.state.settings.ingress, self.state.settings.egress
        hosts = {wk.INGRESS_GATEWAY: len(ingress.hosts) if ingress is not None else 0,
                 wk.EGRESS_GATEWAY: len(egress.hosts) if egress is not None else 0,
                 wk.EAST_WEST_GATEWAY: 0}
        gateways = [
            {
                "gateway": row["service"],
                "node": row["node"],
                "ready": row["proxy_healthy"],
                "in_sync": row["in_sync"],
                "cert_not_after": row.get("cert_not_after"),
                "hosts": hosts[str(row["service"])],
                "routes": sum(len(h.routes) for h in ingress.hosts)
                if ingress is not None and row["service"] == wk.INGRESS_GATEWAY else 0,
                "rps": round(sent[row["node"]].requests_per_s, 2)
                if row["node"] in sent else None,
            }
            for row in rows if row["service"] in hosts
        ]
        return {
            "project": self.state.project,
            "synced": self.synced,
            "proxies": rows,
            "services": services,
            "gateways": gateways,
            "errors": list(self.state.errors),
            "generation": self.generation,
            "consul": consul_status(self.state),
        }


PILOT_KEY = web.AppKey("pilot", Pilot)


def _error(status: int, message: str) -> web.Response:
    return _message(ErrorResponse(message), status)


def _message(message: object, status: int = 200) -> web.Response:
    """A message of the contract (``model.snapshot``) as the answer."""
    return web.Response(body=encode(message), status=status, content_type="application/json")


def _attested(pilot: Pilot, request: web.Request, what: str,
              roles: frozenset[str]) -> Caller | web.Response:
    """The attested caller of ``request`` if its role may ask for ``what``; else the answer:
    403 (or 503 for a container the pilot may not have seen yet), logged with the reason."""
    found = pilot.attest(request)
    if isinstance(found, Caller) and found.role in roles:
        return found
    if isinstance(found, Caller):
        reason = f"{what} is not for the {found.role}"
        who = found.describe()
    else:
        reason, who = found.reason, "an unattested caller"
    status = 503 if isinstance(found, Unknown) and found.retry else 403
    log.warning("%s %s from %s refused: %s", request.method, request.path, who, reason)
    return _error(status, reason)


PROXY_ONLY = frozenset({"proxy"})
HOST_ONLY = frozenset({"host", "pilot"})  # the host's user, also through `docker exec` here
ANY_CALLER = frozenset({"proxy", "host", "pilot"})


async def get_snapshot(request: web.Request) -> web.StreamResponse:
    pilot = request.app[PILOT_KEY]
    have = request.query.get("version", "")
    try:
        wait = float(request.query.get("wait", LONG_POLL_S))
        if not 0 <= wait <= LONG_POLL_MAX_S:
            raise ValueError
    except ValueError:
        return _error(400, f"wait must be a number of seconds from 0 to {LONG_POLL_MAX_S:g}")
    started = time.monotonic()
    deadline = started + wait
    polling: str | None = None  # the node whose poll this is, once attested
    try:
        while True:
            generation = pilot.generation
            caller = _attested(pilot, request, "a snapshot", PROXY_ONLY)
            unknown = isinstance(caller, web.Response)
            if isinstance(caller, web.Response):  # a container not known yet may be, soon
                now = time.monotonic()
                if caller.status != 503 or now - started > UNKNOWN_GRACE_S or now >= deadline:
                    return caller
            else:
                workload = caller.proxy_workload
                if polling is None:
                    polling = workload.node
                    pilot.poll_opened(polling)
                pilot.last_seen[workload.node] = time.time()
                serial = request.query.get("cert_serial", "")
                if serial:
                    pilot.held[workload.node] = HeldCertificate(
                        serial[:64], request.query.get("cert_not_after", "")[:40])
                applied = request.query.get("applied", "")
                if applied and workload.node not in pilot.acks:  # a pilot that lost its memory
                    pilot.acks[workload.node] = AckRecord(applied, True, "", time.time())
                push = pilot.push_context()
                version = push.snapshot(workload).version
                pilot.snapshot_current(workload, version)
                if version != have:
                    body = push.body(workload)
                    pilot.metrics.pushed()
                    return web.Response(body=body, content_type="application/json")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return web.Response(status=304)
            await pilot.wait_for_change(generation, min(remaining, UNKNOWN_GRACE_S) if unknown
                                        else remaining)
    finally:
        if polling is not None:
            pilot.poll_closed(polling)


async def post_ack(request: web.Request) -> web.Response:
    pilot = request.app[PILOT_KEY]
    caller = _attested(pilot, request, "an ACK", PROXY_ONLY)
    if isinstance(caller, web.Response):
        return caller
    workload = caller.proxy_workload
    try:
        ack = decode(await request.read(), Ack)
    except ContractError as exc:
        return _error(400, str(exc))
    if ack.node and ack.node != workload.node:
        log.warning("ack from %s claims node %s; refused", workload.node, ack.node)
        return _error(403, "node does not match the caller")
    pilot.acks[workload.node] = AckRecord(ack.version, ack.ok, ack.reason, time.time())
    pilot.last_seen[workload.node] = time.time()
    pilot.answered(workload.node, ack.version, ack.ok)
    if ack.ok:
        log.info("ACK %s %s", workload.node, ack.version)
    else:
        log.warning("NACK %s %s: %s", workload.node, ack.version, ack.reason)
    return web.json_response({"ok": True})


async def post_certificate(request: web.Request) -> web.Response:
    """Sign the PEM CSR in the body for the identity attested for the calling proxy."""
    pilot = request.app[PILOT_KEY]
    if pilot.ca is None:  # 404: the proxy knows there is no certificate to wait for
        return _error(404, "this pilot runs no CA")
    caller = _attested(pilot, request, "a workload certificate", PROXY_ONLY)
    if isinstance(caller, web.Response):
        pilot.metrics.certificate("attestation_failed")
        return caller
    workload = caller.proxy_workload
    who = caller.describe()
    try:
        pilot.ca.attest(workload)  # the identity the caller was attested as has a name
    except IssuanceRefused as exc:
        log.warning("certificate refused to %s (%s): %s", who, workload.node, exc.reason)
        pilot.metrics.certificate("attestation_failed")
        return _error(403, exc.reason)
    if request.content_length is not None and request.content_length > MAX_CSR_BYTES:
        reason = f"the CSR is larger than {MAX_CSR_BYTES} bytes"
        log.warning("certificate refused to %s (%s): %s", who, workload.node, reason)
        pilot.metrics.certificate("bad_csr")
        return _error(403, reason)
    csr = await request.read()  # aiohttp caps a body at 1 MiB; the CA at MAX_CSR_BYTES
    try:
        signed = pilot.ca.issue(csr, workload, caller.container_id or "")
    except IssuanceRefused as exc:
        log.warning("certificate refused to %s (%s): %s", who, workload.node, exc.reason)
        pilot.metrics.certificate(refusal_outcome(exc.reason))
        return _error(403, exc.reason)
    except Exception:
        pilot.metrics.certificate("error")
        raise
    pilot.metrics.certificate("issued")
    record = pilot.ca.issued[workload.node]
    pilot.held[workload.node] = HeldCertificate(record.serial, record.not_after)
    log.info("certificate issued to %s (%s): %s serial %s until %s",
             who, workload.node, signed.spiffe.uri, record.serial, record.not_after)
    return _message(CertificateResponse(
        cert_pem=signed.cert_pem.decode(),
        chain_pem=signed.chain_pem.decode(),
        trust_bundle_pem=pilot.ca.trust_bundle_pem,
        spiffe=signed.spiffe.uri,
        not_after=record.not_after,
        serial=record.serial,
    ))


async def get_ca(request: web.Request) -> web.Response:
    """The CA's signing root and trust bundle (public, to any attested caller)."""
    pilot = request.app[PILOT_KEY]
    caller = _attested(pilot, request, "the CA", ANY_CALLER)
    if isinstance(caller, web.Response):
        return caller
    ca = pilot.ca
    if ca is None:
        return _error(404, "this pilot runs no CA")
    return web.json_response(ca.info())


async def get_status(request: web.Request) -> web.Response:
    """Every proxy's state, identity and traffic: for the host's user only."""
    pilot = request.app[PILOT_KEY]
    caller = _attested(pilot, request, "status", HOST_ONLY)
    if isinstance(caller, web.Response):
        return caller
    return web.json_response(pilot.status())


async def get_ready(request: web.Request) -> web.Response:
    ready = request.app[PILOT_KEY].synced
    return web.Response(status=200 if ready else 503, text="ready" if ready else "syncing")


async def put_route(request: web.Request) -> web.Response:
    pilot = request.app[PILOT_KEY]
    caller = _attested(pilot, request, "a route change", HOST_ONLY)
    if isinstance(caller, web.Response):
        return caller
    try:
        body = await request.json()
        weights = {str(k): v for k, v in dict(body["weights"]).items()}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in weights.values()):
            raise ConfigError("weights must be integers", field="route")
        result = await pilot.set_weights(request.match_info["service"], weights)
    except ConfigError as exc:
        return _error(400, str(exc))
    except (ValueError, KeyError, TypeError) as exc:
        return _error(400, f"malformed request: {exc}")
    return web.json_response(result)


async def post_rotate(request: web.Request) -> web.Response:
    """``{"step": "begin" | "switch" | "finish"}``: one step of a root rotation, from the host.

    403 unless from the host, 404 without a CA, 400 for a malformed body or unknown step, 409 for
    a step out of order or the user's own root, 500 if the roots cannot be stored; else the
    new ``GET /v1/ca`` answer with ``step`` and the ``generation`` that carries it.
    """
    pilot = request.app[PILOT_KEY]
    caller = _attested(pilot, request, "a root rotation", HOST_ONLY)
    if isinstance(caller, web.Response):
        return caller
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


async def post_ca_export(request: web.Request) -> web.Response:
    """The signing root's certificate and private key, for `composemesh certs export`: to
    the host's user only (a proxy, or anyone else, gets 403 and nothing), POST so that no
    cache keeps the answer. 404 without a CA, 409 for the user's own root or during a root
    rotation (the sentence says what to do); else ``{"cert_pem", "key_pem", "fingerprint"}``.
    """
    pilot = request.app[PILOT_KEY]
    caller = _attested(pilot, request, "the root's key", HOST_ONLY)
    if isinstance(caller, web.Response):
        return caller
    if pilot.ca is None:
        return _error(404, "this pilot runs no CA")
    try:
        cert_pem, key_pem = pilot.ca.export_root()
    except ExportRefused as exc:
        log.warning("root export refused: %s", exc)
        return _error(409, str(exc))
    root = fingerprint(pilot.ca.root_cert)
    log.warning("the root's key %s was exported to %s", root, caller.describe())
    return web.json_response(
        {"cert_pem": cert_pem.decode(), "key_pem": key_pem.decode(), "fingerprint": root},
        headers={"Cache-Control": "no-store"})


def make_app(pilot: Pilot) -> web.Application:
    app = web.Application()
    app[PILOT_KEY] = pilot
    app.router.add_get(SNAPSHOT_PATH, get_snapshot)
    app.router.add_post(ACK_PATH, post_ack)
    app.router.add_get("/v1/status", get_status)
    app.router.add_post(CERTIFICATE_PATH, post_certificate)
    app.router.add_get("/v1/ca", get_ca)
    app.router.add_post("/v1/ca/rotate", post_rotate)
    app.router.add_post("/v1/ca/export", post_ca_export)
    app.router.add_put("/v1/routes/{service}", put_route)
    app.router.add_get("/healthz/ready", get_ready)
    return app
