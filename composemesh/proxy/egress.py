"""The egress gateway's listener: traffic leaving the mesh for a listed external host.

The gateway is the composemesh proxy in another role (``COMPOSEMESH_GATEWAY=egress``). A
sidecar whose app called a listed host (by the VIP its name resolves to in the app's
namespace, or by the host's own address) connects here over mutual TLS with its workload's
certificate, and names the target first inside that TLS: ``CONNECT host:port HTTP/1.1`` and
an empty line, as Istio's HBONE tunnels name theirs (there over HTTP/2). No answer is
written: the app's own bytes follow at once and the splice begins.

The gateway checks the caller's identity (a certificate of the mesh's root naming a
service of this project) and the target (listed in the snapshot's egress hosts, or refused:
closed), then reaches the host by its ``address`` if the file gives one, else by DNS:

- ``tls``: the app's own TLS passes through (its session ends at the real server, whose
  certificate the app verifies);
- ``http`` with ``tls_origination``: the gateway adds TLS to the host (its CA, optional
  client certificate, the host's name checked) and carries the app's plain HTTP inside;
- ``http`` without, and ``tcp``: plain TCP.

One JSON line per connection goes to stdout when it ends: time, the caller's SPIFFE ID,
host, port, protocol, outcome, bytes each way and duration; for ``http`` the status of the
first response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from composemesh.ca.tls import HANDSHAKE_TIMEOUT, peer_spiffe
from composemesh.model import wellknown as wk
from composemesh.model.egress import EgressHostSpec
from composemesh.proxy.gateway_tls import origination_context
from composemesh.proxy.mtls import MeshTls
from composemesh.proxy.router import RouterSwitch
from composemesh.proxy.tcp import Held, abort_pipes, splice
from composemesh.proxy.tls_link import TlsLink

log = logging.getLogger("composemesh.proxy.egress")

MAX_HEAD = 1024  # the CONNECT line and its empty line must come within this many bytes
HEAD_TIMEOUT = 10.0  # ... and within this many seconds of the accept
CONNECT_TIMEOUT = 10.0  # seconds to reach the external host (and end its TLS handshake)

LogLine = Callable[[dict[str, Any]], None]


def print_line(record: dict[str, Any]) -> None:
    """The access log: one JSON object per line on stdout."""
    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()


def parse_connect(head: bytes) -> tuple[str, int] | None:
    """(host, port) of ``CONNECT host:port HTTP/1.1``; None if it is not one."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or not parts[2].startswith(b"HTTP/1."):
        return None
    host, _, port = parts[1].decode("latin-1").rpartition(":")
    if not host or not port.isdecimal() or not 0 < int(port) < 65536:
        return None
    return host.lower(), int(port)


class EgressSession(asyncio.Protocol):
    """One sidecar's connection: mTLS, the CONNECT line, then a pipe to the external host."""

    def __init__(self, gateway: EgressGateway) -> None:
        self.gateway = gateway
        self.link: TlsLink | None = None
        self.head = bytearray()
        self.source = ""
        self.started = time.monotonic()
        self.record: dict[str, Any] = {}
        self.sent = self.received = 0
        self.status: int | None = None
        self.waiting: asyncio.TimerHandle | None = None  # for the CONNECT line

    # the raw connection, then the link
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.link is not None:  # the link adopting us
            return
        raw = cast(asyncio.Transport, transport)
        server = self.gateway.tls.server
        if server is None:  # no certificate yet: nothing to answer with
            raw.abort()
            return
        link = self.link = TlsLink(server, server_side=True, handshake_timeout=HANDSHAKE_TIMEOUT)
        self.waiting = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, link.abort)
        raw.set_protocol(link)
        link.connection_made(raw)
        link.handshake.add_done_callback(self._handshaken)

    def _handshaken(self, done: asyncio.Future[None]) -> None:
        link = self.link
        assert link is not None
        if done.cancelled() or done.exception() is not None:
            self._stop_waiting()
            link.abort()
            return
        tls = self.gateway.tls
        spiffe = peer_spiffe(link.sslobj)
        caller = tls.source_service(spiffe)
        if caller is None or "/" in caller:  # a good chain, but not of this project
            self._stop_waiting()
            link.abort()
            return
        self.source = str(spiffe)
        link.adopt(self)

    def data_received(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > MAX_HEAD:
                self._refuse(None, "bad_connect")
            return
        rest = bytes(self.head[end + 4:])
        self._stop_waiting()
        target = parse_connect(bytes(self.head[:end + 2]))
        if target is None:
            self._refuse(None, "bad_connect")
            return
        entry = self.gateway.switch.current.outbound.egress.hosts.get(target)
        if entry is None:
            self._refuse(target, "not_listed")
            return
        assert self.link is not None
        self.link.pause_reading()
        asyncio.get_running_loop().create_task(self._connect(entry, rest))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        if self.waiting is not None:
            self.waiting.cancel()
            self.waiting = None

    def _refuse(self, target: tuple[str, int] | None, outcome: str) -> None:
        host, port = target if target is not None else ("", 0)
        self.gateway.log_line(self._record(host, port, "", outcome))
        assert self.link is not None
        self.link.abort()

    def _record(self, host: str, port: int, protocol: str, outcome: str) -> dict[str, Any]:
        return {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "gateway": wk.EGRESS_GATEWAY, "source": self.source, "host": host, "port": port,
            "protocol": protocol, "outcome": outcome, "status": self.status,
            "bytes_sent": self.sent, "bytes_received": self.received,
            "duration_ms": round((time.monotonic() - self.started) * 1000.0, 1),
        }

    async def _connect(self, entry: EgressHostSpec, rest: bytes) -> None:
        link = self.link
        assert link is not None
        loop = asyncio.get_running_loop()
        o = entry.origination
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if o is not None:
                    context = origination_context(
                        Path(o.ca) if o.ca else None, Path(o.cert) if o.cert else None,
                        Path(o.key) if o.key else None)
                    upstream, held = await loop.create_connection(
                        Held, entry.address or entry.host, o.port, ssl=context,
                        server_hostname=entry.host)
                else:
                    upstream, held = await loop.create_connection(
                        Held, entry.address or entry.host, entry.port)
        except (OSError, TimeoutError) as exc:
            log.info("egress to %s:%d failed: %s", entry.host, entry.port, exc)
            self.gateway.log_line(self._record(entry.host, entry.port, entry.protocol,
                                               "connect_failed"))
            link.abort()
            return
        if link.is_closing():
            upstream.abort()
            return
        self._splice(link, upstream, rest, bytes(held.first), entry)

    def _splice(self, link: TlsLink, upstream: asyncio.BaseTransport, rest: bytes,
                first: bytes, entry: EgressHostSpec) -> None:
        http = entry.protocol == "http"

        def ended(flags: str) -> None:
            outcome = "ok" if flags in ("", "-") else {"DC": "downstream_reset",
                                                      "UC": "upstream_reset"}.get(flags, flags)
            self.gateway.log_line(self._record(entry.host, entry.port, entry.protocol, outcome))

        pa, pb = splice(link, upstream, rest, first,  # type: ignore[arg-type]
                        self.gateway.pipes, ended=ended)
        self.sent += len(rest)
        self.received += len(first)
        if http and first:
            self._status(first)
        to_host, to_app = pa.forward, pb.forward

        def sending(data: bytes) -> None:
            self.sent += len(data)
            to_host(data)

        def receiving(data: bytes) -> None:
            if http and self.status is None:
                self._status(data)
            self.received += len(data)
            to_app(data)

        pa.forward, pb.forward = sending, receiving

    def _status(self, data: bytes) -> None:
        """The status of the first response, from its status line."""
        line = data.split(b"\r\n", 1)[0].split(b" ")
        if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit():
            self.status = int(line[1])


class EgressGateway:
    """The egress listener's state: the mTLS contexts, the routers in force (their egress
    table names the hosts), the open pipes and where the access log goes."""

    def __init__(self, tls: MeshTls, switch: RouterSwitch, log_line: LogLine = print_line):
        self.tls = tls
        self.switch = switch
        self.log_line = log_line
        self.pipes: set[asyncio.Protocol] = set()

    def close(self) -> None:
        abort_pipes(self.pipes)


async def start_egress(gateway: EgressGateway, *, host: str = "0.0.0.0",  # noqa: S104
                       port: int = wk.EGRESS_PORT) -> asyncio.Server:
    """The egress gateway's mTLS listener (its own namespace's inbound capture lets it be)."""
    server = await asyncio.get_running_loop().create_server(
        lambda: EgressSession(gateway), host, port, backlog=1024)
    log.info("egress: mTLS on %s:%d", host, port)
    return server
