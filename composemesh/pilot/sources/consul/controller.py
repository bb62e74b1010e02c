"""The pilot's Consul source: registers this project's mesh service instances in Consul and
watches the catalog for everyone else's.

Export: every running workload of the project's mesh services (the mesh's own gateways left
out) is one registration (``consul.convert.registration``: the east-west gateway's address and
port, version and SPIFFE ID in ``Meta``, a TTL check with DeregisterCriticalServiceAfter so
the entries of a pilot that vanished expire). Its check follows the workload: passing while
it runs and its proxy is healthy, critical otherwise, passed again every ``ttl_interval``. A
workload that stops running (stopped, or its app unhealthy or still starting: the Docker
source's ``Workload.running``) or is gone is deregistered at once. The status is set by a TTL
update right after each registration, because an agent keeps the status of a check it already
had when the service is registered again. Own registrations that the catalog shows and no
workload calls for (an earlier pilot's, killed before it deregistered) are removed at once.

Consul losing its state: a TTL update answered "unknown check", a catalog without a service
this project registered, an index that went backwards, or any outage (unreachable, then
reachable again) re-registers everything at once.

Import: one blocking query on ``/v1/catalog/services`` and, for each name in it but Consul's
own ``consul``, one blocking query on ``/v1/health/service/<name>?passing``, started and
stopped as names come and go. Each keeps the passing instances that are not this project's own
registrations (own: ``Meta.project`` is this project and the address is this host's). Each
change goes to ``on_view`` at once (coalesced over DEBOUNCE_S). A query that returns with its
index unchanged is not asked again before QUIET_PAUSE_S (a wake-up with nothing changed, which
Consul allows); an index that went backwards starts over from 0, as Consul's docs say.

Failures: an unreachable agent is one warning per outage (not per retry), naming the address
and the reason, and a view with ``reachable=False``; every loop retries with a backoff capped
at RETRY_CAP_S, and all of them at once as soon as one gets through. While Consul is away the
last known imported instances are kept: stale, but dropping them would cut traffic to other
hosts that is likely still flowing, and Consul's own agents keep serving their last catalog the
same way. A refused token is one error per refusal spell and a view with ``error_kind="acl"``,
retried every ACL_RETRY_S in case the user fixes it. The token is never logged.

Cancelled (the pilot stopping, ``composemesh down``), the source deregisters everything it
registered, within DEREGISTER_TIMEOUT_S in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping

from composemesh.backoff import backoff_delay
from composemesh.consul.client import ConsulClient, ConsulError
from composemesh.consul.convert import check_id, service_id
from composemesh.model import wellknown as wk
from composemesh.model.consul import CatalogInstance, ConsulSettings, ConsulView, ExportedInstance
from composemesh.model.mesh import Workload

log = logging.getLogger("composemesh.pilot.consul")

GATEWAYS = frozenset({wk.INGRESS_GATEWAY, wk.EGRESS_GATEWAY, wk.EAST_WEST_GATEWAY})
CONSUL_SERVICE = "consul"  # Consul's own servers, never a mesh endpoint
DEBOUNCE_S = 0.02  # changes closer than this go out as one view
QUIET_PAUSE_S = 0.25  # after a blocking query that returned with its index unchanged
RETRY_INITIAL_S = 0.5
RETRY_CAP_S = 5.0  # so the source catches up soon after Consul comes
ACL_RETRY_S = 30.0
DEREGISTER_TIMEOUT_S = 5.0
WAIT_S = 60.0  # a blocking query's wait

_NUMBER = re.compile(r"[-_](\d+)$")

ViewCallback = Callable[[ConsulView], Awaitable[None]]


def instance_number(workload: Workload) -> int:
    """Compose's container number of the workload: the holder is named
    ``<project>-<compose service>-netns-<n>`` (``_`` separators with older compose)."""
    found = _NUMBER.search(workload.node)
    return int(found.group(1)) if found else 1


def exported_instance(workload: Workload, *, project: str, trust_domain: str) -> ExportedInstance:
    """What ``workload`` is registered as; ``healthy`` is the check's status."""
    return ExportedInstance(
        project=project,
        compose_service=workload.compose_service,
        instance=instance_number(workload),
        service=workload.service,
        version=workload.version,
        spiffe=f"spiffe://{trust_domain}/ns/{project}/sa/{workload.service}",
        healthy=workload.running and workload.proxy_healthy,
    )


def exports(workloads: tuple[Workload, ...], settings: ConsulSettings, *, project: str,
            trust_domain: str) -> dict[str, ExportedInstance]:
    """The registrations ``workloads`` call for, by service ID: running workloads of the
    project's mesh services, the mesh's gateways left out."""
    out: dict[str, ExportedInstance] = {}
    for workload in workloads:
        if workload.project != project or not workload.running:
            continue
        if workload.service in GATEWAYS or workload.compose_service in GATEWAYS:
            continue
        instance = exported_instance(workload, project=project, trust_domain=trust_domain)
        out[service_id(instance, settings.host_address)] = instance
    return out


class ConsulSource:
    """Owns the registrations and the catalog watch; ``run()`` until cancelled."""

    def __init__(
        self,
        settings: ConsulSettings,
        *,
        project: str,
        trust_domain: str,
        on_view: ViewCallback,
        client: ConsulClient | None = None,
        ttl_interval: float = 10.0,
        wait: float = WAIT_S,
        retry_cap: float = RETRY_CAP_S,
        acl_retry: float = ACL_RETRY_S,
        deregister_timeout: float = DEREGISTER_TIMEOUT_S,
        quiet_pause: float = QUIET_PAUSE_S,
    ) -> None:
        self.settings = settings
        self.project = project
        self.trust_domain = trust_domain
        self._on_view = on_view
        self._client = client
        self._own_client = client is None
        self.ttl_interval = ttl_interval
        self.wait = wait
        self.retry_cap = retry_cap
        self.acl_retry = acl_retry
        self.deregister_timeout = deregister_timeout
        self.quiet_pause = quiet_pause
        self._workloads: tuple[Workload, ...] = ()
        self._workloads_known = False
        self._export_wake = asyncio.Event()
        self._resync = True  # register everything on the next round
        self._registered: dict[str, ExportedInstance] = {}  # as last registered or updated
        self._own_seen: dict[str, set[str]] = {}  # name -> own IDs its last answer had
        self._imported: dict[str, tuple[CatalogInstance, ...]] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._catalog_task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._contacted = False
        self._problems: dict[str, ConsulError] = {}  # export / import: the last failure
        self.failed_calls = 0  # calls that failed, all told (for tests and metrics)
        self._changed_at = 0.0
        self._dirty = asyncio.Event()
        self._recovered = asyncio.Event()  # set (and replaced) when Consul answers again
        self.view = ConsulView()

    # ------------------------------------------------------------------------ the pilot's

    def workloads_changed(self, workloads: tuple[Workload, ...]) -> None:
        """The Docker source's latest workloads: the exporter catches up at once."""
        self._workloads = workloads
        self._workloads_known = True
        self._export_wake.set()

    async def run(self) -> None:
        """Export and watch until cancelled; then deregister all (bounded) and re-raise."""
        client = self._client or ConsulClient(self.settings)
        self._client = client
        tasks = [asyncio.create_task(self._export_loop(), name="consul-export"),
                 asyncio.create_task(self._publish_loop(), name="consul-view")]
        self._start_import()
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self._stop_import()
            await asyncio.gather(*tasks, *self._stopping, return_exceptions=True)
            try:
                await self._deregister_all()
            finally:
                if self._own_client:
                    await client.close()

    def _start_import(self) -> None:
        self._catalog_task = asyncio.create_task(self._catalog_loop(), name="consul-catalog")
        self._catalog_task.add_done_callback(_log_crash)

    def _stop_import(self) -> None:
        for task in [self._catalog_task, *self._watches.values()]:
            if task is not None:
                task.cancel()
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        self._watches.clear()
        self._catalog_task = None

    def _restart_import(self) -> None:
        """Every watch from index 0: after Consul lost its state, the indexes they hold may
        be ahead of its own, and a query with such an index would hang its whole wait. The
        instances imported so far stay until the new answers replace them."""
        if self._catalog_task is not None:
            self._stop_import()
            self._start_import()

    # ----------------------------------------------------------------------------- export

    def _wanted(self) -> dict[str, ExportedInstance]:
        return exports(self._workloads, self.settings, project=self.project,
                       trust_domain=self.trust_domain)

    async def _export_loop(self) -> None:
        assert self._client is not None
        consul = self._client
        loop = asyncio.get_running_loop()
        next_pass = loop.time()
        failures = lost = 0
        while True:
            if not self._workloads_known:
                await self._export_wake.wait()
            self._export_wake.clear()
            try:
                wanted = self._wanted()
                before = dict(self._registered)
                for sid in [s for s in self._registered if s not in wanted]:
                    await consul.deregister(sid)
                    del self._registered[sid]
                    for seen in self._own_seen.values():
                        seen.discard(sid)
                for sid in sorted(self._leftovers(wanted)):
                    log.info("Consul at %s: removing %s, left by an earlier pilot of this "
                             "project", self.settings.address, sid)
                    await consul.deregister(sid)
                    for seen in self._own_seen.values():
                        seen.discard(sid)
                resync, self._resync = self._resync, False
                updated: set[str] = set()
                for sid, instance in wanted.items():
                    known = self._registered.get(sid)
                    if resync or known is None or _identity(known) != _identity(instance):
                        await consul.register(instance)
                    elif known.healthy == instance.healthy:
                        continue
                    await self._update_ttl(sid, instance.healthy)
                    self._registered[sid] = instance
                    updated.add(sid)
                if loop.time() >= next_pass:
                    for sid, instance in list(self._registered.items()):
                        if sid not in updated:
                            await self._update_ttl(sid, instance.healthy)
                    next_pass = loop.time() + self.ttl_interval
                failures = lost = 0
                self._answered("export", resync=not resync)
                if self._registered.keys() != before.keys():
                    self._changed()
            except ConsulError as err:
                self._resync = True  # whatever Consul lost meanwhile comes back
                if err.unknown_check:
                    lost += 1
                    log.warning("Consul at %s no longer knows this project's registrations "
                                "(restarted without its data?); registering them again",
                                self.settings.address)
                    self._answered("export", resync=False)
                    self._restart_import()
                    if lost > 1:  # again at once did not help: not in a tight loop
                        await self._pause(self._delay(err, lost))
                    continue
                failures += 1
                self._failed(err, "export")
                await self._pause(self._delay(err, failures))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._export_wake.wait(),
                                       max(0.0, next_pass - loop.time()))

    async def _update_ttl(self, sid: str, healthy: bool) -> None:
        assert self._client is not None
        if healthy:
            await self._client.pass_ttl(check_id(sid))
        else:
            await self._client.fail_ttl(check_id(sid), "the container or its proxy is not "
                                                        "healthy")

    def _request_resync(self, why: str) -> None:
        if self._registered and not self._resync:
            log.warning("Consul at %s: %s; registering this project's instances again",
                        self.settings.address, why)
            self._resync = True
            self._export_wake.set()

    async def _deregister_all(self) -> None:
        if not self._registered or self._client is None:
            return
        consul = self._client
        ids = list(self._registered)

        async def one(sid: str) -> None:
            with contextlib.suppress(ConsulError):
                await consul.deregister(sid)
                self._registered.pop(sid, None)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(one(s) for s in ids)),
                                   self.deregister_timeout)
        if self._registered:
            log.warning("Consul at %s: %d registrations could not be removed; they expire "
                        "by their TTL check", self.settings.address, len(self._registered))
        else:
            log.info("Consul at %s: deregistered %d instances", self.settings.address, len(ids))

    # ----------------------------------------------------------------------------- import

    async def _catalog_loop(self) -> None:
        assert self._client is not None
        consul = self._client
        index = 0
        failures = 0
        while True:
            try:
                sent = index
                index, names = await consul.services(index, wait=self.wait)
            except ConsulError as err:
                failures += 1
                self._failed(err, "import")
                index = 0
                await self._pause(self._delay(err, failures))
                continue
            failures = 0
            self._answered("import")
            if sent and index == 0:
                self._request_resync("its index went backwards (restored or rebuilt)")
            present = set(names)
            missing = {i.service for i in self._registered.values()} - present
            if missing:
                self._request_resync(f"the catalog lost {', '.join(sorted(missing))}")
            wanted = {n for n in names if n != CONSUL_SERVICE}
            for name in [n for n in self._watches if n not in wanted]:
                self._watches.pop(name).cancel()
                self._own_seen.pop(name, None)
            for name in [n for n in self._imported if n not in wanted]:
                del self._imported[name]
                self._changed()
            for name in sorted(wanted - self._watches.keys()):
                self._watches[name] = asyncio.create_task(self._health_loop(name),
                                                          name=f"consul-health-{name}")
            if index == sent:
                await asyncio.sleep(self.quiet_pause)

    async def _health_loop(self, name: str) -> None:
        assert self._client is not None
        consul = self._client
        index = 0
        failures = 0
        while True:
            try:
                sent = index
                index, instances = await consul.healthy(name, index, wait=self.wait)
            except ConsulError as err:
                failures += 1
                self._failed(err, "import")
                index = 0
                await self._pause(self._delay(err, failures))
                continue
            failures = 0
            self._answered("import")
            kept = tuple(sorted((i for i in instances if not self._own(i)),
                                key=lambda i: (i.id, i.node, i.address, i.port)))
            self._note_own(name, instances)
            if kept != self._imported.get(name, ()):
                if kept:
                    self._imported[name] = kept
                else:
                    self._imported.pop(name, None)
                self._changed()
            if index == sent:
                await asyncio.sleep(self.quiet_pause)

    def _note_own(self, name: str, instances: tuple[CatalogInstance, ...]) -> None:
        """The own registrations an answer had: any that no workload calls for is an earlier
        pilot's (crashed or killed before it deregistered), removed now rather than left
        passing until its TTL runs out."""
        own = {i.id for i in instances if self._own(i)}
        if own:
            self._own_seen[name] = own
        else:
            self._own_seen.pop(name, None)
        if self._workloads_known and self._leftovers(self._wanted()):
            self._export_wake.set()

    def _leftovers(self, wanted: Mapping[str, ExportedInstance]) -> set[str]:
        if not self._workloads_known:
            return set()
        seen = set().union(*self._own_seen.values()) if self._own_seen else set()
        return seen - wanted.keys() - self._registered.keys()

    def _own(self, instance: CatalogInstance) -> bool:
        return instance.project == self.project and \
            instance.address == self.settings.host_address

    # ----------------------------------------------------------------- state and the view

    def _delay(self, err: ConsulError, failures: int) -> float:
        if err.kind == "acl":
            return self.acl_retry
        return backoff_delay(failures, initial=min(RETRY_INITIAL_S, self.retry_cap),
                             cap=self.retry_cap)

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay``, or less if Consul answers another loop meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._recovered.wait(), delay)

    def _failed(self, err: ConsulError, where: str) -> None:
        """A call of ``where`` (``export`` or ``import``) failed: said once per spell."""
        said = any(p.kind == err.kind for p in self._problems.values())
        self._problems[where] = err
        self.failed_calls += 1
        self._contacted = True
        if said:
            return
        if err.kind == "unreachable":
            log.warning("%s; the mesh works locally, exports and imports wait for Consul "
                        "(imported instances kept as last known)", err)
        elif err.kind == "acl":
            log.error("Consul at %s: %s; retrying every %gs", self.settings.address, err,
                      self.acl_retry)
        else:
            log.warning("%s", err)
        self._changed()

    def _answered(self, where: str, *, resync: bool = True) -> None:
        """A call of ``where`` got through; after an outage everything is registered again
        (``resync``: unless the caller just did) and every waiting loop tries at once."""
        first = not self._contacted
        self._contacted = True
        problem = self._problems.pop(where, None)
        if not first and problem is None:
            return
        outage_over = problem is not None and problem.kind == "unreachable" and not any(
            p.kind == "unreachable" for p in self._problems.values())
        if first:
            log.info("Consul at %s answers", self.settings.address)
        elif outage_over:
            log.info("Consul at %s answers again", self.settings.address)
            if resync:
                self._resync = True
                self._export_wake.set()
            for p in list(self._problems):
                if self._problems[p].kind == "unreachable":
                    del self._problems[p]
        self._recovered.set()
        self._recovered = asyncio.Event()
        self._changed()

    def _changed(self) -> None:
        self._changed_at = time.time()
        self._dirty.set()

    def current_view(self) -> ConsulView:
        exported: dict[str, list[str]] = {}
        for sid, instance in sorted(self._registered.items()):
            exported.setdefault(instance.service, []).append(sid)
        imported: Mapping[str, tuple[CatalogInstance, ...]] = {
            name: self._imported[name] for name in sorted(self._imported)}
        problem = self._problems.get("export") or self._problems.get("import")
        return ConsulView(
            reachable=self._contacted and problem is None,
            error=str(problem) if problem else "",
            error_kind=problem.kind if problem else "",
            exported={k: tuple(v) for k, v in sorted(exported.items())}, imported=imported,
            changed_at=self._changed_at)

    async def _publish_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(DEBOUNCE_S)
            self._dirty.clear()
            view = self.current_view()
            if view == self.view:
                continue
            self.view = view
            try:
                await self._on_view(view)
            except Exception:  # a pilot that failed to publish must not stop the watch
                log.exception("publishing the Consul view failed")


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the Consul catalog watch stopped", exc_info=task.exception())


def _identity(instance: ExportedInstance) -> ExportedInstance:
    """What a registration holds apart from the check's status (changed by TTL updates)."""
    return ExportedInstance(instance.project, instance.compose_service, instance.instance,
                            instance.service, instance.version, instance.spiffe, True)
