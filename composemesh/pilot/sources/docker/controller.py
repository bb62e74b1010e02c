"""Watches the Docker engine's event stream and republishes the project's workloads on change.

Like Traefik's Docker provider: every relevant event triggers a fresh listing, converted in
full, so a missed or reordered event can never leave the model stale. No polling loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from composemesh.backoff import backoff_delay
from composemesh.errors import EngineError
from composemesh.model import wellknown as wk
from composemesh.model.mesh import Workload
from composemesh.pilot.sources.docker.convert import (
    addresses,
    dependents_of,
    is_stranded,
    workloads_from_containers,
)
from composemesh.pilot.sources.docker.engine_api import EngineAPI

log = logging.getLogger("composemesh.pilot.docker")

# Actions after which the set of workloads or their addresses/health may differ.
RELEVANT = (
    "create",
    "start",
    "restart",
    "die",
    "stop",
    "kill",
    "destroy",
    "rename",
    "pause",
    "unpause",
    "health_status",
    "connect",
    "disconnect",
    "update",
)
DEBOUNCE_S = 0.05
# A healed namespace's apps restart once its proxy is ready, or after this long at the most.
HEAL_READY_TIMEOUT_S = 60.0
HEAL_READY_POLL_S = 0.2
HEAL_PROBE_TIMEOUT_S = 0.5
HEAL_PROBE_PORT = wk.PORT_HEALTH  # the proxy's /healthz/ready, on its namespace's addresses


class DockerSource:
    """Owns the event watch; calls ``on_change`` with the project's workloads after each change."""

    def __init__(
        self,
        api: EngineAPI,
        project: str,
        on_change: Callable[[tuple[Workload, ...]], Awaitable[None]],
    ) -> None:
        self._api = api
        self._project = project
        self._on_change = on_change
        self.synced = asyncio.Event()

    async def resync(self) -> None:
        containers = await self._api.containers(project=self._project)
        workloads, skipped = workloads_from_containers(containers, project=self._project)
        for reason in skipped:
            log.warning("skipped container %s", reason)
        await self._on_change(workloads)
        self.synced.set()

    async def heal(self, holder_id: str) -> None:
        """Restart whatever still sits in the dead namespace of a holder that restarted.

        `docker restart` (or a crash) of a netns holder gives it a new namespace; the app and
        the proxy that joined the old one would be left without network until restarted.

        The proxies go first, and the apps only once their proxy is ready again (healthy:
        capture listeners bound, a snapshot applied, a certificate held), the order `up`
        starts them in (an app depends on its proxy being healthy). An app back before its
        proxy would send its first requests through a proxy with no snapshot yet: out
        uncaptured, in plaintext, refused by the STRICT peer it called.
        """
        try:
            holder = await self._api.inspect(holder_id)
            listing = await self._api.containers(project=self._project)
            stranded = []
            for dependent_id in dependents_of(listing, holder["Id"]):
                dependent = await self._api.inspect(dependent_id)
                if is_stranded(dependent, holder):
                    stranded.append(dependent)
            proxies, apps = heal_order(stranded)
            for dependent in proxies:
                await self._restart(holder, dependent)
            if proxies and apps:
                await self.resync()  # the holder's new address goes out while they start
                await self._until_ready(proxies, list(addresses(holder)))
            for dependent in apps:
                await self._restart(holder, dependent)
        except EngineError as exc:
            log.warning("could not heal the dependents of %s: %s", holder_id[:12], exc)

    async def _restart(self, holder: dict[str, Any], dependent: dict[str, Any]) -> None:
        log.warning(
            "holder %s restarted: restarting %s to rejoin its namespace",
            holder["Name"].lstrip("/"),
            dependent["Name"].lstrip("/"),
        )
        await self._api.restart(dependent["Id"])

    async def _until_ready(self, proxies: list[dict[str, Any]], addresses: list[str]) -> None:
        """Wait until the restarted proxies are ready, or gone, for at most
        HEAL_READY_TIMEOUT_S: an app is not kept from its namespace for longer.

        Ready is what the proxy's health port says, asked on the namespace's own addresses
        (the new namespace: only the restarted proxy can answer there), or what the engine's
        healthcheck of it says, whichever knows first: the healthcheck runs every few seconds,
        and each second more is a second the namespace's app has no network.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HEAL_READY_TIMEOUT_S
        waiting = [str(p["Id"]) for p in proxies]
        timeout = aiohttp.ClientTimeout(total=HEAL_PROBE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                states = [(await self._api.inspect(pid)).get("State") or {} for pid in waiting]
                waiting = [pid for pid, state in zip(waiting, states, strict=True)
                           if not proxy_is_ready(state)]
                if not waiting or await _answers_ready(http, addresses):
                    return
                if loop.time() >= deadline:
                    log.warning("proxies %s not ready after %.0fs; restarting their apps anyway",
                                ", ".join(pid[:12] for pid in waiting), HEAL_READY_TIMEOUT_S)
                    return
                await asyncio.sleep(HEAL_READY_POLL_S)

    async def run(self) -> None:
        """Watch until cancelled; reconnects (and relists) if the engine drops the stream."""
        failures = 0  # engine errors in a row
        while True:
            try:
                events = self._api.events(project=self._project)
                # Subscribe first, then list: nothing that happens in between is lost.
                first = asyncio.ensure_future(anext(events))
                await asyncio.sleep(0)
                await self.resync()
                failures = 0
                pending: asyncio.Future[dict[str, Any]] = first
                while True:
                    event = await pending
                    pending = asyncio.ensure_future(anext(events))
                    if not _relevant(event):
                        continue
                    if _holder_started(event):
                        await self.heal(str(event.get("id") or event["Actor"]["ID"]))
                    await asyncio.sleep(DEBOUNCE_S)
                    await self.resync()
            except StopAsyncIteration:
                log.warning("engine closed the event stream; reconnecting")
            except EngineError as exc:
                failures += 1
                delay = backoff_delay(failures, initial=0.5, cap=5.0)
                log.warning("%s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)


def heal_order(
    stranded: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The stranded containers of one namespace (``docker inspect`` results) split into the
    proxies, to restart first, and the rest (the apps), to restart once the proxies are ready.
    """
    def is_proxy(c: dict[str, Any]) -> bool:
        labels = (c.get("Config") or {}).get("Labels") or {}
        return labels.get(wk.LABEL_ROLE) == wk.ROLE_PROXY

    return [c for c in stranded if is_proxy(c)], [c for c in stranded if not is_proxy(c)]


async def _answers_ready(http: aiohttp.ClientSession, addresses: list[str]) -> bool:
    """True when the proxy's health port answers 200 (ready) on one of ``addresses``."""
    for address in addresses:
        host = f"[{address}]" if ":" in address else address
        try:
            async with http.get(f"http://{host}:{HEAL_PROBE_PORT}/healthz/ready") as resp:
                if resp.status == 200:
                    return True
        except (TimeoutError, aiohttp.ClientError, OSError):
            continue
    return False


def proxy_is_ready(state: dict[str, Any]) -> bool:
    """A proxy container's ``State`` says it is ready: running, and healthy if it has a
    healthcheck (the injected one asks the proxy's /healthz/ready); one that stopped is
    waited for no longer either (its app has nothing better to wait for)."""
    if not state.get("Running"):
        return True
    health = state.get("Health")
    return not health or health.get("Status") == "healthy"


def _holder_started(event: dict[str, Any]) -> bool:
    actor = event.get("Actor") or {}
    attributes = (actor.get("Attributes") or {}) if isinstance(actor, dict) else {}
    return event.get("Action") == "start" and attributes.get(wk.LABEL_ROLE) == wk.ROLE_NETNS


def _relevant(event: object) -> bool:
    if not isinstance(event, dict):
        return False
    action = str(event.get("Action") or event.get("status") or "")
    return action.split(":")[0].strip() in RELEVANT
