"""The ClientHello parser on real ClientHellos from Python's ssl, split at every byte, and on
hostile bytes: never raises, never loops, NEED_MORE only for a true prefix."""

from __future__ import annotations

import random
import ssl
import time

import pytest

from composemesh.proxy.sni import MAX_RECORD, NEED_MORE, NeedMore, client_hello_sni


def client_hello(server_hostname: str | None, *, alpn: bool = True) -> bytes:
    """The first flight of a real TLS client (Python's ssl over memory BIOs)."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def records(hello: bytes, size: int) -> bytes:
    """The same handshake message re-framed into records of at most ``size`` bytes each."""
    assert hello[0] == 22
    length = int.from_bytes(hello[3:5], "big")
    body = hello[5 : 5 + length]
    out = bytearray()
    for i in range(0, len(body), size):
        part = body[i : i + size]
        out += hello[:3] + len(part).to_bytes(2, "big") + part
    return bytes(out)


@pytest.mark.parametrize("name", ["www.example.com", "api.partner.example", "a"])
def test_real_client_hello(name: str) -> None:
    assert client_hello_sni(client_hello(name)) == name


def test_upper_case_name_is_lowered() -> None:
    hello = client_hello("WWW.Example.COM")
    assert client_hello_sni(hello) == "www.example.com"


def test_without_sni() -> None:
    hello = client_hello(None)
    assert client_hello_sni(hello) is None
    # an IP address as server_hostname sends no SNI either (RFC 6066)
    assert client_hello_sni(client_hello("127.0.0.1")) is None


def test_every_prefix_needs_more() -> None:
    hello = client_hello("www.example.com")
    for cut in range(len(hello)):
        assert client_hello_sni(hello[:cut]) is NEED_MORE, cut
    assert client_hello_sni(hello + b"trailing bytes") == "www.example.com"


@pytest.mark.parametrize("size", [1, 7, 64, 300])
def test_hello_across_records(size: int) -> None:
    hello = records(client_hello("www.example.com"), size)
    assert client_hello_sni(hello) == "www.example.com"
    for cut in range(0, len(hello), max(1, len(hello) // 97)):
        assert client_hello_sni(hello[:cut]) is NEED_MORE


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x02",  # not version 3
        b"\x17\x03\x03\x00\x05hello",  # application data
        b"\x80\x2e\x01\x03\x01",  # SSLv2 compatible hello
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01" + (MAX_RECORD + 1).to_bytes(2, "big"),  # a record over 16 KiB
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
        b"\x16\x03\x01\x00\x04\x01\x00\x00\x05",  # too short to be a ClientHello
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a 16 MiB ClientHello
    ],
)
def test_not_a_client_hello(data: bytes) -> None:
    assert client_hello_sni(data) is None


def test_big_record_claimed_needs_more_then_refused() -> None:
    head = b"\x16\x03\x01" + MAX_RECORD.to_bytes(2, "big") + b"\x01\x00\x3f\xfc"
    assert client_hello_sni(head) is NEED_MORE
    assert client_hello_sni(head + b"\x00" * (MAX_RECORD - 4)) is None  # all zero lengths lie


def test_lying_lengths_inside() -> None:
    hello = bytearray(client_hello("www.example.com"))
    body = 9
    session = body + 34
    for offset in (session, session + 1, session + 2):  # session id / cipher suite lengths
        for value in (0x00, 0x20, 0xFF):
            mutated = bytearray(hello)
            mutated[offset] = value
            result = client_hello_sni(bytes(mutated))
            assert result is None or isinstance(result, str)


def test_fuzzed_bytes_never_raise() -> None:
    rng = random.Random(11)
    hello = client_hello("www.example.com")
    started = time.monotonic()
    for _ in range(20_000):
        data = bytearray(hello)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cut = rng.randint(0, len(data))
        result = client_hello_sni(bytes(data[:cut]))
        assert result is None or isinstance(result, (str, NeedMore))
        if isinstance(result, str):
            assert result.isascii() and result == result.lower()
    for _ in range(5_000):
        noise = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        client_hello_sni(b"\x16\x03\x01" + noise)
    assert time.monotonic() - started < 20


def test_name_with_bad_characters_is_none() -> None:
    hello = client_hello("www.example.com")
    at = hello.find(b"www.example.com")
    for bad in (b"/", b"\x00", b" ", b"\xff"):
        mutated = hello[:at] + bad + hello[at + 1 :]
        assert client_hello_sni(mutated) is None
