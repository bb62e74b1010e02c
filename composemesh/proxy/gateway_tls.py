"""Builds the gateways' TLS contexts: the ingress serving each host its certificate by SNI,
the egress originating TLS to an external host it verifies.

The ingress serves the first host's certificate to a client that sends no SNI or one no
host has: the handshake completes and the HTTP layer answers 404 for the unknown Host, as
a browser expects, rather than a bare TLS alert.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

from composemesh.model.gateways import TLSFiles, normal_host

ALPN: tuple[str, ...] = ("http/1.1",)


def _serving(files: TLSFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files.cert), str(files.key))
    ctx.set_alpn_protocols(list(ALPN))
    return ctx


def ingress_context(hosts: Mapping[str, TLSFiles]) -> ssl.SSLContext:
    """One server context for every host name in ``hosts`` (in order; the first is the default).

    TLS 1.2 and later, ALPN http/1.1. Raises ValueError for no hosts, ssl.SSLError or
    OSError for files that do not load (``model.gateways.check_certificates`` says why
    in the user's words first).
    """
    if not hosts:
        raise ValueError("the ingress serves no host with tls")
    by_name = {normal_host(name): _serving(files) for name, files in hosts.items()}
    default = next(iter(by_name.values()))

    def pick(sslobj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        if server_name is not None:
            ctx = by_name.get(server_name.lower())
            if ctx is not None and ctx is not default:
                sslobj.context = ctx
        return None

    default.sni_callback = pick
    return default


def origination_context(
    ca_file: Path | None, client_cert: Path | None = None, client_key: Path | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server's chain against ``ca_file`` (None: the
    system's trust store) and its name (pass ``server_hostname``); TLS 1.2 and later, ALPN
    http/1.1, the client certificate if given (both or neither)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate needs both cert and key")
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(ALPN))
    if client_cert is not None and client_key is not None:
        ctx.load_cert_chain(str(client_cert), str(client_key))
    return ctx
