"""Access logs and traces through two real proxies with mTLS between them (A, the caller's
sidecar; B, the app's), each writing its access log to a real pipe, spans going to a real
HTTP collector (an aiohttp server on loopback that keeps what is POSTed)."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from composemesh.model.monitoring import Telemetry, TracingSettings
from composemesh.proxy.access_log import AccessLog
from composemesh.proxy.telemetry import Observer
from tests.support import free_port

from .test_mtls import A_ADDR, Pki, new_pki, pair, tcp_call

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Pipe:
    """An access log's far end: the lines a proxy wrote, read whole."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.data = b""

    def lines(self) -> list[dict[str, Any]]:
        try:
            while chunk := os.read(self.r, 1 << 16):
                self.data += chunk
        except BlockingIOError:
            pass
        return [json.loads(line) for line in self.data.splitlines()]

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[str, list[Any]]]:
    got: list[Any] = []

    async def spans(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/api/v2/spans", spans)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/api/v2/spans", got
    finally:
        await runner.cleanup()


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not in time"
        await asyncio.sleep(0.02)


def test_a_request_is_one_trace_in_both_logs_the_app_and_the_collector() -> None:
    pki: Pki = new_pki()

    async def main() -> None:
        a_pipe, b_pipe = Pipe(), Pipe()
        async with collector() as (url, got):
            telemetry = Telemetry(tracing=TracingSettings(zipkin=url, sampling=1.0))
            a_obs = Observer(AccessLog(a_pipe.w), rng=random.Random(7))
            b_obs = Observer(AccessLog(b_pipe.w), rng=random.Random(8))
            try:
                async with pair(pki, a_observer=a_obs, b_observer=b_obs,
                                b_telemetry=telemetry) as p:
                    async with aiohttp.ClientSession() as session:
                        headers = {"traceparent": f"00-{TRACE}-{PARENT}-01",
                                   "x-request-id": "req-1", "user-agent": "test/1"}
                        async with session.get(p.url("/r?x=1"), headers=headers) as resp:
                            assert resp.status == 200
                    await until(lambda: a_pipe.lines() and b_pipe.lines())
                    [a_line], [b_line] = a_pipe.lines(), b_pipe.lines()
                    for line in (a_line, b_line):
                        assert line["trace_id"] == TRACE
                        assert line["request_id"] == "req-1"
                        assert (line["method"], line["path"], line["response_code"]) == (
                            "GET", "/r", 200)
                        assert line["user_agent"] == "test/1"
                    assert a_line["reporter"] == "source"
                    assert a_line["upstream_cluster"] == f"outbound|{p.port}|v1|reviews"
                    assert a_line["destination_principal"].endswith("/sa/reviews")
                    assert b_line["reporter"] == "destination"
                    assert b_line["source_workload"] == "productpage-v3"  # its certificate's
                    assert b_line["connection_security_policy"] == "mutual_tls"
                    assert b_line["bytes_sent"] == a_line["bytes_sent"] > 0
                    # the app sees B's span as the parent: the trace goes on through it
                    [seen] = p.app_headers
                    version, trace, span, flags = seen["traceparent"].split("-")
                    assert (version, trace, flags) == ("00", TRACE, "01")
                    assert seen["x-request-id"] == "req-1"
                    await a_obs.exporter.flush()  # type: ignore[union-attr]
                    await b_obs.exporter.flush()  # type: ignore[union-attr]
                    await until(lambda: sum(len(b) for b in got) == 2)
                    spans = {s["kind"]: s for body in got for s in body}
                    assert spans["CLIENT"]["traceId"] == spans["SERVER"]["traceId"] == TRACE
                    assert spans["CLIENT"]["parentId"] == PARENT  # the app's caller's span
                    assert spans["SERVER"]["parentId"] == spans["CLIENT"]["id"]
                    assert spans["SERVER"]["id"] == span  # what the app was told
                    assert spans["SERVER"]["tags"]["http.status_code"] == "200"
            finally:
                await a_obs.close()
                await b_obs.close()
                a_pipe.close()
                b_pipe.close()

    asyncio.run(main())


def test_access_logs_off_per_service_and_a_tcp_connection_logged_with_its_own_bytes() -> None:
    pki = new_pki()

    async def main() -> None:
        a_pipe, b_pipe = Pipe(), Pipe()
        a_obs, b_obs = Observer(AccessLog(a_pipe.w)), Observer(AccessLog(b_pipe.w))
        try:
            async with pair(pki, protocol="tcp", a_observer=a_obs, b_observer=b_obs,
                            b_telemetry=Telemetry(access_log=True)) as p:
                assert await tcp_call(A_ADDR, p.port, b"hello") == b"echo:hello"
                assert await tcp_call(A_ADDR, p.port, b"hi") == b"echo:hi"
                await until(lambda: len(a_pipe.lines()) == 2 and len(b_pipe.lines()) == 2)
                for lines in (a_pipe.lines(), b_pipe.lines()):
                    assert [(e["protocol"], e["bytes_received"], e["bytes_sent"])
                            for e in lines] == [("tcp", 5, 10), ("tcp", 2, 7)]
                [b_line, _] = b_pipe.lines()
                assert b_line["reporter"] == "destination"
                assert b_line["source_workload"] == "productpage-v3"
                b_obs.apply(Telemetry(access_log=False))  # as a snapshot turning it off says
                assert await tcp_call(A_ADDR, p.port, b"more") == b"echo:more"
                await until(lambda: len(a_pipe.lines()) == 3)
                await asyncio.sleep(0.2)
                assert len(b_pipe.lines()) == 2
        finally:
            await a_obs.close()
            await b_obs.close()
            a_pipe.close()
            b_pipe.close()

    asyncio.run(main())


def test_without_tracing_trace_headers_pass_untouched_and_a_request_id_is_added() -> None:
    pki = new_pki()

    async def main() -> None:
        a_obs = Observer(None)
        async with pair(pki, a_observer=a_obs) as p:
            async with aiohttp.ClientSession() as session:
                async with session.get(p.url(), headers={
                        "traceparent": f"00-{TRACE}-{PARENT}-00", "b3": "0"}) as resp:
                    assert resp.status == 200
                async with session.get(p.url()) as resp:
                    assert resp.status == 200
            first, second = p.app_headers
            assert first["traceparent"] == f"00-{TRACE}-{PARENT}-00"  # the app's own tracer's
            assert first["b3"] == "0"
            assert len(first["x-request-id"]) == 36
            assert "traceparent" not in second
            assert first["x-request-id"] != second["x-request-id"]
        await a_obs.close()

    asyncio.run(main())


def test_a_request_refused_for_its_head_is_logged_with_the_status_it_got() -> None:
    pki = new_pki()

    async def main() -> None:
        a_pipe = Pipe()
        a_obs = Observer(AccessLog(a_pipe.w))
        try:
            async with pair(pki, a_observer=a_obs) as p:
                reader, writer = await asyncio.open_connection(A_ADDR, p.port)
                writer.write(b"GET / HTTP/1.1\r\nHost: reviews\r\nX-Big: " + b"a" * 200_000
                             + b"\r\n\r\n")
                await writer.drain()
                head = await asyncio.wait_for(reader.readline(), 5)
                writer.close()
                assert head.startswith(b"HTTP/1.1 431"), head
                await until(lambda: a_pipe.lines())
                [line] = a_pipe.lines()
                assert (line["response_code"], line["response_flags"]) == (431, "DPE")
                assert line["reporter"] == "source" and line["method"] is None
                assert line["downstream_remote_address"].startswith(f"{A_ADDR}:")
                assert p.app_headers == []  # nothing reached the app
        finally:
            await a_obs.close()
            a_pipe.close()

    asyncio.run(main())
