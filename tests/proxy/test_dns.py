"""The sidecar's DNS for imported names: queries built and answers read by dnspython (a DNS
library we did not write), hostile datagrams, and the proxy over real UDP sockets with a real
upstream (a dnspython responder standing in for Docker's embedded DNS, which only exists in
a container)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from composemesh.proxy.dns import DnsProxy, answer, lookup, parse_query, start_dns

NAMES = {"payments": "240.241.0.9", "legacy-db": "240.241.3.1"}


def query(name: str, kind: str = "A", qid: int | None = None) -> bytes:
    message = dns.message.make_query(name, kind)
    if qid is not None:
        message.id = qid
    return message.to_wire()


def read(wire: bytes) -> dns.message.Message:
    return dns.message.from_wire(wire)


# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize("name", ["payments.", "PAYMENTS.", "payments.service.consul.",
                                  "payments.service.dc1.consul."])
def test_an_imported_name_is_answered_with_its_vip(name: str) -> None:
    wire = query(name, qid=4242)
    got = answer(wire, NAMES)
    assert got is not None
    message = read(got)
    assert message.id == 4242 and message.rcode() == dns.rcode.NOERROR
    assert message.flags & dns.flags.QR and message.flags & dns.flags.AA
    assert message.flags & dns.flags.RD  # copied from the query
    (rrset,) = message.answer
    assert rrset.rdtype == dns.rdatatype.A and rrset.ttl == 5
    assert [r.address for r in rrset] == ["240.241.0.9"]
    assert str(rrset.name).lower() == name.lower()


def test_aaaa_of_an_imported_name_is_no_record_so_resolvers_use_a() -> None:
    message = read(answer(query("payments.", "AAAA"), NAMES) or b"")
    assert message.rcode() == dns.rcode.NOERROR and not message.answer
    assert message.question[0].rdtype == dns.rdatatype.AAAA


@pytest.mark.parametrize("name", ["reviews.", "payments.example.", "x.payments.",
                                  "payments.service.a.b.consul.", "service.consul."])
def test_any_other_name_is_left_to_dockers_dns(name: str) -> None:
    assert answer(query(name), NAMES) is None


def test_lookup_takes_the_name_and_consuls_forms_only() -> None:
    assert lookup("payments", NAMES) == "240.241.0.9"
    assert lookup("payments.service.consul", NAMES) == "240.241.0.9"
    assert lookup("payments.service.dc2.consul", NAMES) == "240.241.0.9"
    assert lookup("payments.service", NAMES) is None


HOSTILE = [
    b"",
    b"\x00" * 11,  # shorter than a header
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",  # a question promised, none there
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",  # pointer loop
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3f" + b"a" * 10,  # label past the end
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + (b"\x3f" + b"a" * 63) * 5 + b"\x00"
    + b"\x00\x01\x00\x01",  # a name of 320 octets
    b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01",  # a response
    b"\x12\x34\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01",  # two questions
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x02\xff\xfe\x00\x00\x01\x00\x01",
]


@pytest.mark.parametrize("data", HOSTILE)
def test_hostile_datagrams_are_never_answered_as_ours_and_never_raise(data: bytes) -> None:
    started = time.perf_counter()
    assert answer(data, NAMES) is None
    parse_query(data)
    assert time.perf_counter() - started < 0.05


def test_parse_reads_what_dnspython_writes() -> None:
    parsed = parse_query(query("Legacy-DB.", "AAAA", qid=7))
    assert parsed is not None
    assert (parsed.id, parsed.name, parsed.qtype, parsed.qclass) == (7, "legacy-db", 28, 1)


# --------------------------------------------------------------------------- over UDP


class Upstream(asyncio.DatagramProtocol):
    """Stands in for Docker's embedded DNS: answers every A query with 10.0.0.7 (after
    ``delay``), or stays silent for names starting with ``silent``."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.seen: list[int] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message = dns.message.from_wire(data)
        self.seen.append(message.id)
        if str(message.question[0].name).startswith("silent"):
            return
        response = dns.message.make_response(message)
        response.answer.append(dns.rrset.from_text(message.question[0].name, 30, "IN", "A",
                                                   "10.0.0.7"))
        asyncio.get_running_loop().call_later(
            self.delay, lambda: self.transport and self.transport.sendto(response.to_wire(), addr))


@contextlib.asynccontextmanager
async def served() -> AsyncIterator[tuple[DnsProxy, Upstream, dict[str, str]]]:
    loop = asyncio.get_running_loop()
    upstream = Upstream(delay=0.05)
    up_transport, _ = await loop.create_datagram_endpoint(lambda: upstream,
                                                          local_addr=("127.0.0.1", 0))
    names = dict(NAMES)
    proxy = await start_dns(lambda: names, port=0,
                            upstream=up_transport.get_extra_info("sockname")[:2], timeout=0.5)
    yield proxy, upstream, names
    proxy.close()
    up_transport.close()


async def ask(proxy: DnsProxy, wire: bytes, timeout: float = 3.0) -> bytes | None:
    assert proxy.transport is not None
    where = proxy.transport.get_extra_info("sockname")[:2]
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_sendto(sock, wire, where)
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 4096)
    except TimeoutError:
        return None
    finally:
        sock.close()


def run(coro):  # noqa: ANN001, ANN201 - a tiny runner: the project's tests are not async-plugged
    return asyncio.run(coro)


def test_over_udp_ours_answered_others_forwarded_ids_kept() -> None:
    async def body() -> None:
        async with served() as (proxy, upstream, names):
            ours = read(await ask(proxy, query("payments.", qid=11)) or b"")
            assert ours.id == 11 and [r.address for r in ours.answer[0]] == ["240.241.0.9"]
            assert upstream.seen == []  # never asked Docker
            theirs = read(await ask(proxy, query("reviews.", qid=12)) or b"")
            assert theirs.id == 12 and [r.address for r in theirs.answer[0]] == ["10.0.0.7"]
            assert len(upstream.seen) == 1 and upstream.seen[0] != 12  # under an id of its own
            names["reviews"] = "240.241.9.9"  # a new snapshot: at once
            again = read(await ask(proxy, query("reviews.", qid=13)) or b"")
            assert [r.address for r in again.answer[0]] == ["240.241.9.9"]
            assert (proxy.answered, proxy.forwarded) == (2, 1)
    run(body())


def test_two_clients_with_the_same_id_each_get_their_own_answer() -> None:
    async def body() -> None:
        async with served() as (proxy, _upstream, _names):
            one, two = await asyncio.gather(ask(proxy, query("alpha.", qid=99)),
                                            ask(proxy, query("beta.", qid=99)))
            got = {str(read(w or b"").question[0].name) for w in (one, two)}
            assert got == {"alpha.", "beta."}
            assert all(read(w or b"").id == 99 for w in (one, two))
    run(body())


def test_a_silent_upstream_is_forgotten_and_a_flood_is_bounded() -> None:
    async def body() -> None:
        async with served() as (proxy, _upstream, _names):
            proxy.max_pending = 64
            assert proxy.transport is not None
            where = proxy.transport.get_extra_info("sockname")[:2]
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                for i in range(2000):
                    sock.sendto(query(f"silent{i}.", qid=i % 65536), where)
                sock.setblocking(False)
                await asyncio.sleep(0.2)
                assert len(proxy.pending) <= 64
                refused = 0
                while True:
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        break
                    refused += read(data).rcode() == dns.rcode.SERVFAIL
                assert refused > 0  # beyond the bound: SERVFAIL at once
            finally:
                sock.close()
            deadline = time.monotonic() + 5
            while proxy.pending and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not proxy.pending and proxy.upstream_timeouts >= 1
            # and it still answers
            ok = read(await ask(proxy, query("payments.")) or b"")
            assert ok.answer
    run(body())


def test_a_query_it_cannot_read_gets_formerr_and_a_stray_answer_is_ignored() -> None:
    async def body() -> None:
        async with served() as (proxy, _upstream, _names):
            bad = struct.pack("!HHHHHH", 77, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01"
            got = read(await ask(proxy, bad) or b"")
            assert got.id == 77 and got.rcode() == dns.rcode.FORMERR
            # an "answer" from a stranger for a pending id changes nothing
            proxy.pending[5] = (("127.0.0.1", 9), 5, time.monotonic())
            proxy.upstream_answered(b"\x00\x05" + b"\x00" * 10, ("127.0.0.1", 1))
            assert 5 in proxy.pending
    run(body())

