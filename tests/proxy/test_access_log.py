"""Access logs: the exact JSON lines (Istio's default field names), and the writer on a real
pipe: lines whole and in order, one write per loop iteration, a full pipe costs lines and
never the loop's time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator

import pytest

from composemesh.proxy import access_log
from composemesh.proxy.access_log import (
    AccessLog,
    http_entry,
    nonblocking_fd,
    rfc3339_ms,
    tcp_entry,
)

from .conftest import run_on

START = 1764748181.25  # 2025-12-03T07:49:41.250Z


def request_line(**changes: object) -> bytes:
    fields: dict[str, object] = dict(
        start_time=START, method="GET", path="/reviews/0", protocol="HTTP/1.1",
        response_code=200, response_flags="", bytes_received=0, bytes_sent=295, duration=3,
        upstream_service_time=2, x_forwarded_for=None, user_agent="curl/8.5.0",
        request_id="cd613e30-d8f1-4adf-91b7-584a2265b1f5", authority="reviews:9080",
        upstream_host="172.18.0.5:15006", upstream_cluster="outbound|9080|v1|reviews",
        downstream_local_address="172.18.0.4:9080",
        downstream_remote_address="172.18.0.3:40312", route_name="default",
        reporter="source", trace_id="0af7651916cd43dd8448eb211c80319c",
        source_workload="productpage-v1",
        source_principal="spiffe://cluster.local/ns/shop/sa/productpage",
        destination_service="reviews", destination_workload="reviews-v1",
        destination_principal="spiffe://cluster.local/ns/shop/sa/reviews",
        connection_security_policy="mutual_tls")
    fields.update(changes)
    return http_entry(**fields)  # type: ignore[arg-type]


def test_an_http_line_exact() -> None:
    assert request_line() == (
        b'{"start_time":"2025-12-03T07:49:41.250Z","method":"GET","path":"/reviews/0",'
        b'"protocol":"HTTP/1.1","response_code":200,"response_flags":"-",'
        b'"bytes_received":0,"bytes_sent":295,"duration":3,"upstream_service_time":2,'
        b'"x_forwarded_for":null,"user_agent":"curl/8.5.0",'
        b'"request_id":"cd613e30-d8f1-4adf-91b7-584a2265b1f5","authority":"reviews:9080",'
        b'"upstream_host":"172.18.0.5:15006","upstream_cluster":"outbound|9080|v1|reviews",'
        b'"downstream_local_address":"172.18.0.4:9080",'
        b'"downstream_remote_address":"172.18.0.3:40312","route_name":"default",'
        b'"reporter":"source","trace_id":"0af7651916cd43dd8448eb211c80319c",'
        b'"source_workload":"productpage-v1",'
        b'"source_principal":"spiffe://cluster.local/ns/shop/sa/productpage",'
        b'"destination_service":"reviews","destination_workload":"reviews-v1",'
        b'"destination_principal":"spiffe://cluster.local/ns/shop/sa/reviews",'
        b'"connection_security_policy":"mutual_tls"}\n')


def test_unknown_values_are_null_and_text_is_escaped() -> None:
    line = request_line(response_code=0, response_flags="UF,URX", upstream_service_time=None,
                        user_agent="", upstream_host=None, trace_id="", path='/a"b\\c\n',
                        x_forwarded_for="10.0.0.1, 172.18.0.2")
    assert line.endswith(b"}\n") and line.count(b"\n") == 1  # one line, whatever the path
    entry = json.loads(line)
    assert (entry["response_code"], entry["response_flags"]) == (0, "UF,URX")
    assert entry["upstream_service_time"] is None and entry["user_agent"] is None
    assert entry["upstream_host"] is None and entry["trace_id"] is None
    assert entry["path"] == '/a"b\\c\n'
    assert entry["x_forwarded_for"] == "10.0.0.1, 172.18.0.2"


def test_a_tcp_line_exact() -> None:
    line = tcp_entry(start_time=START, duration=1200, bytes_received=10, bytes_sent=2048,
                     upstream_host="172.18.0.6:15006", upstream_cluster="outbound|5432||db",
                     downstream_local_address="172.18.0.6:5432",
                     downstream_remote_address="172.18.0.3:51000", reporter="destination",
                     source_workload="web-v1",
                     source_principal="spiffe://cluster.local/ns/shop/sa/web",
                     destination_service="db", destination_workload="db-v1",
                     destination_principal="spiffe://cluster.local/ns/shop/sa/db",
                     connection_security_policy="mutual_tls")
    assert line == (
        b'{"start_time":"2025-12-03T07:49:41.250Z","protocol":"tcp","response_flags":"-",'
        b'"bytes_received":10,"bytes_sent":2048,"duration":1200,'
        b'"upstream_host":"172.18.0.6:15006","upstream_cluster":"outbound|5432||db",'
        b'"downstream_local_address":"172.18.0.6:5432",'
        b'"downstream_remote_address":"172.18.0.3:51000","reporter":"destination",'
        b'"source_workload":"web-v1","source_principal":"spiffe://cluster.local/ns/shop/sa/web",'
        b'"destination_service":"db","destination_workload":"db-v1",'
        b'"destination_principal":"spiffe://cluster.local/ns/shop/sa/db",'
        b'"connection_security_policy":"mutual_tls"}\n')
    bare = json.loads(tcp_entry(start_time=START, duration=0, bytes_received=0, bytes_sent=0,
                                response_flags="UF", reporter="source"))
    assert bare["response_flags"] == "UF" and bare["upstream_host"] is None


def test_start_time_is_rfc3339_utc_with_milliseconds() -> None:
    assert rfc3339_ms(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_ms(START) == "2025-12-03T07:49:41.250Z"
    assert rfc3339_ms(START + 0.749) == "2025-12-03T07:49:41.999Z"
    assert rfc3339_ms(START + 0.75) == "2025-12-03T07:49:42.000Z"  # the next second
    assert rfc3339_ms(START - 86400) == "2025-12-02T07:49:41.250Z"


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    yield read, write
    for fd in (read, write):
        with contextlib.suppress(OSError):
            os.close(fd)


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def numbered(n: int, width: int = 0) -> bytes:
    return b'{"n":%d,"pad":"%s"}\n' % (n, b"x" * (width or n % 97))


async def batch() -> None:
    """Past the flush of what was written so far (its timer is due first)."""
    await asyncio.sleep(access_log.FLUSH_DELAY + 0.01)


def test_lines_arrive_whole_in_order_one_write_per_batch(
        loop_kind: str, pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = pipe
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        if fd == write:
            writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(access_log.os, "write", counting_write)

    async def main() -> None:
        log = AccessLog(write)
        for n in range(100):
            log.write(numbered(n))
        assert writes == []  # nothing yet: the flush comes FLUSH_DELAY later
        await batch()
        assert len(writes) == 1  # one write for the hundred
        assert read_all(read) == b"".join(numbered(n) for n in range(100))
        log.write(numbered(100))
        await batch()
        assert len(writes) == 2
        assert read_all(read) == numbered(100)
        assert log.dropped == 0

    run_on(loop_kind, main())


def test_a_slow_reader_gets_every_line_whole_and_in_order(loop_kind: str,
                                                          pipe: tuple[int, int]) -> None:
    read, write = pipe
    os.set_blocking(write, False)
    total = 20000  # about 1.5 MB through a 64 KiB pipe

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        got = bytearray()
        os.set_blocking(read, False)

        def readable() -> None:
            got.extend(os.read(read, 4096))  # slower than the writer

        loop.add_reader(read, readable)
        log = AccessLog(write)
        for n in range(total):
            log.write(numbered(n))
            if n % 500 == 0:
                await asyncio.sleep(0.001)
        async with asyncio.timeout(10):
            while got.count(b"\n") < total:
                await asyncio.sleep(0.005)
        loop.remove_reader(read)
        assert log.dropped == 0
        return bytes(got)

    got = run_on(loop_kind, main())
    assert got == b"".join(numbered(n) for n in range(total))


def test_a_full_pipe_drops_and_counts_without_blocking_the_loop(
        loop_kind: str, pipe: tuple[int, int]) -> None:
    read, write = pipe
    os.set_blocking(write, False)
    width = 200
    line_size = len(numbered(0, width))

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        log = AccessLog(write, max_buffer=64 * 1024)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = loop.create_task(ticker())
        total = 5000  # about 1 MB: the pipe (64 KiB) and the buffer (64 KiB) take 1/8 of it
        started = time.monotonic()
        for n in range(total):
            log.write(numbered(n, width))
            if n % 50 == 0:
                await asyncio.sleep(0)
        spent = time.monotonic() - started
        assert spent < 2.0  # nobody reads, yet no write waited
        assert ticks > 50  # the loop kept turning
        dropped = log.dropped
        assert dropped > 0
        assert log.written <= 65536 + line_size
        # the reader comes back: what was kept arrives without another write()
        got = bytearray()
        os.set_blocking(read, False)
        loop.add_reader(read, lambda: got.extend(os.read(read, 1 << 16)))
        async with asyncio.timeout(5):
            while got.count(b"\n") < total - dropped:
                await asyncio.sleep(0.005)
        loop.remove_reader(read)
        task.cancel()
        assert log.dropped == dropped
        assert bytes(got) == b"".join(numbered(n, width) for n in range(total - dropped))
        return dropped, total

    dropped, total = run_on(loop_kind, main())
    assert 0 < dropped < total


def test_enabled_is_read_on_every_write(loop_kind: str, pipe: tuple[int, int]) -> None:
    read, write = pipe

    async def main() -> None:
        log = AccessLog(write)
        log.write(numbered(1))
        log.enabled = False
        log.write(numbered(2))
        await batch()
        log.enabled = True
        log.write(numbered(3))
        await batch()
        assert read_all(read) == numbered(1) + numbered(3)
        assert log.dropped == 0  # switched off is not dropped

    run_on(loop_kind, main())


def test_close_flushes_what_is_buffered(loop_kind: str, pipe: tuple[int, int]) -> None:
    read, write = pipe

    async def main() -> None:
        log = AccessLog(write)
        log.write(numbered(1))
        log.write(numbered(2))
        log.close()  # before the loop turns
        assert read_all(read) == numbered(1) + numbered(2)
        await batch()  # the flush already scheduled finds nothing left
        assert read_all(read) == b""

    run_on(loop_kind, main())


def test_close_on_a_full_pipe_waits_a_little_then_counts_the_rest(
        pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = pipe
    os.set_blocking(write, False)
    monkeypatch.setattr(access_log, "CLOSE_WAIT", 0.1)
    log = AccessLog(write, max_buffer=1 << 20)
    os.write(write, b"x" * 65536)  # full
    log.write(numbered(1))  # no loop: tried at once, kept when the pipe is full
    log.write(numbered(2))
    assert log.dropped == 0
    started = time.monotonic()
    log.close()
    assert time.monotonic() - started < 1.0
    assert log.dropped == 2


def test_a_gone_reader_counts_lines_and_raises_nothing(loop_kind: str,
                                                       pipe: tuple[int, int]) -> None:
    read, write = pipe
    os.close(read)

    async def main() -> None:
        log = AccessLog(write)
        log.write(numbered(1))
        log.write(numbered(2))
        await batch()
        assert log.dropped == 2

    run_on(loop_kind, main())


def test_without_a_running_loop_a_line_is_written_at_once(pipe: tuple[int, int]) -> None:
    read, write = pipe
    log = AccessLog(write)
    log.write(numbered(7))
    assert read_all(read) == numbered(7)


def test_nonblocking_fd_is_the_same_pipe_and_leaves_the_original_blocking(
        pipe: tuple[int, int]) -> None:
    read, write = pipe
    mine = nonblocking_fd(write)
    try:
        assert mine != write
        assert os.get_blocking(write) is True
        assert os.get_blocking(mine) is False
        os.write(mine, b"one\n")
        os.write(write, b"two\n")
        assert read_all(read) == b"one\ntwo\n"
        os.set_blocking(read, True)
        with pytest.raises(BlockingIOError):
            while True:
                os.write(mine, b"x" * 4096)
    finally:
        os.close(mine)


def test_a_full_batch_goes_out_at_once(loop_kind: str, pipe: tuple[int, int]) -> None:
    read, write = pipe

    async def main() -> None:
        log = AccessLog(write)
        line = b"x" * 1023 + b"\n"
        for _ in range(access_log.FLUSH_BYTES // len(line)):
            log.write(line)
        assert len(read_all(read)) == access_log.FLUSH_BYTES  # not waiting for the timer

    run_on(loop_kind, main())
