"""Upstream connections and their pool, against a scripted server on loopback.

The pool's four questions per connection, LIFO reuse, the idle cap and expiry (on a clock
the test moves), and how each framing of a response reaches the exchange that asked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from composemesh.proxy.upstream import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    UpstreamConnection,
    UpstreamPool,
)

from .conftest import run_on


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sink:
    """Records what a connection tells the exchange (the ResponseSink protocol)."""

    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.done = asyncio.get_running_loop().create_future()

    def response_head(self, conn: UpstreamConnection, status: int, head: bytes,
                      framing: int) -> None:
        self.events.append(("head", status, head, framing))

    def response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def response_done(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.events.append(("done", reusable))
        self.done.set_result(reusable)

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        self.events.append(("lost", conn.got_bytes))
        self.done.set_result(None)

    def upstream_paused(self, paused: bool) -> None:
        self.events.append(("paused", paused))

    def flush(self) -> None:
        pass

    def upgraded(self, conn: UpstreamConnection, rest: bytes) -> None:
        self.events.append(("upgraded", rest))

    def body(self) -> bytes:
        return b"".join(e[1] for e in self.events if e[0] == "body")  # type: ignore[misc]


class Scripted:
    """Answers the n-th request on each connection with ``answers[n]`` (None: close)."""

    def __init__(self, *answers: bytes | None) -> None:
        self.answers = answers
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            for answer in self.answers:
                await reader.readuntil(b"\r\n\r\n")
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
            else:
                await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@contextlib.asynccontextmanager
async def served(*answers: bytes | None, clock: Clock | None = None, max_idle: int = 64
                 ) -> AsyncIterator[tuple[UpstreamPool, tuple[str, int], Scripted]]:
    script = Scripted(*answers)
    server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
    pool = UpstreamPool(max_idle_per_host=max_idle, idle_expiry=60.0,
                        clock=clock or Clock())
    try:
        yield pool, server.sockets[0].getsockname()[:2], script
    finally:
        pool.close()
        server.close()


async def exchange(conn: UpstreamConnection, request: bytes = b"GET / HTTP/1.1\r\n\r\n",
                   head_only: bool = False) -> Sink:
    sink = Sink()
    conn.attach(sink, head_only)
    conn.transport.write(request)
    await asyncio.wait_for(sink.done, 5)
    return sink


def test_four_questions_through_a_connections_life(loop_kind: str) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def main() -> None:
        async with served(ok, None) as (pool, key, script):
            conn = await pool.connect(key, 5)
            now = pool.clock()
            assert (conn.is_available(), conn.is_idle(), conn.has_expired(now),
                    conn.is_closed()) == (True, True, False, False)
            sink = Sink()
            conn.attach(sink, False)
            assert not conn.is_available() and not conn.is_idle()
            conn.transport.write(b"GET / HTTP/1.1\r\n\r\n")
            assert await asyncio.wait_for(sink.done, 5) is True
            assert conn.is_available() and conn.is_idle()
            pool.release(conn)
            assert pool.idle_count() == 1
            script.writers[0].close()  # the upstream ends the idle connection
            await asyncio.sleep(0.05)
            assert conn.is_closed() and conn.has_expired(pool.clock())
            assert pool.idle_count() == 0 and not pool.connections
            assert pool.acquire(key) is None

    run_on(loop_kind, main())


def test_idle_connections_are_reused_last_in_first_out_up_to_the_cap(loop_kind: str) -> None:
    async def main() -> None:
        async with served(max_idle=2) as (pool, key, script):
            conns = [await pool.connect(key, 5) for _ in range(3)]
            for conn in conns:
                pool.release(conn)
            assert pool.idle_count() == 2
            await asyncio.sleep(0.01)
            assert conns[2].is_closed()  # over the cap
            assert pool.acquire(key) is conns[1]
            assert pool.acquire(key) is conns[0]
            assert pool.acquire(key) is None
            assert (pool.opened, pool.reused) == (3, 2)

    run_on(loop_kind, main())


def test_idle_connections_expire(loop_kind: str) -> None:
    async def main() -> None:
        clock = Clock()
        async with served(clock=clock) as (pool, key, script):
            old, young = await pool.connect(key, 5), await pool.connect(key, 5)
            pool.release(old)
            clock.now += 50
            pool.release(young)
            clock.now += 20  # old: idle 70 s, young: 20 s
            pool._sweep()
            assert pool.idle_count() == 1
            assert pool.acquire(key) is young
            pool.release(young)
            clock.now += 61
            assert pool.acquire(key) is None  # expired when asked for, and closed
            await asyncio.sleep(0.01)
            assert young.is_closed()

    run_on(loop_kind, main())


def test_a_connect_failure_is_an_oserror() -> None:
    async def main() -> None:
        async with served() as (pool, key, script):
            pass  # the server is closed now
        pool = UpstreamPool()
        task = pool.connect(key, 1)
        try:
            await task
        except OSError:
            pass
        else:
            raise AssertionError("connected to a closed port")

    asyncio.run(main())


def test_framings_of_a_response(loop_kind: str) -> None:
    answers = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n",  # to a HEAD
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nby",
    )

    async def main() -> None:
        async with served(*answers) as (pool, key, script):
            conn = await pool.connect(key, 5)
            sink = await exchange(conn)
            assert sink.events[0] == (
                "head", 200, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", LENGTH)
            assert (sink.body(), sink.events[-1]) == (b"hello", ("done", True))

            sink = await exchange(conn)
            assert sink.events[0][3] == CHUNKED
            assert (sink.body(), sink.events[-1]) == (b"abcde", ("done", True))

            sink = await exchange(conn)
            assert [e[:2] for e in sink.events] == [("head", 100), ("head", 204), ("done", True)]
            assert sink.events[1][2:] == (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n", NO_BODY)

            sink = await exchange(conn, b"HEAD / HTTP/1.1\r\n\r\n", head_only=True)
            assert [e[0] for e in sink.events] == ["head", "done"]
            assert sink.events[0][3] == NO_BODY

            sink = await exchange(conn)  # the HEAD's parser was replaced: this one parses
            assert b"Connection" not in sink.events[0][2]  # type: ignore[operator]
            assert (sink.body(), sink.events[-1]) == (b"by", ("done", False))  # close asked
            assert conn.requests == 5

    run_on(loop_kind, main())


def test_a_close_delimited_body_ends_with_the_close(loop_kind: str) -> None:
    async def main() -> None:
        async with served(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", None) as (pool, key, script):
            conn = await pool.connect(key, 5)
            sink = Sink()
            conn.attach(sink, False)
            conn.transport.write(b"GET / HTTP/1.1\r\n\r\n")
            await asyncio.sleep(0.05)
            assert sink.events[0][3] == UNTIL_CLOSE
            assert not sink.done.done()
            script.writers[0].close()
            assert await asyncio.wait_for(sink.done, 5) is False
            assert sink.body() == b"until the end"

    run_on(loop_kind, main())


def test_a_close_before_the_answer_is_lost_and_says_whether_bytes_came(loop_kind: str) -> None:
    async def main() -> None:
        async with served(None) as (pool, key, script):
            conn = await pool.connect(key, 5)
            sink = await exchange(conn)
            assert sink.events == [("lost", False)]
        async with served(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhalf") as (
                pool, key, script):
            conn = await pool.connect(key, 5)
            sink = Sink()
            conn.attach(sink, False)
            conn.transport.write(b"GET / HTTP/1.1\r\n\r\n")
            await asyncio.sleep(0.05)
            script.writers[0].close()
            await asyncio.wait_for(sink.done, 5)
            assert sink.events[-1] == ("lost", True)

    run_on(loop_kind, main())


def test_a_detached_response_is_read_to_its_end_and_pooled(loop_kind: str) -> None:
    async def main() -> None:
        body = b"x" * 200_000
        answer = b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        async with served(answer) as (pool, key, script):
            conn = await pool.connect(key, 5)
            sink = Sink()

            class Detaching(Sink):
                def response_head(self, conn: UpstreamConnection, status: int, head: bytes,
                                  framing: int) -> None:
                    conn.detach()

            sink = Detaching()
            conn.attach(sink, False)
            conn.transport.write(b"GET / HTTP/1.1\r\n\r\n")
            for _ in range(100):
                if pool.idle_count():
                    break
                await asyncio.sleep(0.01)
            assert pool.acquire(key) is conn
            assert sink.events == []

    run_on(loop_kind, main())


def test_garbage_from_the_upstream_drops_the_connection(loop_kind: str) -> None:
    async def main() -> None:
        async with served(b"SSH-2.0-OpenSSH_9.6\r\n\r\n") as (pool, key, script):
            conn = await pool.connect(key, 5)
            sink = await exchange(conn)
            assert sink.events == [("lost", True)]
            assert conn.is_closed()

    run_on(loop_kind, main())
