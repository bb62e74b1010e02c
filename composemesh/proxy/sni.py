"""Reads the server name (SNI) from the first bytes of a TLS connection, without a socket.

Pure and bounded: ``client_hello_sni`` never raises and never loops more than once per
record it is given. A ClientHello may span several handshake records; it is read whole up
to MAX_HELLO bytes (a longer one, a record over 2^14 bytes, anything that is not a TLS
ClientHello, or a name that is not a DNS host name: None).
"""

from __future__ import annotations

import re
from typing import Final

RECORD_HANDSHAKE: Final = 22
HANDSHAKE_CLIENT_HELLO: Final = 1
EXTENSION_SERVER_NAME: Final = 0
NAME_TYPE_HOST: Final = 0
MAX_RECORD: Final = 1 << 14  # TLSPlaintext.length limit (RFC 8446 5.1)
MAX_HELLO: Final = 1 << 16  # a ClientHello beyond 64 KiB is not one we read
_HOST = re.compile(rb"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*$")


class NeedMore:
    """The bytes so far are the start of a ClientHello: read more and ask again."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()


def client_hello_sni(data: bytes) -> str | None | NeedMore:
    """The SNI host name (lower case) of the ClientHello ``data`` starts with.

    NEED_MORE when ``data`` is an incomplete ClientHello; None when it is complete without
    a server name, or when ``data`` is not a TLS ClientHello at all.
    """
    hello = _handshake(data)
    if hello is None or isinstance(hello, NeedMore):
        return hello
    return _server_name(hello)


def _handshake(data: bytes) -> bytes | None | NeedMore:
    """The ClientHello body gathered from the handshake records, NEED_MORE or None."""
    body = bytearray()
    need = -1  # the ClientHello's length, once its 4-byte header is in
    pos = 0
    while True:
        header = data[pos : pos + 5]
        if len(header) >= 1 and header[0] != RECORD_HANDSHAKE:
            return None
        if len(header) >= 2 and header[1] != 3:
            return None
        if len(header) < 5:
            return NEED_MORE
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > MAX_RECORD:
            return None
        fragment = data[pos + 5 : pos + 5 + length]
        body += fragment
        if need < 0 and len(body) >= 4:
            if body[0] != HANDSHAKE_CLIENT_HELLO:
                return None
            need = int.from_bytes(body[1:4], "big")
            if need > MAX_HELLO or need < 38:  # version + random + three lengths at least
                return None
        if need >= 0 and len(body) >= 4 + need:
            return bytes(body[4 : 4 + need])
        if len(fragment) < length:
            return NEED_MORE
        pos += 5 + length


def _server_name(hello: bytes) -> str | None:
    """The host_name of the server_name extension of a ClientHello body, if well formed."""
    pos = 2 + 32  # legacy_version, random
    for width in (1, 2, 1):  # session id, cipher suites, compression methods
        length = _int(hello, pos, width)
        if length is None:
            return None
        pos += width + length
    if pos == len(hello):
        return None  # no extensions
    total = _int(hello, pos, 2)
    if total is None or pos + 2 + total > len(hello):
        return None
    pos += 2
    end = pos + total
    while pos + 4 <= end:
        kind = int.from_bytes(hello[pos : pos + 2], "big")
        length = int.from_bytes(hello[pos + 2 : pos + 4], "big")
        pos += 4
        if pos + length > end:
            return None
        if kind == EXTENSION_SERVER_NAME:
            return _host_name(hello[pos : pos + length])
        pos += length
    return None


def _host_name(extension: bytes) -> str | None:
    listed = _int(extension, 0, 2)
    if listed is None or 2 + listed != len(extension):
        return None
    pos = 2
    while pos + 3 <= len(extension):
        kind = extension[pos]
        length = int.from_bytes(extension[pos + 1 : pos + 3], "big")
        name = extension[pos + 3 : pos + 3 + length]
        if len(name) < length:
            return None
        if kind == NAME_TYPE_HOST:
            lowered = name.lower()
            if len(lowered) > 253 or not _HOST.match(lowered):
                return None
            return lowered.decode("ascii")
        pos += 3 + length
    return None


def _int(data: bytes, pos: int, width: int) -> int | None:
    """The big-endian integer of ``width`` bytes at ``pos``, None past the end."""
    if pos + width > len(data):
        return None
    return int.from_bytes(data[pos : pos + width], "big")
