"""`up`'s look at Consul, against the agent double (``tests/consul/agent_double.py``, which
stands in for a Consul agent: none can be installed here) served over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aiohttp import web

from composemesh.engine.consul_check import consul_preflight
from composemesh.errors import ConfigError
from composemesh.model.consul import ConsulSettings
from tests.consul.agent_double import AgentDouble
from tests.support import free_port


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def serve(loop: asyncio.AbstractEventLoop, double: AgentDouble) -> tuple[web.AppRunner, int]:
    port = free_port()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(double.make_app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    return loop.run_until_complete(start()), port


def check(loop: asyncio.AbstractEventLoop, settings: ConsulSettings) -> str | None:
    return loop.run_until_complete(asyncio.to_thread(consul_preflight, settings, timeout=2))


def test_an_agent_that_answers_is_no_warning(loop: asyncio.AbstractEventLoop) -> None:
    runner, port = serve(loop, AgentDouble(token="secret"))
    try:
        settings = ConsulSettings(f"http://127.0.0.1:{port}", token="secret",
                                  host_address="192.0.2.1")
        assert check(loop, settings) is None
    finally:
        loop.run_until_complete(runner.cleanup())


def test_a_refused_token_is_one_error_naming_token_file_never_the_token(
        loop: asyncio.AbstractEventLoop) -> None:
    runner, port = serve(loop, AgentDouble(token="secret"))
    try:
        settings = ConsulSettings(f"http://127.0.0.1:{port}", token="wrong-one",
                                  host_address="192.0.2.1")
        with pytest.raises(ConfigError) as caught:
            check(loop, settings)
        message = str(caught.value)
        assert "x-composemesh.consul.token_file" in message and "refused" in message
        assert "wrong-one" not in message
    finally:
        loop.run_until_complete(runner.cleanup())


def test_an_unknown_datacenter_is_an_error_naming_it(loop: asyncio.AbstractEventLoop) -> None:
    runner, port = serve(loop, AgentDouble())
    try:
        settings = ConsulSettings(f"http://127.0.0.1:{port}", datacenter="dc9",
                                  host_address="192.0.2.1")
        with pytest.raises(ConfigError, match=r"consul\.datacenter.*dc9"):
            check(loop, settings)
    finally:
        loop.run_until_complete(runner.cleanup())


def test_an_agent_that_does_not_answer_is_a_warning(loop: asyncio.AbstractEventLoop) -> None:
    settings = ConsulSettings(f"http://127.0.0.1:{free_port()}", host_address="192.0.2.1")
    warning = check(loop, settings)
    assert warning is not None and "does not answer" in warning and "works locally" in warning
