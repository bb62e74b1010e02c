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


def _parse_sockaddr(buf: bytes, family: int, name: str, address: slice) -> Address:
    """(host, port) from a sockaddr of ``family``: the family (host order), the port (network
    order), then the address at ``address``."""
    if len(buf) < address.stop:
        raise ValueError(f"{name} too short: {len(buf)} bytes")
    found = struct.unpack_from("=H", buf, 0)[0]
    if found != family:
        raise ValueError(f"not an {socket.AddressFamily(family).name} sockaddr: family {found}")
    port = struct.unpack_from("!H", buf, 2)[0]
    return socket.inet_ntop(family, buf[address]), port


def parse_sockaddr_in(buf: bytes) -> Address:
    """(host, port) from a ``struct sockaddr_in``: family, port (network order), address, pad."""
    return _parse_sockaddr(buf, socket.AF_INET, "sockaddr_in", slice(4, 8))


def parse_sockaddr_in6(buf: bytes) -> Address:
    """(host, port) from a ``struct sockaddr_in6``: family, port, flowinfo, address, scope id."""
    return _parse_sockaddr(buf, socket.AF_INET6, "sockaddr_in6", slice(8, 24))


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
