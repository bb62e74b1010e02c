"""The pilot's heal of a namespace whose holder restarted: the proxy first, the app once the
proxy is ready again, as `up` starts them.

The engine is a double here (``Engine``): these tests script the order in which a restarted
proxy becomes healthy, which the real engine does on its own time. The proxy's health port is
a real HTTP server on a real socket. tests/e2e/test_bookinfo.py restarts a real holder on the
real engine.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from aiohttp import web

from composemesh.model import wellknown as wk
from composemesh.pilot.sources.docker import controller
from composemesh.pilot.sources.docker.controller import (
    DockerSource,
    heal_order,
    proxy_is_ready,
)

HOLDER = "h" * 64
EARLY, LATE = "2026-01-01T10:00:00.1Z", "2026-01-01T10:00:05.2Z"


def container(cid: str, role: str | None, started: str, *, health: str | None = "healthy",
              mode: str = f"container:{HOLDER}") -> dict[str, Any]:
    labels = {wk.LABEL_ROLE: role} if role else {}
    state: dict[str, Any] = {"Running": True, "StartedAt": started}
    if health is not None:
        state["Health"] = {"Status": health}
    return {"Id": cid, "Name": f"/{cid}", "State": state, "Config": {"Labels": labels},
            "HostConfig": {"NetworkMode": mode}}


class Engine:
    """The engine API double: inspect, list, restart; a restarted proxy reports ``starting``
    for ``starting_polls`` inspections, then ``healthy`` (never, if None)."""

    def __init__(self, containers: list[dict[str, Any]], starting_polls: int | None = 2) -> None:
        self.by_id = {c["Id"]: c for c in containers}
        self.starting_polls = starting_polls
        self.log: list[str] = []
        self.polls: dict[str, int] = {}

    async def inspect(self, cid: str) -> dict[str, Any]:
        found = self.by_id[cid]
        health = found["State"].get("Health")
        if health is not None and health["Status"] == "starting":
            self.polls[cid] = self.polls.get(cid, 0) + 1
            self.log.append(f"poll {cid}")
            if self.starting_polls is not None and self.polls[cid] > self.starting_polls:
                health["Status"] = "healthy"
                self.log.append(f"healthy {cid}")
        return found

    async def containers(self, *, project: str) -> list[dict[str, Any]]:
        return [{"Id": c["Id"], "State": "running", "HostConfig": c["HostConfig"]}
                for c in self.by_id.values()]

    async def restart(self, cid: str, timeout_s: int = 2) -> None:
        self.log.append(f"restart {cid}")
        found = self.by_id[cid]
        found["State"]["StartedAt"] = "2026-01-01T10:00:09Z"
        if found["State"].get("Health") is not None:
            found["State"]["Health"] = {"Status": "starting"}


def heal(engine: Engine) -> list[tuple[Any, ...]]:
    changes: list[tuple[Any, ...]] = []

    async def on_change(workloads: tuple[Any, ...]) -> None:
        changes.append(workloads)

    source = DockerSource(engine, "p", on_change)  # type: ignore[arg-type]
    asyncio.run(source.heal(HOLDER))
    return changes


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controller, "HEAL_READY_POLL_S", 0.001)


def test_the_app_restarts_only_once_its_restarted_proxy_is_ready() -> None:
    engine = Engine([
        container(HOLDER, wk.ROLE_NETNS, LATE, mode="bridge"),
        container("app", None, EARLY),  # listed before its proxy, as the engine may
        container("proxy", wk.ROLE_PROXY, EARLY),
    ])
    changes = heal(engine)
    assert engine.log == ["restart proxy", "poll proxy", "poll proxy", "poll proxy",
                          "healthy proxy", "restart app"]
    assert changes, "the holder's new address is published while the proxy starts"


def test_the_proxys_own_health_port_says_ready_before_the_engines_healthcheck_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The engine's healthcheck of the proxy never passes here; the proxy's /healthz/ready on
    # the namespace's address answers 503 twice, then 200: the app restarts then.
    answers = [503, 503, 200]
    asked: list[int] = []

    async def ready(request: web.Request) -> web.Response:
        asked.append(answers[min(len(asked), len(answers) - 1)])
        return web.Response(status=asked[-1])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(controller, "HEAL_PROBE_PORT", port)
    holder = container(HOLDER, wk.ROLE_NETNS, LATE, mode="bridge")
    holder["NetworkSettings"] = {"Networks": {"p_default": {"IPAddress": "127.0.0.1"}}}
    engine = Engine([holder, container("app", None, EARLY),
                     container("proxy", wk.ROLE_PROXY, EARLY)], starting_polls=None)

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/healthz/ready", ready)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await DockerSource(engine, "p", _ignore).heal(HOLDER)  # type: ignore[arg-type]
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert asked == [503, 503, 200]
    assert engine.log[0] == "restart proxy" and engine.log[-1] == "restart app"
    assert "healthy proxy" not in engine.log


async def _ignore(workloads: tuple[Any, ...]) -> None:
    pass


def test_what_started_after_the_holder_is_left_alone() -> None:
    engine = Engine([
        container(HOLDER, wk.ROLE_NETNS, EARLY, mode="bridge"),
        container("app", None, LATE),
        container("proxy", wk.ROLE_PROXY, LATE),
    ])
    heal(engine)
    assert engine.log == []


def test_a_proxy_that_never_gets_ready_holds_its_app_back_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(controller, "HEAL_READY_TIMEOUT_S", 0.05)
    engine = Engine([
        container(HOLDER, wk.ROLE_NETNS, LATE, mode="bridge"),
        container("proxy", wk.ROLE_PROXY, EARLY),
        container("app", None, EARLY),
    ], starting_polls=None)
    heal(engine)
    assert engine.log[0] == "restart proxy" and engine.log[-1] == "restart app"
    assert "healthy proxy" not in engine.log


def test_without_a_proxy_in_the_namespace_the_apps_restart_at_once() -> None:
    engine = Engine([
        container(HOLDER, wk.ROLE_NETNS, LATE, mode="bridge"),
        container("app", None, EARLY, health=None),
    ])
    heal(engine)
    assert engine.log == ["restart app"]


def test_heal_order_puts_proxies_first() -> None:
    app, proxy = container("app", None, EARLY), container("proxy", wk.ROLE_PROXY, EARLY)
    assert heal_order([app, proxy]) == ([proxy], [app])
    assert heal_order([]) == ([], [])


@pytest.mark.parametrize(
    ("state", "ready"),
    [
        ({"Running": True, "Health": {"Status": "healthy"}}, True),
        ({"Running": True, "Health": {"Status": "starting"}}, False),
        ({"Running": True, "Health": {"Status": "unhealthy"}}, False),
        ({"Running": True}, True),  # no healthcheck: running is all it can say
        ({"Running": False, "Health": {"Status": "starting"}}, True),  # gone: wait no more
    ],
)
def test_proxy_is_ready(state: dict[str, Any], ready: bool) -> None:
    assert proxy_is_ready(state) is ready
