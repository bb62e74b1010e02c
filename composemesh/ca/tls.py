"""TLS contexts for mutual TLS between proxies (and with the pilot), and the peer's identity.

Python's ``ssl`` loads a certificate and key only from files. The private key must never
touch a disk, so it is written to an anonymous memory file (``memfd_create``: no name in
any file system, gone when closed), loaded through ``/proc/self/fd/N``, and the file closed
at once. The key is not kept by this module.

Both sides verify the peer's chain against the trust bundle (every root the mesh trusts,
old and new during a root rotation) and require a certificate (mutual TLS). Host names are
not checked: mesh peers are identified by the SPIFFE ID in their certificate's URI SAN,
which the caller compares with the identity it expects (``peer_spiffe``).
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator
from typing import Any

# ALPN protocols of mesh-internal connections (the bytes inside are the app's own), as
# Istio's "istio-http/1.1" and "istio": the client proxy says which protocol it carries, so
# that the server proxy need not detect it again. MESH_ALPN says nothing of the protocol
# (an older proxy's offer): the server detects it from the first bytes.
MESH_ALPN = "composemesh/1"
MESH_ALPN_HTTP = "composemesh-http/1.1"  # HTTP/1.1 requests, one after another
MESH_ALPN_TCP = "composemesh-tcp"  # a byte stream; the server may speak first
SERVER_ALPN = (MESH_ALPN_HTTP, MESH_ALPN_TCP, MESH_ALPN)
TLS_MIN = ssl.TLSVersion.TLSv1_2  # TLS 1.3 is negotiated whenever both ends have it
HANDSHAKE_TIMEOUT = 10.0  # seconds a TLS handshake may take before the connection is dropped
TLS_RECORD = 0x16  # the first byte of a TLS handshake record (a ClientHello)


def _context(purpose: int, chain_pem: bytes, key_pem: bytes, bundle_pem: bytes,
             alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = TLS_MIN
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem.decode())
    with _memory_files(chain_pem, key_pem) as (chain_path, key_path):
        ctx.load_cert_chain(chain_path, key_path)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    """The accepting side of mutual TLS: presents ``chain_pem``, requires a client
    certificate that chains to ``bundle_pem``. It accepts each of ``SERVER_ALPN`` (the one
    the client offered is ``selected_alpn_protocol()``)."""
    return _context(ssl.PROTOCOL_TLS_SERVER, chain_pem, key_pem, bundle_pem, SERVER_ALPN)


def client_context(chain_pem: bytes, key_pem: bytes, bundle_pem: bytes,
                   alpn: str = MESH_ALPN) -> ssl.SSLContext:
    """The connecting side of mutual TLS: presents ``chain_pem``, requires the server's
    certificate to chain to ``bundle_pem`` (its SPIFFE ID is checked by the caller), and
    offers the one ALPN protocol ``alpn`` (what its connections carry)."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, chain_pem, key_pem, bundle_pem, (alpn,))


def peer_spiffe(ssl_object: Any) -> str | None:
    """The SPIFFE ID (URI SAN) of the verified peer certificate of an ``ssl.SSLObject`` or
    ``ssl.SSLSocket``; None if there is no verified peer certificate or it has no
    ``spiffe://`` URI SAN (or more than one)."""
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    uris = [v for k, v in cert.get("subjectAltName", ()) if k == "URI" and v.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


def peer_workload(ssl_object: Any) -> tuple[str, str] | None:
    """The (workload, version) the CA wrote in the verified peer certificate's subject (CN,
    OU: ``pki.workload_subject``), None where it wrote none (an older certificate)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    names = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
    workload, version = names.get("commonName"), names.get("organizationalUnitName")
    return (workload, version) if workload and version else None


def is_tls_client_hello(first: bytes) -> bool:
    """Whether a connection's first bytes start a TLS handshake (record type 22, version 3.x)."""
    return len(first) >= 2 and first[0] == TLS_RECORD and first[1] == 3


@contextlib.contextmanager
def _memory_files(*contents: bytes) -> Iterator[list[str]]:
    """Each of ``contents`` as an anonymous in-memory file, by path, while the block runs."""
    fds: list[int] = []
    try:
        for i, data in enumerate(contents):
            fd = os.memfd_create(f"composemesh-tls-{i}", os.MFD_CLOEXEC)
            fds.append(fd)
            os.write(fd, data)
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)
