"""Mutual TLS contexts from in-memory keys: a real handshake over loopback sockets."""

from __future__ import annotations

import os
import socket
import ssl
import threading

import pytest

from composemesh.ca import cert_to_pem, key_to_pem, make_csr, make_root, sign_workload
from composemesh.ca.pki import generate_key
from composemesh.ca.spiffe import WorkloadName
from composemesh.ca.tls import (
    client_context,
    is_tls_client_hello,
    peer_spiffe,
    peer_workload,
    server_context,
)

TD = "cluster.local"


def _leaf(root, root_key, uri: str, workload: WorkloadName | None = None
          ) -> tuple[bytes, bytes]:
    key = generate_key()
    cert = sign_workload(make_csr(key), root, root_key, uri, workload=workload)
    return cert_to_pem(cert), key_to_pem(key)


@pytest.fixture(scope="module")
def pki():
    root, root_key = make_root("test root", TD)
    other, other_key = make_root("foreign root", TD)
    return {
        "bundle": cert_to_pem(root),
        "server": _leaf(root, root_key, f"spiffe://{TD}/ns/shop/sa/reviews"),
        "client": _leaf(root, root_key, f"spiffe://{TD}/ns/shop/sa/productpage",
                        WorkloadName("shop", "productpage-v2", "v2")),
        "foreign": _leaf(other, other_key, f"spiffe://{TD}/ns/shop/sa/productpage"),
    }


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
    """Both ends' view of the peer after a handshake over a socketpair (or the error)."""
    a, b = socket.socketpair()
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                seen["server_peer"] = peer_spiffe(s)
                seen["server_peer_workload"] = peer_workload(s)
                seen["version"] = s.version()
                s.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            seen["server_error"] = exc

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b) as c:
            seen["client_peer"] = peer_spiffe(c)
            seen["client_peer_workload"] = peer_workload(c)
            seen["data"] = c.recv(2)
    except (ssl.SSLError, OSError) as exc:
        seen["client_error"] = exc
    t.join(5)
    return seen


def test_mutual_tls_both_ends_see_the_peers_spiffe_id_over_tls13(pki):
    seen = _handshake(server_context(*pki["server"], pki["bundle"]),
                      client_context(*pki["client"], pki["bundle"]))
    assert seen["server_peer"] == f"spiffe://{TD}/ns/shop/sa/productpage"
    assert seen["client_peer"] == f"spiffe://{TD}/ns/shop/sa/reviews"
    # the CA's subject names the workload and version (the server's certificate has none)
    assert seen["server_peer_workload"] == ("productpage-v2", "v2")
    assert seen["client_peer_workload"] is None
    assert seen["version"] == "TLSv1.3"
    assert seen["data"] == b"ok"


def test_a_client_certificate_from_another_root_is_refused(pki):
    seen = _handshake(server_context(*pki["server"], pki["bundle"]),
                      client_context(*pki["foreign"], pki["bundle"]))
    assert "server_error" in seen
    assert "server_peer" not in seen


def test_a_client_without_a_certificate_is_refused(pki):
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.verify_mode = ssl.CERT_NONE
    seen = _handshake(server_context(*pki["server"], pki["bundle"]), bare)
    assert "server_error" in seen
    assert "certificate" in str(seen["server_error"]).lower()


def test_no_key_file_is_left_behind(pki):
    before = set(os.listdir("/proc/self/fd"))
    server_context(*pki["server"], pki["bundle"])
    after = set(os.listdir("/proc/self/fd"))
    assert after <= before


def test_peer_spiffe_without_a_peer_is_none():
    assert peer_spiffe(None) is None


def test_tls_client_hello_is_told_from_plaintext():
    assert is_tls_client_hello(b"\x16\x03\x01\x02\x00")
    assert not is_tls_client_hello(b"GET / HTTP/1.1\r\n")
    assert not is_tls_client_hello(b"\x16")
