"""Reading a captured connection's original destination from the kernel's sockaddr."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest

from composemesh.proxy.original_dst import original_dst, parse_sockaddr_in, parse_sockaddr_in6


def test_parses_a_sockaddr_in() -> None:
    buf = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 9080) \
        + socket.inet_aton("10.233.0.2") + bytes(8)
    assert parse_sockaddr_in(buf) == ("10.233.0.2", 9080)


def test_parses_a_sockaddr_in6() -> None:
    buf = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + bytes(4) \
        + socket.inet_pton(socket.AF_INET6, "fd00::7") + bytes(4)
    assert parse_sockaddr_in6(buf) == ("fd00::7", 443)


def test_refuses_the_wrong_family_or_length() -> None:
    with pytest.raises(ValueError, match="family"):
        parse_sockaddr_in(struct.pack("=H", socket.AF_INET6) + bytes(14))
    with pytest.raises(ValueError, match="short"):
        parse_sockaddr_in(b"\x02\x00")


def test_an_unredirected_socket_gives_its_own_address_or_an_error() -> None:
    """Without NAT the kernel answers with the local address (conntrack loaded) or ENOENT."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            accepted, _ = server.accept()
            with accepted, contextlib.suppress(OSError):
                assert original_dst(accepted) == ("127.0.0.1", port)
