"""The destination a captured connection was dialed to, before iptables redirected it."""

from __future__ import annotations

import socket
import struct
from typing import Protocol

SOL_IP = 0
SOL_IPV6 = 41
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOCKADDR_IN_LEN = 16
SOCKADDR_IN6_LEN = 28

Address = tuple[str, int]


class _Sock(Protocol):
    """What we need of a socket: a real one, asyncio's TransportSocket, uvloop's PseudoSocket."""

    @property
    def family(self) -> int: ...

    def getsockopt(self, level: int, optname: int, buflen: int) -> bytes: ...


def parse_sockaddr_in(buf: bytes) -> Address:
    """(host, port) from a ``struct sockaddr_in``: family, port (network order), address, pad."""
    if len(buf) < 8:
        raise ValueError(f"sockaddr_in too short: {len(buf)} bytes")
    family = struct.unpack_from("=H", buf, 0)[0]
    if family != socket.AF_INET:
        raise ValueError(f"not an AF_INET sockaddr: family {family}")
    port = struct.unpack_from("!H", buf, 2)[0]
    return socket.inet_ntop(socket.AF_INET, buf[4:8]), port


def parse_sockaddr_in6(buf: bytes) -> Address:
    """(host, port) from a ``struct sockaddr_in6``: family, port, flowinfo, address, scope id."""
    if len(buf) < 24:
        raise ValueError(f"sockaddr_in6 too short: {len(buf)} bytes")
    family = struct.unpack_from("=H", buf, 0)[0]
    if family != socket.AF_INET6:
        raise ValueError(f"not an AF_INET6 sockaddr: family {family}")
    port = struct.unpack_from("!H", buf, 2)[0]
    return socket.inet_ntop(socket.AF_INET6, buf[8:24]), port


def original_dst(sock: _Sock) -> Address:
    """The original destination of an accepted, redirected socket; OSError if the kernel has none.

    Without NAT the kernel answers with the socket's own local address (when conntrack is
    loaded) or ENOENT; the caller guards against the former.
    """
    if sock.family == socket.AF_INET6:
        try:
            return parse_sockaddr_in6(
                sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, SOCKADDR_IN6_LEN))
        except OSError:
            pass  # an IPv4-mapped peer on a dual-stack socket: ask the IPv4 table
    return parse_sockaddr_in(sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_LEN))
