"""A test double of a Consul agent: it stands in for a real Consul agent, which cannot be
installed on these machines (Consul is in neither Debian, PyPI nor npm, and no image can be
pulled). An aiohttp application written from Consul's HTTP API documentation
(https://developer.hashicorp.com/consul/api-docs) for exactly the endpoints composemesh uses;
tests/pilot/test_consul_source.py says how to run the same tests against a real agent.

It is not Consul. It answers as the documentation says:

- ``PUT /v1/agent/service/register`` (api-docs/agent/service#register-service): ``Name``,
  ``ID`` (defaults to ``Name``), ``Tags``, ``Address``, ``TaggedAddresses``, ``Port``, ``Meta``,
  ``Weights`` (default ``{"Passing": 1, "Warning": 1}``), ``EnableTagOverride``, ``Check`` or
  ``Checks``; the ``replace-existing-checks`` parameter. Keys are read case-insensitively and
  in snake case too, as the docs say the endpoint does. Registering again a check that exists
  keeps its status and output (the agent restores them from its snapshot of the checks; a
  check's ``Status`` is only its initial status): a client changes a status with a TTL update.
- ``PUT /v1/agent/service/deregister/:service_id``: removes the service and its checks; an
  unknown ID is no action.
- ``PUT /v1/agent/check/{pass,warn,fail}/:check_id`` (api-docs/agent/check): sets the status
  and resets the TTL clock; ``note`` becomes ``Output``. An unknown check answers 404
  ``Unknown check "<id>"`` (as current agents do; older agents answered 500
  ``CheckID "<id>" does not have associated TTL``, which the double gives for a check that
  exists and is not a TTL check).
- ``GET /v1/catalog/services``, ``GET /v1/catalog/service/:service_name``,
  ``GET /v1/health/service/:service`` (with ``passing``: only entries whose checks all pass),
  each a blocking query (api-docs/features/blocking): ``index`` and ``wait`` (Go durations,
  default 5m, at most 10m), the ``X-Consul-Index`` header; a query with an index hangs until
  the data it reads has changed past that index or ``wait`` elapses.
- ``dc``: the double is one datacenter; any other answers 500 ``No path to datacenter``.
- ACLs (api-docs/api-structure#authentication): created with ``token``, the double wants it in
  ``X-Consul-Token`` or ``Authorization: Bearer``. An unknown token gets 403 ``ACL not found``;
  no token is the anonymous token under ``default_policy = deny``: writes get 403
  ``Permission denied: ...``, reads get their results filtered (empty), as Consul does.
- TTL checks (api-docs/agent/check#ttl): critical (``TTL expired``) once their TTL passes
  without an update; ``DeregisterCriticalServiceAfter`` (at least 1m, as documented) removes a
  service whose check has been critical that long. Time is ``clock`` (a ManualClock in
  tests), looked at by ``sweep()``, which a background task calls every ``sweep_interval``.
- ``restart()``: the agent comes back having lost its state (services and checks gone, open
  blocking queries cut: their connections are closed, as a real agent's process exit closes
  them); the index keeps growing unless ``reset_index`` (a restored or rebuilt cluster), which
  the docs tell clients to survive. The double comes back at once; a real agent is away for a
  while (connections refused), which a test gets by stopping and starting the server.

The response bodies are the documentation's example responses, key for key (the recorded
copies in ``tests/consul/recorded`` test that). What a real agent does beyond this is listed in
``DIFFERENCES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web

DIFFERENCES = """\
- one node and one datacenter; a real cluster has many nodes, each agent registering its own,
  and the index is the servers' Raft index (shared by every kind of write, not only these)
- an index per service and one for the list of services, as Consul keeps them; a real agent may
  still wake a blocking query with nothing changed (the docs allow it), and adds up to wait/16
  to the wait (the double adds none)
- only TTL checks change by themselves; a check of another kind (HTTP, TCP, Args) keeps the
  status it was registered with, the double runs nothing
- the reaper runs at every sweep, not every 30s; a real agent may deregister up to 30s late
- anti-entropy is instant: what the agent has is the catalog
- response bodies carry the keys of the docs' examples; a real agent adds more (CreateIndex and
  ModifyIndex on health entries, Kind, Proxy, Connect, PeerName, check Type and Definition...)
- TaggedAddresses values are written {"address", "port"} as the catalog and health pages show
  them; the agent/service page writes them {"Address", "Port"}
- ACLs are one full token (and any read-only tokens), not policies and roles
- filter, tag and node-meta parameters are refused (400), not evaluated
"""

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
MAX_WAIT = 600.0  # seconds: "limited to 10 minutes"
DEFAULT_WAIT = 300.0  # "defaults to 5 minutes"
MIN_DEREGISTER_AFTER = 60.0  # "The minimum timeout is 1 minute"
STATUSES = ("passing", "warning", "critical")
UNSUPPORTED_PARAMS = ("filter", "tag", "node-meta")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_META_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")


class ManualClock:
    """A clock that moves only when told to: seconds as a float, like ``time.monotonic``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (``10s``, ``5m``, ``1m30s``, ``250ms``); ValueError if not one."""
    if text in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"time: invalid duration {text!r}")
    return total


@dataclass
class Check:
    """One check of a service, as the agent keeps it."""

    check_id: str
    name: str
    service_id: str
    status: str
    notes: str = ""
    output: str = ""
    ttl: float | None = None  # seconds; None: not a TTL check
    deregister_after: float | None = None
    updated_at: float = 0.0  # when the TTL clock was last reset
    critical_since: float | None = None


@dataclass
class Service:
    """One registered service instance."""

    id: str
    name: str
    tags: tuple[str, ...] = ()
    address: str = ""
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    port: int = 0
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    enable_tag_override: bool = False
    create_index: int = 0
    modify_index: int = 0

    def same_as(self, other: Service) -> bool:
        return replace(self, create_index=0, modify_index=0) == replace(
            other, create_index=0, modify_index=0)


class DoubleError(Exception):
    """An answer other than 200: the status and the plain-text body Consul would send."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class AgentDouble:
    """The state of one agent (and of the catalog it is the whole of) and its HTTP API."""

    def __init__(
        self,
        *,
        token: str | None = None,
        read_only_tokens: Collection[str] = (),
        datacenter: str = "dc1",
        node: str = "consul-double",
        node_id: str = "40e4a748-2192-161a-0510-9bf59fe950b5",
        node_address: str = "127.0.0.1",
        node_tagged_addresses: Mapping[str, str] | None = None,
        node_meta: Mapping[str, str] | None = None,
        consul_service: bool = True,
        index: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sweep_interval: float = 0.05,
    ) -> None:
        self.token = token
        self.read_only_tokens = frozenset(read_only_tokens)
        self.datacenter = datacenter
        self.node = node
        self.node_id = node_id
        self.node_address = node_address
        self.node_tagged_addresses = dict(
            node_tagged_addresses or {"lan": node_address, "wan": node_address})
        self.node_meta = dict(node_meta or {})
        self.consul_service = consul_service
        self.clock = clock
        self.sweep_interval = sweep_interval
        self._first_index = index
        self.index = index  # the last index a write was given
        self.services: dict[str, Service] = {}
        self.checks: dict[str, Check] = {}
        self.serf_status = "passing"
        self._list_index = index  # the list of services: changes with any service write
        self._name_index: dict[str, int] = {}  # per service name: its instances and checks
        self._changed = asyncio.Event()
        self._epoch = 0  # moves at restart: open blocking queries are cut
        self.requests: list[tuple[str, str]] = []  # (method, path_qs) seen, for tests
        self._boot()

    # ----------------------------------------------------------------------- state changes

    def _boot(self) -> None:
        if self.consul_service:
            idx = self._bump("consul")
            self.services["consul"] = Service(id="consul", name="consul", port=8300,
                                              create_index=idx, modify_index=idx)

    def _bump(self, name: str) -> int:
        self.index += 1
        self._list_index = self.index
        self._name_index[name] = self.index
        self._wake()
        return self.index

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def cut(self) -> None:
        """Close the connections of the blocking queries in flight, as the agent's process
        exiting does (call it before stopping the server that serves the double: a graceful
        server shutdown would let them run to their wait)."""
        self._epoch += 1
        self._wake()

    def restart(self, *, reset_index: bool = False) -> None:
        """The agent restarts having lost its state: every registration is gone, blocking
        queries in flight are cut. ``reset_index``: the index starts over too."""
        self.services.clear()
        self.checks.clear()
        self._name_index.clear()
        self._epoch += 1
        if reset_index:
            self.index = self._first_index
            self._list_index = self.index
        self._boot()
        if not self.consul_service:
            self.index += 1
            self._list_index = self.index
        self._wake()

    def sweep(self) -> None:
        """Look at the clock: TTL checks past their TTL go critical, services critical longer
        than their DeregisterCriticalServiceAfter are removed."""
        now = self.clock()
        for check in list(self.checks.values()):
            if check.ttl is not None and check.status != "critical" \
                    and now - check.updated_at > check.ttl:
                self._set_status(check, "critical", "TTL expired", reset_ttl=False)
        for check in list(self.checks.values()):
            if check.check_id not in self.checks:
                continue  # its service went with an earlier check
            if check.status == "critical" and check.deregister_after is not None \
                    and check.critical_since is not None \
                    and now - check.critical_since >= check.deregister_after:
                self._deregister(check.service_id)

    def _set_status(self, check: Check, status: str, output: str, *, reset_ttl: bool) -> None:
        now = self.clock()
        if reset_ttl:
            check.updated_at = now
        if status == check.status and output == check.output:
            return  # the agent syncs nothing that did not change
        if status == "critical" and check.status != "critical":
            check.critical_since = now
        elif status != "critical":
            check.critical_since = None
        check.status, check.output = status, output
        service = self.services.get(check.service_id)
        self._bump(service.name if service else check.service_id)

    def _deregister(self, service_id: str) -> None:
        service = self.services.pop(service_id, None)
        if service is None:
            return
        for cid in [c.check_id for c in self.checks.values() if c.service_id == service_id]:
            del self.checks[cid]
        self._bump(service.name)

    def register(self, body: object, *, replace_existing_checks: bool = False) -> Service:
        """``PUT /v1/agent/service/register`` with ``body`` decoded; DoubleError as Consul's."""
        if not isinstance(body, Mapping):
            raise DoubleError(400, "Request decode failed: json: cannot unmarshal into "
                                   "structs.ServiceDefinition")
        raw = _folded(body)
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise DoubleError(400, "Missing service name")
        sid = raw.get("id") or name
        if not isinstance(sid, str):
            raise DoubleError(400, "Request decode failed: ID must be a string")
        meta = raw.get("meta") or {}
        _check_meta(meta)
        port = raw.get("port", 0)
        if isinstance(port, bool) or not isinstance(port, int):
            raise DoubleError(400, "Request decode failed: Port must be a number")
        tags = raw.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DoubleError(400, "Request decode failed: Tags must be a list of strings")
        weights = _folded(raw.get("weights") or {"Passing": 1, "Warning": 1})
        service = Service(
            id=sid, name=name, tags=tuple(tags), address=str(raw.get("address") or ""),
            tagged_addresses={
                str(k): {"address": str(_folded(v).get("address", "")),
                         "port": int(_folded(v).get("port", 0))}
                for k, v in (raw.get("taggedaddresses") or {}).items()},
            meta={str(k): str(v) for k, v in meta.items()}, port=port,
            weights={"Passing": int(weights.get("passing", 1)),
                     "Warning": int(weights.get("warning", 1))},
            enable_tag_override=bool(raw.get("enabletagoverride", False)),
        )
        checks_raw: list[Any] = []
        if raw.get("check"):
            checks_raw.append(raw["check"])
        checks_raw.extend(raw.get("checks") or [])
        new_checks = [self._check(c, service, i, len(checks_raw))
                      for i, c in enumerate(checks_raw)]

        old = self.services.get(sid)
        if old is not None and old.name != name:
            self._deregister(sid)
            old = None
        changed = old is None or not old.same_as(service)
        keep = {c.check_id for c in new_checks}
        for check in [c for c in self.checks.values() if c.service_id == sid]:
            if check.check_id not in keep and (replace_existing_checks or old is None):
                del self.checks[check.check_id]
                changed = True
        for check in new_checks:
            prev = self.checks.get(check.check_id)
            if prev is not None and prev.service_id == sid:
                # "Restore the fields from the snapshot": status and output carry over
                check.status, check.output = prev.status, prev.output
                check.critical_since = prev.critical_since
            if prev is None or (prev.status, prev.output, prev.ttl, prev.name) != (
                    check.status, check.output, check.ttl, check.name):
                changed = True
            self.checks[check.check_id] = check
        if changed:
            idx = self._bump(name)
            service.create_index = old.create_index if old else idx
            service.modify_index = idx
            self.services[sid] = service
        else:
            assert old is not None
            self.services[sid] = old
        return self.services[sid]

    def _check(self, value: object, service: Service, i: int, count: int) -> Check:
        if not isinstance(value, Mapping):
            raise DoubleError(400, "Request decode failed: a check must be an object")
        raw = _folded(value)
        cid = raw.get("checkid") or raw.get("id") or (
            f"service:{service.id}" if count == 1 else f"service:{service.id}:{i + 1}")
        status = raw.get("status") or "critical"
        if status not in STATUSES:
            raise DoubleError(400, "Status for checks must 'passing', 'warning', 'critical'")
        try:
            ttl = parse_duration(str(raw["ttl"])) if raw.get("ttl") else None
            after = (parse_duration(str(raw["deregistercriticalserviceafter"]))
                     if raw.get("deregistercriticalserviceafter") else None)
        except ValueError as err:
            raise DoubleError(400, f"Request decode failed: {err}") from None
        kinds = ("args", "scriptargs", "http", "tcp", "grpc", "h2ping", "dockercontainerid",
                 "aliasservice", "aliasnode", "udp", "osservice")
        if ttl is None and not any(raw.get(k) for k in kinds):
            raise DoubleError(400, "Invalid check: TTL must be > 0 for TTL checks")
        if after is not None and after > 0:
            after = max(after, MIN_DEREGISTER_AFTER)
        now = self.clock()
        return Check(
            check_id=str(cid),
            name=str(raw.get("name") or f"Service '{service.name}' check"),
            service_id=service.id, status=status, notes=str(raw.get("notes") or ""),
            ttl=ttl, deregister_after=after or None, updated_at=now,
            critical_since=now if status == "critical" else None,
        )

    def update_check(self, check_id: str, status: str, note: str = "") -> None:
        check = self.checks.get(check_id)
        if check is None:
            raise DoubleError(404, f'Unknown check "{check_id}"')
        if check.ttl is None:
            raise DoubleError(500, f'CheckID "{check_id}" does not have associated TTL')
        self._set_status(check, status, note, reset_ttl=True)

    # ------------------------------------------------------------------------- read views

    def catalog_services(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for service in self.services.values():
            tags = out.setdefault(service.name, [])
            tags.extend(t for t in service.tags if t not in tags)
        return out

    def _instances(self, name: str) -> list[Service]:
        return sorted((s for s in self.services.values() if s.name == name),
                      key=lambda s: s.id)

    def catalog_service(self, name: str) -> list[dict[str, Any]]:
        return [{
            "ID": self.node_id,
            "Node": self.node,
            "Address": self.node_address,
            "Datacenter": self.datacenter,
            "TaggedAddresses": dict(self.node_tagged_addresses),
            "NodeMeta": dict(self.node_meta),
            "CreateIndex": s.create_index,
            "ModifyIndex": s.modify_index,
            "ServiceAddress": s.address,
            "ServiceEnableTagOverride": s.enable_tag_override,
            "ServiceID": s.id,
            "ServiceName": s.name,
            "ServicePort": s.port,
            "ServiceMeta": dict(s.meta),
            "ServiceTaggedAddresses": {k: dict(v) for k, v in s.tagged_addresses.items()},
            "ServiceTags": list(s.tags),
            "ServiceProxy": {
                "DestinationServiceName": "", "DestinationServiceID": "",
                "LocalServiceAddress": "", "LocalServicePort": 0,
                "Config": None, "Upstreams": None,
            },
            "ServiceConnect": {"Native": False, "Proxy": None},
            "Namespace": "default",
        } for s in self._instances(name)]

    def health_service(self, name: str, *, passing: bool) -> list[dict[str, Any]]:
        out = []
        for s in self._instances(name):
            checks = [self._check_json(c, s) for c in self.checks.values()
                      if c.service_id == s.id]
            checks.append({
                "Node": self.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                "Status": self.serf_status, "Notes": "", "Output": "", "ServiceID": "",
                "ServiceName": "", "ServiceTags": [], "Namespace": "default",
            })
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            out.append({
                "Node": {
                    "ID": self.node_id, "Node": self.node, "Address": self.node_address,
                    "Datacenter": self.datacenter,
                    "TaggedAddresses": dict(self.node_tagged_addresses),
                    "Meta": dict(self.node_meta),
                },
                "Service": {
                    "ID": s.id, "Service": s.name, "Tags": list(s.tags), "Address": s.address,
                    "TaggedAddresses": {k: dict(v) for k, v in s.tagged_addresses.items()},
                    "Meta": dict(s.meta), "Port": s.port, "Weights": dict(s.weights),
                    "Namespace": "default",
                },
                "Checks": checks,
            })
        return out

    def _check_json(self, c: Check, s: Service) -> dict[str, Any]:
        return {
            "Node": self.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status,
            "Notes": c.notes, "Output": c.output, "ServiceID": s.id, "ServiceName": s.name,
            "ServiceTags": list(s.tags), "Namespace": "default",
        }

    def index_of(self, name: str | None) -> int:
        """X-Consul-Index of a query: the list of services, or one service by name."""
        if name is None:
            return max(self._list_index, 1)
        return max(self._name_index.get(name, self._list_index), 1)

    # ------------------------------------------------------------------------------ HTTP

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_put("/v1/agent/service/register", self._h_register)
        app.router.add_put("/v1/agent/service/deregister/{service_id}", self._h_deregister)
        for verb, status in (("pass", "passing"), ("warn", "warning"), ("fail", "critical")):
            app.router.add_put(f"/v1/agent/check/{verb}/{{check_id}}", self._h_ttl(status))
        app.router.add_get("/v1/catalog/services", self._h_catalog_services)
        app.router.add_get("/v1/catalog/service/{name}", self._h_catalog_service)
        app.router.add_get("/v1/health/service/{name}", self._h_health_service)
        app.cleanup_ctx.append(self._sweeper)
        return app

    async def _sweeper(self, app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                self.sweep()
                await asyncio.sleep(self.sweep_interval)

        task = asyncio.get_running_loop().create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        policy = "deny" if self.token is not None else "allow"
        try:
            response: web.StreamResponse = await handler(request)
        except DoubleError as err:
            response = web.Response(status=err.status, text=err.text)
        response.headers["X-Consul-Default-Acl-Policy"] = policy
        return response

    def _caller(self, request: web.Request) -> str:
        """``write``, ``read`` or ``anonymous``; DoubleError 403 for an unknown token."""
        if self.token is None:
            return "write"
        token = request.headers.get("X-Consul-Token", "")
        auth = request.headers.get("Authorization", "")
        if not token and auth[:7].lower() == "bearer ":
            token = auth[7:].strip()
        token = token or request.query.get("token", "")
        if not token:
            return "anonymous"
        if token == self.token:
            return "write"
        if token in self.read_only_tokens:
            return "read"
        raise DoubleError(403, "ACL not found")

    def _may_write(self, request: web.Request, resource: str, permission: str) -> None:
        caller = self._caller(request)
        if caller != "write":
            accessor = ANONYMOUS_ACCESSOR if caller == "anonymous" else "read-only-accessor"
            raise DoubleError(403, f"Permission denied: token with AccessorID '{accessor}' "
                                   f"lacks permission '{permission}' on \"{resource}\"")

    async def _h_register(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError as err:
            raise DoubleError(400, f"Request decode failed: {err}") from None
        name = _folded(body).get("name") if isinstance(body, Mapping) else None
        self._may_write(request, str(name or ""), "service:write")
        self.register(body, replace_existing_checks="replace-existing-checks" in request.query)
        return web.Response(text="")

    async def _h_deregister(self, request: web.Request) -> web.Response:
        sid = request.match_info["service_id"]
        service = self.services.get(sid)
        self._may_write(request, service.name if service else sid, "service:write")
        self._deregister(sid)
        return web.Response(text="")

    def _h_ttl(self, status: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            cid = request.match_info["check_id"]
            check = self.checks.get(cid)
            if check is None:
                self._caller(request)  # an unknown token is refused first
                raise DoubleError(404, f'Unknown check "{cid}"')
            service = self.services.get(check.service_id)
            self._may_write(request, service.name if service else cid, "service:write")
            self.update_check(cid, status, request.query.get("note", ""))
            return web.Response(text="")
        return handler

    async def _h_catalog_services(self, request: web.Request) -> web.Response:
        return await self._blocking(request, None, self.catalog_services, {})

    async def _h_catalog_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return await self._blocking(request, name, lambda: self.catalog_service(name), [])

    async def _h_health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        passing = _flag(request.query, "passing")
        return await self._blocking(
            request, name, lambda: self.health_service(name, passing=passing), [])

    async def _blocking(self, request: web.Request, name: str | None,
                        read: Callable[[], object], filtered: object) -> web.Response:
        for param in UNSUPPORTED_PARAMS:
            if param in request.query:
                raise DoubleError(400, f"the agent double does not implement {param!r}")
        caller = self._caller(request)
        dc = request.query.get("dc", "")
        if dc and dc != self.datacenter:
            raise DoubleError(500, "No path to datacenter")
        try:
            index = int(request.query.get("index", "0") or "0")
        except ValueError:
            raise DoubleError(400, "Invalid index") from None
        try:
            wait = parse_duration(request.query["wait"]) if "wait" in request.query \
                else DEFAULT_WAIT
        except ValueError:
            raise DoubleError(400, "Invalid wait time") from None
        wait = min(wait, MAX_WAIT)
        if index > 0:
            epoch = self._epoch
            deadline = asyncio.get_running_loop().time() + wait
            while self.index_of(name) <= index:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
                if self._epoch != epoch:
                    # the agent went away under this query: the connection is cut
                    if request.transport is not None:
                        request.transport.close()
                    raise DoubleError(503, "agent restarted")
        body = filtered if caller == "anonymous" else read()
        return web.Response(
            text=json.dumps(body), content_type="application/json",
            headers={"X-Consul-Index": str(self.index_of(name)),
                     "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"})


def _folded(value: object) -> dict[str, Any]:
    """A JSON object's keys folded as Go's decoder and Consul's snake-case support read them."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k).replace("_", "").lower(): v for k, v in value.items()}


def _flag(query: Mapping[str, str], name: str) -> bool:
    if name not in query:
        return False
    return query[name].lower() in ("", "1", "t", "true")


def _check_meta(meta: object) -> None:
    if not isinstance(meta, Mapping):
        raise DoubleError(400, "Request decode failed: Meta must be an object")
    if len(meta) > 64:
        raise DoubleError(400, "Invalid Service Meta: Node metadata cannot contain more than "
                               "64 key/value pairs")
    for key, value in meta.items():
        why = None
        if not isinstance(key, str) or not _META_KEY.fullmatch(key):
            why = "Key contains invalid characters" if key else "Key cannot be blank"
        elif key.startswith("consul-"):
            why = "Key prefix 'consul-' is reserved for internal use"
        elif not isinstance(value, str) or len(value) > 512:
            why = "Value is too long (limit: 512 characters)"
        if why:
            raise DoubleError(400, f"Invalid Service Meta: Couldn't load metadata pair "
                                   f"('{key}', '{value}'): {why}")
