"""The sidecar's DNS for imported names: what lets an app call ``payments:8080`` when
``payments`` runs only on another host (imported from Consul), as Istio's DNS proxy answers
for ServiceEntries.

With ``x-composemesh.consul`` the holder's iptables send the app's UDP queries to Docker's
DNS (127.0.0.11:53) here (``capture.capture_rules`` with ``dns_port``), for every uid but
the proxy's. A query for one of the snapshot's ``dns`` names (``payments``, or Consul's own forms
``payments.service.consul`` and ``payments.service.<dc>.consul``) is answered here: its VIP
for A (TTL 5 s), no record (NOERROR) for AAAA and any other type, so resolvers fall back to
A. Every other query goes unchanged to Docker's DNS, from this proxy's own socket (its uid is
not captured), under an ID of its own, and the answer comes back under the app's ID.

Bounded: at most ``MAX_PENDING`` queries wait for Docker's answer (beyond that, SERVFAIL at
once), each forgotten after ``FORWARD_TIMEOUT`` (the app's resolver asks again). A datagram
that is not a query is dropped; one that is a query but not one this can read gets FORMERR.
Answers from anyone but the upstream are ignored. DNS over TCP is not captured here: the
app's TCP to 127.0.0.11:53 goes through the outbound capture and on to Docker unchanged.

The parsing is pure (``parse_query``, ``answer``); ``DnsProxy`` is the I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from composemesh.model import wellknown as wk

log = logging.getLogger("composemesh.proxy.dns")

TTL_S = 5
MAX_PENDING = 1024
FORWARD_TIMEOUT = 5.0
MAX_NAME = 255  # octets of a name on the wire (RFC 1035 2.3.4)
TYPE_A, TYPE_AAAA, TYPE_ANY = 1, 28, 255
CLASS_IN = 1
RCODE_FORMERR, RCODE_SERVFAIL = 1, 2
_HEADER = struct.Struct("!HHHHHH")


@dataclass(frozen=True, slots=True)
class Query:
    """The one question of a standard query, and where it ends in the datagram."""

    id: int
    flags: int
    name: str  # lower case, no trailing dot
    qtype: int
    qclass: int
    end: int  # offset just past the question


def parse_query(data: bytes) -> Query | None:
    """The question of ``data`` if it is a standard query (QR 0, opcode 0) with exactly one,
    its name written plainly (a query has nothing to point back to); None otherwise."""
    if len(data) < _HEADER.size:
        return None
    qid, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(data)
    if flags & 0x8000 or (flags >> 11) & 0xF or qdcount != 1:
        return None
    labels: list[str] = []
    at, length = _HEADER.size, 0
    while True:
        if at >= len(data):
            return None
        size = data[at]
        if size == 0:
            at += 1
            break
        if size & 0xC0:  # a pointer or a reserved label type: not in a plain query
            return None
        length += size + 1
        if length > MAX_NAME or at + 1 + size > len(data):
            return None
        try:
            labels.append(data[at + 1:at + 1 + size].decode("ascii").lower())
        except UnicodeDecodeError:
            return None
        at += 1 + size
    if at + 4 > len(data):
        return None
    qtype, qclass = struct.unpack_from("!HH", data, at)
    return Query(qid, flags, ".".join(labels), qtype, qclass, at + 4)


def lookup(name: str, names: Mapping[str, str]) -> str | None:
    """The VIP of ``name`` (or of ``<name>.service[.<dc>].consul``), None if not one of ours."""
    vip = names.get(name)
    if vip is not None:
        return vip
    head, dot, rest = name.partition(".service.")
    if dot and rest.endswith("consul") and (rest == "consul" or rest.count(".") == 1):
        return names.get(head)
    return None


def answer(data: bytes, names: Mapping[str, str]) -> bytes | None:
    """The response to the query ``data`` if it asks for one of ``names``; None: forward it
    (or, not a query at all, drop it or say FORMERR: ``error_response``)."""
    query = parse_query(data)
    return answer_query(data, query, names) if query is not None else None


def answer_query(data: bytes, query: Query, names: Mapping[str, str]) -> bytes | None:
    """``answer`` of a query already read."""
    vip = lookup(query.name, names) if query.qclass == CLASS_IN else None
    return _response(data, query, vip) if vip is not None else None


def _response(data: bytes, query: Query, vip: str) -> bytes:
    flags = 0x8000 | 0x0400 | (query.flags & 0x0100) | 0x0080  # QR, AA, RD copied, RA
    records = b""
    if query.qtype in (TYPE_A, TYPE_ANY):
        records = (struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL_S, 4)
                   + ipaddress.IPv4Address(vip).packed)
    count = 1 if records else 0
    header = _HEADER.pack(query.id, flags, 1, count, 0, 0)
    return header + data[_HEADER.size:query.end] + records


def error_response(data: bytes, rcode: int) -> bytes | None:
    """An answer with ``rcode`` and no records to whatever query ``data`` is (None if it is
    too short to have an ID, or is itself a response)."""
    if len(data) < _HEADER.size:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & 0x8000:
        return None
    query = parse_query(data)
    question = data[_HEADER.size:query.end] if query is not None else b""
    out = 0x8000 | (flags & 0x7900) | 0x0080 | rcode  # opcode and RD copied
    return _HEADER.pack(qid, out, 1 if question else 0, 0, 0, 0) + question


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, resolver: DnsProxy) -> None:
        self.resolver = resolver

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.resolver.upstream_answered(data, addr)


class DnsProxy(asyncio.DatagramProtocol):
    """The listener on ``PORT_DNS``: answers the snapshot's names, forwards the rest."""

    def __init__(self, names: Callable[[], Mapping[str, str]],
                 upstream: tuple[str, int] = (wk.DOCKER_DNS, 53),
                 timeout: float = FORWARD_TIMEOUT, max_pending: int = MAX_PENDING) -> None:
        self.names = names
        self.upstream = upstream
        self.timeout = timeout
        self.max_pending = max_pending
        self.transport: asyncio.DatagramTransport | None = None
        self.forwarder: asyncio.DatagramTransport | None = None
        # our ID -> (the client's address, its ID, when forwarded)
        self.pending: dict[int, tuple[tuple[str, int], int, float]] = {}
        self._ids = itertools.cycle(range(1, 65536))
        self._sweeper: asyncio.TimerHandle | None = None
        self.answered = self.forwarded = self.dropped = self.upstream_timeouts = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = self.transport
        if transport is None:
            return
        query = parse_query(data)
        if query is None:
            failed = error_response(data, RCODE_FORMERR)
            if failed is None:
                self.dropped += 1
            else:
                transport.sendto(failed, addr)
            return
        ours = answer_query(data, query, self.names())
        if ours is not None:
            self.answered += 1
            transport.sendto(ours, addr)
            return
        self._forward(data, query, addr)

    def _forward(self, data: bytes, query: Query, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if self.forwarder is None or len(self.pending) >= self.max_pending:
            self._sweep_now()
            if self.forwarder is None or len(self.pending) >= self.max_pending:
                failed = error_response(data, RCODE_SERVFAIL)
                if failed is not None:
                    self.transport.sendto(failed, addr)
                self.dropped += 1
                return
        ours = next(self._ids)
        while ours in self.pending:
            ours = next(self._ids)
        self.pending[ours] = (addr, query.id, time.monotonic())
        self.forwarded += 1
        self.forwarder.sendto(struct.pack("!H", ours) + data[2:])
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.timeout, self._sweep)

    def upstream_answered(self, data: bytes, addr: tuple[str, int]) -> None:
        if (addr[0], addr[1]) != self.upstream or len(data) < _HEADER.size:
            return
        waiting = self.pending.pop(struct.unpack_from("!H", data)[0], None)
        if waiting is None or self.transport is None:
            return
        client, their_id, _ = waiting
        self.transport.sendto(struct.pack("!H", their_id) + data[2:], client)

    def _sweep_now(self) -> None:
        cutoff = time.monotonic() - self.timeout
        for key in [k for k, (_, _, at) in self.pending.items() if at <= cutoff]:
            del self.pending[key]
            self.upstream_timeouts += 1

    def _sweep(self) -> None:
        self._sweeper = None
        self._sweep_now()
        if self.pending:
            self._sweeper = asyncio.get_running_loop().call_later(self.timeout / 2, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for transport in (self.transport, self.forwarder):
            if transport is not None:
                transport.close()
        self.pending.clear()


async def start_dns(names: Callable[[], Mapping[str, str]], host: str = "127.0.0.1",
                         port: int = wk.PORT_DNS,
                         upstream: tuple[str, int] = (wk.DOCKER_DNS, 53),
                         timeout: float = FORWARD_TIMEOUT) -> DnsProxy:
    """The resolver listening on ``host:port`` (UDP), forwarding to ``upstream``."""
    loop = asyncio.get_running_loop()
    resolver = DnsProxy(names, upstream, timeout)
    await loop.create_datagram_endpoint(lambda: resolver, local_addr=(host, port))
    forwarder, _ = await loop.create_datagram_endpoint(lambda: _Upstream(resolver),
                                                       remote_addr=upstream)
    resolver.forwarder = forwarder
    return resolver
