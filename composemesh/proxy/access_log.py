"""Access logs: one JSON object per line for each HTTP request and TCP connection, with the
field names of Istio's default JSON access log, written to stdout without ever blocking.

Values follow what Envoy's JSON formatter writes for Istio: counts and times are numbers
(``duration`` and ``upstream_service_time`` in milliseconds), ``start_time`` is RFC 3339 in
UTC with milliseconds, ``response_flags`` is ``"-"`` when there are none, and a value that is
not known (an empty string or None) is ``null``. Our own fields follow Istio's metric labels:
``reporter`` (``source`` outbound, ``destination`` inbound), the source and destination
workloads, principals and service, ``connection_security_policy`` and the ``trace_id``.

``AccessLog`` gathers the lines of one event-loop iteration into a buffer and writes it with
one ``os.write`` on the next; a reader that does not keep up costs lines (counted in
``dropped``), never the loop's time. For a stdout that is a blocking pipe, hand it
``nonblocking_fd(1)``: the same pipe, opened anew so that O_NONBLOCK is ours alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import time

import msgspec

NO_FLAGS = "-"  # Envoy's RESPONSE_FLAGS when none is set
FLUSH_DELAY = 0.05  # seconds a line may wait for the ones after it
FLUSH_BYTES = 64 * 1024  # ... unless this much is waiting
CLOSE_WAIT = 1.0  # seconds ``close`` waits for a full pipe to take the rest


class HttpEntry(msgspec.Struct):
    """One HTTP request's line; the field order is the line's."""

    start_time: str
    method: str | None
    path: str | None
    protocol: str | None
    response_code: int
    response_flags: str
    bytes_received: int
    bytes_sent: int
    duration: int
    upstream_service_time: int | None
    x_forwarded_for: str | None
    user_agent: str | None
    request_id: str | None
    authority: str | None
    upstream_host: str | None
    upstream_cluster: str | None
    downstream_local_address: str | None
    downstream_remote_address: str | None
    route_name: str | None
    reporter: str
    trace_id: str | None
    source_workload: str | None
    source_principal: str | None
    destination_service: str | None
    destination_workload: str | None
    destination_principal: str | None
    connection_security_policy: str | None


class TcpEntry(msgspec.Struct):
    """One TCP connection's line; the field order is the line's."""

    start_time: str
    protocol: str
    response_flags: str
    bytes_received: int
    bytes_sent: int
    duration: int
    upstream_host: str | None
    upstream_cluster: str | None
    downstream_local_address: str | None
    downstream_remote_address: str | None
    reporter: str
    source_workload: str | None
    source_principal: str | None
    destination_service: str | None
    destination_workload: str | None
    destination_principal: str | None
    connection_security_policy: str | None


_encode = msgspec.json.Encoder().encode
_second = -1
_second_text = ""
_MILLIS = tuple(f".{milli:03d}Z" for milli in range(1000))


def rfc3339_ms(epoch: float) -> str:
    """``epoch`` (seconds) as Envoy's START_TIME: ``2026-12-03T07:49:02.123Z``."""
    global _second, _second_text
    ms = int(epoch * 1000)
    second = ms // 1000
    if second != _second:  # one strftime per second, not per line
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = second
    return _second_text + _MILLIS[ms - second * 1000]


def http_entry(*, start_time: float, method: str, path: str, protocol: str,
               response_code: int, response_flags: str, bytes_received: int, bytes_sent: int,
               duration: int, upstream_service_time: int | None = None,
               x_forwarded_for: str | None = None, user_agent: str | None = None,
               request_id: str | None = None, authority: str | None = None,
               upstream_host: str | None = None, upstream_cluster: str | None = None,
               downstream_local_address: str | None = None,
               downstream_remote_address: str | None = None, route_name: str | None = None,
               reporter: str, trace_id: str | None = None,
               source_workload: str | None = None, source_principal: str | None = None,
               destination_service: str | None = None,
               destination_workload: str | None = None,
               destination_principal: str | None = None,
               connection_security_policy: str | None = None) -> bytes:
    """One HTTP request's access-log line: a JSON object and ``\\n``. ``start_time`` is epoch
    seconds (``time.time()``), ``duration`` and ``upstream_service_time`` milliseconds,
    ``protocol`` as Envoy says it (``HTTP/1.1``); ``""`` and None are written as null."""
    return _encode(HttpEntry(
        rfc3339_ms(start_time), method or None, path or None, protocol or None, response_code,
        response_flags or NO_FLAGS, bytes_received, bytes_sent, duration,
        upstream_service_time, x_forwarded_for or None, user_agent or None,
        request_id or None, authority or None, upstream_host or None, upstream_cluster or None,
        downstream_local_address or None, downstream_remote_address or None,
        route_name or None, reporter, trace_id or None, source_workload or None,
        source_principal or None, destination_service or None, destination_workload or None,
        destination_principal or None, connection_security_policy or None,
    )) + b"\n"


def tcp_entry(*, start_time: float, duration: int, bytes_received: int, bytes_sent: int,
              response_flags: str = "", upstream_host: str | None = None,
              upstream_cluster: str | None = None,
              downstream_local_address: str | None = None,
              downstream_remote_address: str | None = None, reporter: str,
              source_workload: str | None = None, source_principal: str | None = None,
              destination_service: str | None = None,
              destination_workload: str | None = None,
              destination_principal: str | None = None,
              connection_security_policy: str | None = None) -> bytes:
    """One TCP connection's access-log line (``protocol`` is ``tcp``), written when it closes;
    ``bytes_received`` came from the connecting side, ``bytes_sent`` went back to it."""
    return _encode(TcpEntry(
        rfc3339_ms(start_time), "tcp", response_flags or NO_FLAGS, bytes_received, bytes_sent,
        duration, upstream_host or None, upstream_cluster or None,
        downstream_local_address or None, downstream_remote_address or None, reporter,
        source_workload or None, source_principal or None, destination_service or None,
        destination_workload or None, destination_principal or None,
        connection_security_policy or None,
    )) + b"\n"


def nonblocking_fd(fd: int = 1) -> int:
    """A non-blocking descriptor for what ``fd`` writes to, without making ``fd`` itself
    non-blocking (O_NONBLOCK belongs to the open file, which every other writer of ``fd``
    shares). A pipe or a file is opened anew through /proc; anything else (a socket, no
    /proc) is duplicated and stays as blocking as it was. The caller closes what it gets."""
    try:
        return os.open(f"/proc/self/fd/{fd}",
                       os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)


class AccessLog:
    """Lines written to ``fd`` from the event loop, in batches: one ``os.write`` for what came
    in ``FLUSH_DELAY`` seconds, or at once when ``FLUSH_BYTES`` are waiting (a syscall and a
    reader's wake-up per request cost more than the line itself).

    ``write`` appends to a buffer and schedules one flush (``loop.call_later``); the flush
    writes what it can and, when ``fd`` would block (a full pipe), waits for it to become
    writable (``loop.add_writer``; a poll every 10 ms where the loop cannot watch ``fd``).
    A line that would grow the buffer past ``max_buffer`` bytes is dropped and counted in
    ``dropped``; lines lost to a write error (the reader gone) are counted there too.
    ``enabled`` is read on every write, so it can be switched live; the caller may also test
    it first and not format the line at all. ``fd`` is not closed here.
    """

    def __init__(self, fd: int = 1, *, max_buffer: int = 1 << 20) -> None:
        self.fd = fd
        self.max_buffer = max_buffer
        self.enabled = True
        self.dropped = 0
        self.written = 0  # bytes handed to the kernel
        self._buffer = bytearray()
        self._scheduled = False  # a flush is due (call_soon, add_writer or call_later)
        self._watching: asyncio.AbstractEventLoop | None = None  # add_writer is on

    def write(self, line: bytes) -> None:
        """Queue ``line`` (one whole line, ``\\n`` included); never blocks, never raises."""
        if not self.enabled:
            return
        buffer = self._buffer
        if len(buffer) + len(line) > self.max_buffer:
            self.dropped += 1
            return
        buffer += line
        if len(buffer) >= FLUSH_BYTES and self._watching is None:
            self._write_out()  # what fd does not take now, the scheduled flush waits for
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flush)
            except RuntimeError:  # no loop (start-up, shut-down): write now
                self._flush()

    def _flush(self) -> None:
        self._scheduled = False
        if self._write_out():
            return
        self._scheduled = True  # wait until fd takes more
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._scheduled = False
            return
        try:
            loop.add_writer(self.fd, self._writable)
            self._watching = loop
        except (OSError, ValueError, NotImplementedError):  # a regular file, an odd loop
            loop.call_later(0.01, self._flush)

    def _writable(self) -> None:
        self._unwatch()
        self._flush()

    def _unwatch(self) -> None:
        loop, self._watching = self._watching, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_writer(self.fd)

    def _write_out(self) -> bool:
        """Write as much of the buffer as ``fd`` takes now; True when it is empty."""
        buffer = self._buffer
        while buffer:
            try:
                n = os.write(self.fd, buffer)
            except InterruptedError:
                continue
            except BlockingIOError:
                return False
            except OSError:  # the reader is gone, fd closed: these lines are lost
                self.dropped += buffer.count(b"\n")
                buffer.clear()
                return True
            self.written += n
            del buffer[:n]
        return True

    def close(self) -> None:
        """Write what is buffered, waiting up to a second for a full pipe; count the rest
        as dropped."""
        self._unwatch()
        self._scheduled = True  # no flush from now on but this one
        deadline = time.monotonic() + CLOSE_WAIT
        while not self._write_out():
            left = deadline - time.monotonic()
            if left <= 0:
                self.dropped += self._buffer.count(b"\n")
                self._buffer.clear()
                break
            with contextlib.suppress(OSError, ValueError):
                select.select([], [self.fd], [], left)
        self._scheduled = False
