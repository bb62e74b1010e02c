"""The one way the data path reaches a mesh peer: connect, mutual TLS, and check its SPIFFE ID.

Both client sides use it: the TCP path (``tcp.py``, one link per connection) and the HTTP
upstream pool (``upstream.py``, one link per pooled connection). The caller bounds the whole
of it with its own connect timeout and attaches its protocol to the link it gets back.
"""

from __future__ import annotations

import asyncio
import ssl
from functools import partial

from composemesh.ca.tls import HANDSHAKE_TIMEOUT, peer_spiffe
from composemesh.proxy.tls_link import TlsLink


class PeerIdentityError(ssl.SSLError):
    """The endpoint's certificate is good but names another workload than the one expected."""


async def connect_peer(context: ssl.SSLContext, host: str, port: int, peer: str,
                       sni: str | None = None) -> TlsLink:
    """A TLS link to ``host:port`` whose handshake is done and whose certificate names
    ``peer`` (a SPIFFE ID), with no protocol attached yet. ``sni``: the server name sent in
    the ClientHello, which an east-west gateway on the way routes by (the certificate is
    checked against ``peer`` whatever it says).

    Raises OSError (no connection), ssl.SSLError (handshake), PeerIdentityError (another
    workload); the link is aborted whatever goes wrong, cancellation included."""
    loop = asyncio.get_running_loop()
    link: TlsLink | None = None
    try:
        _, link = await loop.create_connection(
            partial(TlsLink, context, server_side=False, handshake_timeout=HANDSHAKE_TIMEOUT,
                    server_hostname=sni),
            host, port)
        await link.handshake
        seen = peer_spiffe(link.sslobj)
        if seen != peer:
            raise PeerIdentityError(f"{host}:{port} is {seen}, not {peer}")
    except BaseException:
        if link is not None:
            link.abort()
        raise
    return link
